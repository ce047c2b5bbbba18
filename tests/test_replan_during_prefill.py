"""A plan committed while a long prefill is still working does not throw that work away: the step finishes
on the plan it started on (every node on its path answers), and the session moves at the next token."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from common.model_store import ModelStore
from splitmesh import Client, TokenEvent
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = pytest.mark.slow

STALL_REROUTE_S = 0.3
PROMPT_TOKENS = 1800  # a prefill of several seconds on this CPU, far longer than STALL_REROUTE_S


@pytest.fixture
def mesh2(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path_factory.mktemp("replan"), orchestrator_port=0,
                    trusted=("node-0", "node-1"), boundaries=(0, 15, 30), placement=("node-0", "node-1"),
                    extra_env={"SPLITMESH_STALL_REROUTE_S": str(STALL_REROUTE_S)})
    with LocalMesh(spec) as mesh:
        yield mesh


def test_a_working_prefill_finishes_on_its_plan_and_the_session_moves_after(mesh2: LocalMesh) -> None:
    prompt = [random.Random(3).randrange(100, 40000) for _ in range(PROMPT_TOKENS)]
    with Client(mesh2.address, timeout_s=120) as client:
        expected = [e.token_id for e in client.generate(prompt, max_new_tokens=6, ignore_eos=True)]
        before = client.plan().epoch
        started = time.monotonic()
        events: list[TokenEvent] = []
        first_token_at: list[float] = []

        def consume() -> None:
            for event in client.generate(prompt, max_new_tokens=6, ignore_eos=True):
                if not events:
                    first_token_at.append(time.monotonic())
                events.append(event)

        reader = threading.Thread(target=consume)
        reader.start()
        time.sleep(0.2)
        reply = client.resplit(boundaries=(0, 30), placement=("node-0",))
        committed_at = time.monotonic()
        reader.join(timeout=120)
        assert not reader.is_alive()
        assert reply.committed, reply.reason
        after = reply.plan.epoch
        assert after > before
        # the new plan was there well before the prefill ended, so the stall check did run during it
        assert first_token_at and first_token_at[0] - committed_at > STALL_REROUTE_S + 0.5, (
            f"prefill ended {first_token_at[0] - started:.1f}s after the start, the plan {committed_at - started:.1f}s")
        assert [e.token_id for e in events] == expected
        assert events[0].epoch == before  # the working step was not replayed
        assert events[-1].epoch == after  # and the session moved to the new plan at a token boundary
