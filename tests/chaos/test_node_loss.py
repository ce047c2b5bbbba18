"""A middle node killed with SIGKILL mid-generation: the client sees a pause, not an error, and the same tokens."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.chat import chat_token_ids
from common.model_store import ModelStore
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture
def small_mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("chaos"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"))
    with LocalMesh(spec) as mesh:
        yield mesh


def test_killed_middle_node_is_routed_around(small_mesh: LocalMesh, reference: PreTrainedModel,
                                             tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [{"role": "user", "content": "Write a short poem about rivers."}]
    expected = reference_greedy(reference, chat_token_ids(tokenizer, prompt), 24)
    arrivals: list[float] = []
    events = []
    with Client(small_mesh.address) as client:
        for event in client.generate(prompt, max_new_tokens=24, ignore_eos=False):
            events.append(event)
            arrivals.append(time.monotonic())
            if event.index == 5:
                small_mesh.signal("node-1", signal.SIGKILL)
        status = client.status()
    tokens = [e.token_id for e in events]
    moved_at = next(i for i, e in enumerate(events) if e.epoch != events[0].epoch)
    if tokens != expected:  # a near-tie after the replay's single prefill: compare with generate from that prefix
        continued = reference_greedy(reference, chat_token_ids(tokenizer, prompt) + tokens[:moved_at], 24 - moved_at)
        assert tokens[moved_at:] == continued[: len(tokens) - moved_at]
    assert all(s.node_id != "node-1" for s in status.plan.segments)
    pause = max(b - a for a, b in itertools.pairwise(arrivals))
    print(f"recovered at token {moved_at}, longest pause {pause:.2f}s, new plan epoch {status.plan.epoch}")
    assert torch.tensor(pause) < 20.0
