"""The per-session exactness rule for batched decoding, shared by tests and benchmarks.

Batched matrix products round differently from a batch of one, so a session's greedy tokens must equal
single-process ``generate`` on its prompt alone, except from a step where the reference's top-2 logit gap
is below a tolerance: from there only the prefix before it must match. A session that moved to a new plan
at step ``m`` was replayed (its history prefilled again on the new chain), so from ``m`` on it is compared
with ``generate`` continued from the prompt plus its first ``m`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

TIE_TOLERANCE = 0.01  # logits: batched rounding moves them by ~1e-4 on this model in fp32


def reference_with_gaps(model: PreTrainedModel, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """Greedy ``generate`` on the prompt alone, with each step's top-2 logit gap.

    Like a session with ``ignore_eos``, it runs ``new`` steps whatever it samples: the end-of-sequence id
    is set to one outside the vocabulary, so nothing stops it and nothing is suppressed.
    """
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=new,
            do_sample=False, pad_token_id=model.config.eos_token_id, eos_token_id=model.config.vocab_size,
            output_scores=True, return_dict_in_generate=True)
    tokens = [int(t) for t in out.sequences[0, len(prompt):]]
    gaps = [float(top[0] - top[1]) for top in (torch.topk(s[0].float(), 2).values for s in out.scores)]
    return tokens, gaps


@dataclass(frozen=True)
class Verdict:
    """How one session's tokens compare with the reference."""

    ok: bool
    needed_tolerance: bool  # the tokens parted from the reference at or after a near-tie step
    first_difference: int | None  # the first step where they differ (None: equal)
    tie_step: int | None  # the reference's first step with a top-2 gap below the tolerance

    def describe(self) -> str:
        if not self.ok:
            return f"differs at step {self.first_difference} (first near-tie: {self.tie_step})"
        return "equal" if self.first_difference is None else f"parts at near-tie step {self.tie_step}"


def judge(got: list[int], expected: list[int], gaps: list[float], tolerance: float = TIE_TOLERANCE) -> Verdict:
    """The rule above for one session (``got`` may be shorter than ``expected`` only if it is a prefix)."""
    tie = next((step for step, gap in enumerate(gaps) if gap < tolerance), None)
    differ = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if differ is None and len(got) != len(expected):
        differ = min(len(got), len(expected))
    if differ is None:
        return Verdict(True, False, None, tie)
    ok = tie is not None and differ >= tie
    return Verdict(ok, ok, differ, tie)
