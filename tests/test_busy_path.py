"""A step whose path is busy keeps waiting, however long the work takes; only a stuck path fails it.

Several long prompts at once keep both nodes computing for several seconds, far beyond a five-second
``hop_timeout_s``. Prefill chunks of 32 tokens keep each compute round well under that timeout even
on a loaded box (a single round longer than ``hop_timeout_s`` does count as no progress), so every
node answers its probes and finishes rounds all along, and every session completes, on its first
plan, with the tokens of ``generate`` on its prompt alone.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest
from transformers import PreTrainedModel

from bench.session_oracle import judge, reference_with_gaps
from common.model_store import ModelStore
from splitmesh import Client, TokenEvent
from splitmesh.client import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec

pytestmark = pytest.mark.slow

HOP_TIMEOUT_S = 5.0
SESSIONS = 4
PROMPT_TOKENS = 2000
NEW_TOKENS = 4


@pytest.fixture
def mesh2(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path_factory.mktemp("busy"), orchestrator_port=0,
                    trusted=("node-0", "node-1"), boundaries=(0, 15, 30), placement=("node-0", "node-1"),
                    extra_env={"SPLITMESH_HOP_TIMEOUT_S": str(HOP_TIMEOUT_S), "SPLITMESH_RECOVERY_TIMEOUT_S": "5",
                               "SPLITMESH_PREFILL_CHUNK_TOKENS": "32"})
    with LocalMesh(spec) as mesh:
        yield mesh


def test_long_prefills_on_a_busy_path_outlast_the_hop_timeout(mesh2: LocalMesh, reference: PreTrainedModel) -> None:
    prompts = [[random.Random(k).randrange(100, 40000) for _ in range(PROMPT_TOKENS)] for k in range(SESSIONS)]
    outs: list[list[TokenEvent] | Exception] = [[] for _ in prompts]
    first_at: list[float] = [0.0] * SESSIONS
    start = threading.Barrier(SESSIONS + 1)

    def one(index: int) -> None:
        with Client(mesh2.address, timeout_s=300) as client:
            start.wait()
            events: list[TokenEvent] = []
            try:
                for event in client.generate(prompts[index], max_new_tokens=NEW_TOKENS, ignore_eos=True):
                    if not events:
                        first_at[index] = time.monotonic()
                    events.append(event)
            except SplitmeshError as exc:
                outs[index] = exc
                return
            outs[index] = events

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SESSIONS)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join(timeout=300)
    assert all(isinstance(o, list) for o in outs), outs
    # the path really was busy for longer than the timeout before the last first token
    assert max(first_at) - began > HOP_TIMEOUT_S, f"prefills took only {max(first_at) - began:.1f}s"
    for events, prompt in zip(outs, prompts, strict=True):
        assert isinstance(events, list)
        verdict = judge([e.token_id for e in events], *reference_with_gaps(reference, prompt, NEW_TOKENS))
        assert verdict.ok, verdict.describe()
        assert {e.epoch for e in events} == {events[0].epoch}  # no step was failed and replayed
