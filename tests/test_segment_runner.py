"""Segment workers load only their layers and, chained, reproduce the whole model exactly."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from common.model_store import EMBED_ROLE, HEAD_ROLE, StoredModel, layer_role
from common.spans import Span
from node_agent.segment import SegmentRunner


def test_middle_segment_holds_only_its_layers(embedded: StoredModel) -> None:
    runner = SegmentRunner(embedded, Span(10, 20))
    assert runner.loaded_roles == [layer_role(i) for i in range(10, 20)]
    assert runner.embed is None and runner.lm_head is None and runner.norm is None
    per_layer = sum(t.numel() * t.element_size() for t in embedded.load_tensors(layer_role(10)).values())
    assert runner.parameter_bytes() == 10 * per_layer


def test_first_and_last_segments_own_the_extras(embedded: StoredModel) -> None:
    first = SegmentRunner(embedded, Span(0, 3))
    last = SegmentRunner(embedded, Span(27, 30))
    assert EMBED_ROLE in first.loaded_roles and HEAD_ROLE not in first.loaded_roles and first.lm_head is None
    assert HEAD_ROLE in last.loaded_roles and EMBED_ROLE in last.loaded_roles  # tied lm_head comes from embed
    assert last.embed is None


def test_chained_segments_equal_full_forward(embedded: StoredModel, reference: PreTrainedModel) -> None:
    runners = [SegmentRunner(embedded, s) for s in (Span(0, 4), Span(4, 17), Span(17, 30))]
    caches = [r.new_cache() for r in runners]
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    hidden = ids
    for runner, cache in zip(runners, caches, strict=True):
        hidden = runner.run(cache, hidden, 0)
    with torch.inference_mode():
        expected = reference(ids).logits[0, -1]
    torch.testing.assert_close(runners[-1].last_logits(hidden), expected, rtol=0, atol=1e-4)
    step = torch.tensor([[int(expected.argmax())]])
    for runner, cache in zip(runners, caches, strict=True):
        step = runner.run(cache, step, ids.shape[1])
    with torch.inference_mode():
        full = reference(torch.cat([ids, torch.tensor([[int(expected.argmax())]])], dim=1)).logits[0, -1]
    torch.testing.assert_close(runners[-1].last_logits(step), full, rtol=0, atol=1e-4)
