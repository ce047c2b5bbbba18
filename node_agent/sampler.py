"""Token sampling on the tail: greedy, or seeded temperature/top-k/top-p that replays exactly.

The random draw for step ``s`` depends only on (seed, s), so replaying a session through a new
chain reproduces the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.proto import splitmesh_pb2 as pb

MAX_TOP_K = 1 << 20  # beyond any vocabulary; 0 keeps every token


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_p: float = 1.0  # nucleus mass kept; 1 keeps everything
    top_k: int = 0  # 0 keeps every token
    seed: int = 0  # with the step index, fixes every random draw

    @classmethod
    def from_proto(cls, params: pb.SamplingParams) -> SamplingConfig:
        """The wire form, where an unset top_p (exactly 0) means no nucleus cut; any other value, NaN and
        negatives included, is kept as sent so :meth:`validate` refuses it instead of silently using 1."""
        return cls(temperature=params.temperature, top_p=1.0 if params.top_p == 0 else params.top_p,
                   top_k=params.top_k, seed=params.seed)

    def to_proto(self) -> pb.SamplingParams:
        return pb.SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)

    def validate(self) -> None:
        """Raise ValueError with a readable message for out-of-range values."""
        if not 0.0 <= self.temperature <= 100.0:  # NaN fails every comparison, so it lands here too
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in 0..{MAX_TOP_K}, got {self.top_k}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")


def _step_generator(seed: int, step: int) -> torch.Generator:
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample(logits: torch.Tensor, config: SamplingConfig, step: int) -> int:
    """Pick the next token id from float32 logits ``[vocab]``."""
    if config.temperature == 0.0:
        return int(torch.argmax(logits))
    # Shift before scaling: the best score becomes exactly 0 and the rest <= 0, so a tiny temperature
    # sends them to -inf instead of turning every score into inf (and the softmax into NaN).
    scores = (logits - logits.max()) / config.temperature
    if config.top_k > 0 and config.top_k < scores.numel():
        kth = torch.topk(scores, config.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs >= config.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=_step_generator(config.seed, step)))
