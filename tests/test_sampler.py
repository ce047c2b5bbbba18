"""Sampling is greedy at temperature 0, seeded and replayable otherwise, and validated."""

from __future__ import annotations

import pytest
import torch

from node_agent.sampler import SamplingConfig, sample


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert sample(logits, SamplingConfig(), step=0) == 1


def test_seeded_sampling_replays_and_depends_on_seed_and_step() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    config = SamplingConfig(temperature=1.5, seed=42)
    first = [sample(logits, config, step) for step in range(50)]
    assert first == [sample(logits, config, step) for step in range(50)]
    assert first != [sample(logits, SamplingConfig(temperature=1.5, seed=43), step) for step in range(50)]
    assert len(set(first)) > 10


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0, -10.0, -10.0])
    picks = {sample(logits, SamplingConfig(temperature=5.0, top_k=2, seed=s), 0) for s in range(200)}
    assert picks == {0, 1}
    probs_top = torch.softmax(logits, -1)[0].item()
    picks = {sample(logits, SamplingConfig(temperature=1.0, top_p=probs_top * 0.99, seed=s), 0) for s in range(100)}
    assert picks == {0}


@pytest.mark.parametrize("bad", [SamplingConfig(temperature=-0.1), SamplingConfig(top_p=0.0),
                                 SamplingConfig(top_p=1.5), SamplingConfig(top_k=-1),
                                 SamplingConfig(temperature=float("nan"))])
def test_invalid_values_are_rejected(bad: SamplingConfig) -> None:
    with pytest.raises(ValueError):
        bad.validate()


def test_a_tiny_temperature_is_greedy_not_nan() -> None:
    """1e-40 is a valid temperature; dividing raw logits by it overflowed to inf and the softmax to NaN."""
    logits = torch.tensor([3.0, 7.5, -2.0, 7.4])
    for temperature in (1e-40, 1e-30, 1e-8):
        for step in range(5):
            assert sample(logits, SamplingConfig(temperature=temperature, top_p=0.5, top_k=3, seed=1), step) == 1
