"""Multi-host testbed: the adaptive loop re-plans away from a link throttled with tc, and tokens stay exact.

Three namespace hosts (a trusted head, two untrusted helpers) on a private bridge; the static split puts the
middle of the model on ``mid``; then mid's link is throttled to 1 Mbit/s both ways. The nodes' link probes
see it, the bandwidth trigger fires, and the orchestrator must move the middle span off ``mid``. Greedy
tokens before and after equal single-process ``generate``. Needs root and iproute2; skips otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench.testbed import ScenarioError, Testbed, load_scenario, parse_scenario, unavailable_reason
from bench.testbed.processes import in_namespace
from bench.testbed.testbed import node_flags
from common.chat import chat_token_ids
from common.model_store import ModelStore
from tests.conftest import reference_greedy

SCENARIO = Path(__file__).resolve().parent.parent / "bench" / "scenarios" / "testbed_throttle.json"
THROTTLED_MBPS = 1.0
REPLAN_DEADLINE_S = 45.0



@pytest.fixture(scope="module")
def testbed(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no network-namespace testbed here: {reason}")
    if "--probe-interval-s" not in node_flags():
        pytest.skip("the node agent does not measure links yet (no --probe-interval-s)")
    scenario = load_scenario(SCENARIO)
    with Testbed(scenario, tmp_path_factory.mktemp("testbed"), store.root) as tb:
        yield tb
    assert not tb.network.remains(), f"testbed left behind: {tb.network.remains()}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_replans_away_from_throttled_link(testbed: Testbed, tokenizer: PreTrainedTokenizerBase,
                                          reference: PreTrainedModel) -> None:
    sc = testbed.scenario
    testbed.start_mesh(adaptive=True, policy={**sc.static_policy, **sc.policy})
    prompt_ids = chat_token_ids(tokenizer, [{"role": "user", "content": "Name three primary colours."}])
    expected = reference_greedy(reference, prompt_ids, 12)
    with testbed.client(120.0) as client:
        before = client.status().plan
        assert [s.node_id for s in before.segments] == list(sc.placement), "the static split did not take effect"
        tokens = [e.token_id for e in client.generate(prompt_ids, max_new_tokens=12, ignore_eos=True)]
        assert tokens == expected

        testbed.set_rate(sc.bottleneck, THROTTLED_MBPS)
        deadline = time.monotonic() + REPLAN_DEADLINE_S
        plan = before
        while time.monotonic() < deadline:
            testbed.check_mesh()
            plan = client.status().plan
            if sc.bottleneck not in {s.node_id for s in plan.segments}:
                break
            time.sleep(1.0)
        history = client.history(50)
        replans = [d for d in history if d.kind in ("migrate", "resplit") and "bandwidth" in d.triggers]
        summary = [f"{d.kind} [{d.triggers}] {d.reason}" for d in history]
        assert sc.bottleneck not in {s.node_id for s in plan.segments}, (
            f"plan still uses the throttled host after {REPLAN_DEADLINE_S:.0f}s: epoch {plan.epoch} "
            f"{[(s.start, s.end, s.node_id) for s in plan.segments]}; decisions: {summary}")
        assert replans, f"no migrate/resplit decision names the bandwidth trigger: {summary}"
        assert plan.epoch > before.epoch

        after = [e for e in client.generate(prompt_ids, max_new_tokens=12, ignore_eos=True)]
        assert [e.token_id for e in after] == expected
        assert all(e.epoch >= plan.epoch for e in after), "the generation did not run on the new plan"
    testbed.stop_mesh()


def test_scenario_files_parse() -> None:
    """Every testbed scenario shipped in bench/scenarios is valid (runs without root)."""
    for path in sorted(SCENARIO.parent.glob("testbed_*.json")):
        sc = load_scenario(path)
        assert sc.bottleneck in {h.name for h in sc.hosts}
        assert replace(sc.requests, count=2).prompts(1000)[0] == replace(sc.requests, count=3).prompts(1000)[0]


def test_host_threads_parse() -> None:
    """A host may set its node's torch threads; 0 (the default) means the scenario's node.threads."""
    sc = parse_scenario({"hosts": [{"name": "a", "trusted": True, "cpus": "0", "threads": 1},
                                   {"name": "both", "cpus": "0,1", "threads": 2}, {"name": "plain"}],
                         "node": {"threads": 3}})
    assert [h.threads for h in sc.hosts] == [1, 2, 0]
    assert sc.node_threads == 3
    with pytest.raises(ScenarioError, match="threads"):
        parse_scenario({"hosts": [{"name": "a", "trusted": True, "threads": "2"}]})


@pytest.mark.timeout(60)
def test_pinned_process_runs_in_its_namespace(testbed: Testbed) -> None:
    """taskset before ``ip netns exec``: the process is in the host's namespace and on the host's cores only."""
    core = str(min(os.sched_getaffinity(0)))
    code = "import os; print(sorted(os.sched_getaffinity(0)), os.readlink('/proc/self/ns/net'))"
    out = subprocess.run(in_namespace(testbed.network.exec_prefix("head"), [sys.executable, "-c", code], core),
                         capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert out[0] == f"[{core}]"
    assert out[1] != os.readlink("/proc/self/ns/net"), "the process ran in this process's network namespace"
    with pytest.raises(KeyError, match="nope"):
        testbed.start_mesh(adaptive=False, hosts=("head", "nope"))
    assert not testbed.procs.procs, "a mesh with an unknown host started processes"
