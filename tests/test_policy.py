"""One validated policy: ranges on every field, refused values change nothing, and a stated precedence between
the orchestrator's settings and the policy persisted by ``policy set``.

Before: ``interval_s=1e-6`` (93% CPU), NaN and negative thresholds and ``hysteresis=5`` were accepted and
persisted; a policy saved once silently overrode the orchestrator's flags on every restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.config import build_with_sources
from common.privacy import TrustRule
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from orchestrator.config import OrchestratorConfig
from orchestrator.policy import Policy, PolicyError, apply_policy, policy_from_json, policy_to_json, policy_values
from orchestrator.policy_source import startup_policy
from splitmesh.launcher import LocalMesh, MeshSpec, free_port
from tests.test_config import _args


@pytest.mark.parametrize(("name", "value"), [
    ("interval_s", "1e-6"), ("interval_s", "0"), ("latency_max_ms", "nan"), ("latency_max_ms", "-5"),
    ("latency_max_ms", "inf"), ("hysteresis", "5"), ("hysteresis", "1"), ("hysteresis", "-0.1"),
    ("utilisation_max", "0"), ("utilisation_max", "1.5"), ("cooldown_s", "-1"), ("bandwidth_min_bps", "nan"),
    ("ewma_alpha", "0"), ("ewma_alpha", "7"), ("gamma", "-1"), ("prompt_tokens", "0"), ("prompt_tokens", "2.5"),
    ("kv_budget_tokens", "-1"), ("default_link_mbps", "0"), ("extra_critical_layers", "1,x"),
    ("extra_critical_layers", "-3"), ("adaptive", "maybe"), ("bandwidth_scope", "some"),
])
def test_out_of_range_values_are_refused_with_the_field_named(name: str, value: str) -> None:
    with pytest.raises(PolicyError, match=name):
        apply_policy(Policy(), {name: value})


def test_a_valid_update_round_trips_and_a_bad_one_names_every_bad_key() -> None:
    policy = apply_policy(Policy(), {"latency_max_ms": "120", "extra_critical_layers": "3,1", "privacy_hard": "off"})
    assert policy_values(policy)["extra_critical_layers"] == "1,3" and policy.latency_max_ms == 120.0
    assert policy.decision.weights.privacy_hard is False and policy.trust_rule() == TrustRule()
    assert policy_from_json(policy_to_json(policy)) == policy
    with pytest.raises(PolicyError, match="unknown policy keys: nope"):
        apply_policy(policy, {"nope": "1"})
    with pytest.raises(PolicyError) as caught:
        apply_policy(policy, {"hysteresis": "5", "interval_s": "1e-6"})
    assert "hysteresis" in str(caught.value) and "interval_s" in str(caught.value)
    legacy = '{"interval_s": "2.0", "adaptive": "false", "extra_critical_layers": ""}'  # flat text, as once stored
    assert policy_from_json(legacy) == Policy(interval_s=2.0, adaptive=False)


def _config(argv: list[str], env: dict[str, str] | None = None) -> tuple[OrchestratorConfig, dict[str, str]]:
    return build_with_sources(OrchestratorConfig, _args(OrchestratorConfig, argv), env=env or {})


def test_explicit_settings_win_over_the_persisted_policy_which_wins_over_defaults(
        caplog: pytest.LogCaptureFixture) -> None:
    saved = policy_to_json(Policy(cooldown_s=60.0, latency_max_ms=90.0, hysteresis=0.2))
    config, sources = _config(["--cooldown-s", "5"], {"SPLITMESH_HYSTERESIS": "0.3"})
    policy, lines = startup_policy(config, sources, saved)
    assert (policy.cooldown_s, policy.hysteresis, policy.latency_max_ms) == (5.0, 0.3, 90.0)
    assert any("cooldown_s=5.0 from the command line" in line and "overriding the persisted 60.0" in line
               for line in lines)
    assert any("hysteresis=0.3 from the environment" in line for line in lines)
    assert any("latency_max_ms=90.0 from the persisted policy" in line for line in lines)
    assert startup_policy(*_config([]), None)[0] == Policy()  # nothing set, nothing saved: the defaults
    with caplog.at_level(logging.ERROR):  # a record persisted before validation existed is ignored, loudly
        policy, _ = startup_policy(*_config([]), '{"interval_s": "1e-06", "latency_max_ms": "nan"}')
    assert policy == Policy() and "ignoring the persisted policy" in caplog.text
    with pytest.raises(PolicyError, match="interval_s"):
        startup_policy(*_config(["--decision-interval-s", "1e-6"]), None)
    assert _config([])[0].bandwidth_min_mbps * 1e6 == Policy().bandwidth_min_bps  # one home for the defaults


# ------------------------------------------------------------------ live: a lone orchestrator, restarted
def _orchestrator(workdir: Path, store: Path, port: int, env: dict[str, str]) -> LocalMesh:
    spec = MeshSpec(nodes=0, store=store, workdir=workdir, orchestrator_port=port, extra_env=env)
    lone = LocalMesh(spec)
    lone.start_orchestrator()
    deadline = time.monotonic() + 60
    while lone.status() is None:
        if time.monotonic() > deadline or lone.processes["orchestrator"].poll() is not None:
            lone.stop()
            raise RuntimeError(f"orchestrator did not start; see {workdir / 'orchestrator.log'}")
        time.sleep(0.2)
    return lone


@pytest.fixture
def restartable(store: object, tmp_path: Path) -> Iterator[tuple[Path, Path, int]]:
    yield tmp_path, store.root, free_port()  # type: ignore[attr-defined]


def _policy(address: str) -> dict[str, str]:
    with grpc.insecure_channel(address) as channel:
        return dict(pb_grpc.AdminStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=10).values)


def _set(address: str, values: dict[str, str]) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.AdminStub(channel).SetPolicy(pb.SetPolicyRequest(set=values), timeout=10)
        except grpc.RpcError as exc:
            assert "interval_s" in (exc.details() or "") or exc.code() != grpc.StatusCode.INVALID_ARGUMENT
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_policy_set_persists_refuses_bad_values_and_explicit_settings_win_at_restart(
        restartable: tuple[Path, Path, int]) -> None:
    workdir, store, port = restartable
    lone = _orchestrator(workdir, store, port, {})
    try:
        assert _set(lone.address, {"cooldown_s": "60", "interval_s": "2"}) == grpc.StatusCode.OK
        assert _set(lone.address, {"cooldown_s": "61", "interval_s": "1e-6"}) == grpc.StatusCode.INVALID_ARGUMENT
        assert _policy(lone.address)["cooldown_s"] == "60.0"  # nothing of the refused update was applied
    finally:
        lone.stop()
    lone = _orchestrator(workdir, store, port, {"SPLITMESH_COOLDOWN_S": "5"})
    try:
        values = _policy(lone.address)
        assert (values["cooldown_s"], values["interval_s"]) == ("5.0", "2.0")  # the setting wins, the rest persists
    finally:
        lone.stop()
    log = (workdir / "orchestrator.log").read_text()
    assert "cooldown_s=5.0 from the environment (--cooldown-s), overriding the persisted 60.0" in log
    lone = _orchestrator(workdir, store, port, {})
    try:
        assert _policy(lone.address)["cooldown_s"] == "60.0"
    finally:
        lone.stop()
