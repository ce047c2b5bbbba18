"""The mesh's greedy tokens equal single-process transformers ``generate`` for every split and placement."""

from __future__ import annotations

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.chat import chat_token_ids
from splitmesh import Client
from splitmesh.launcher import LocalMesh
from tests.conftest import reference_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
MAX_NEW = 24

SPLITS = {
    "one segment": ([0, 30], ["node-0"]),
    "two segments": ([0, 15, 30], ["node-0", "node-4"]),
    "three segments": ([0, 10, 20, 30], ["node-0", "node-1", "node-4"]),
    "five segments": ([0, 6, 12, 18, 24, 30], ["node-0", "node-1", "node-2", "node-3", "node-4"]),
    "uneven, ring closes at head": ([0, 2, 27, 30], ["node-0", "node-2", "node-0"]),
}


@pytest.fixture(scope="module")
def expected(reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[int]]:
    out = {}
    for prompt in PROMPTS:
        ids = chat_token_ids(tokenizer, [{"role": "user", "content": prompt}])
        out[prompt] = reference_greedy(reference, ids, MAX_NEW)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("split", list(SPLITS))
def test_mesh_tokens_equal_generate(mesh: LocalMesh, expected: dict[str, list[int]], split: str) -> None:
    boundaries, placement = SPLITS[split]
    with Client(mesh.address) as client:
        reply = client.resplit(boundaries, placement)
        assert reply.committed
        assert [(s.start, s.end, s.node_id) for s in reply.plan.segments] == [
            (a, b, n) for a, b, n in zip(boundaries, boundaries[1:], placement, strict=False)]
        mesh.wait_serving(60, epoch_above=reply.plan.epoch - 1)
        for prompt in PROMPTS:
            events = list(client.generate([{"role": "user", "content": prompt}], max_new_tokens=MAX_NEW))
            assert [e.token_id for e in events] == expected[prompt], f"{split}: {prompt!r}"
            assert all(e.epoch == reply.plan.epoch for e in events)
            assert events[-1].finish_reason in ("eos", "length")
            assert events[-1].completion_tokens == len(events)
