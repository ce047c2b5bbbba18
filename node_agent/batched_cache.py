"""A cache view over many sessions' own caches, so one decode forward serves them all.

Each session keeps its transformers ``DynamicCache`` (it joins and leaves a batch between steps with
its history intact). For one step, :class:`BatchedDecodeCache` stands in for the batch: the decoder
layer's ``update()`` appends each row's new key/value to that row's session cache and returns the
batch's keys/values stacked and right-padded to the longest history; :func:`padding_mask` hides the
padding. transformers' paged cache (``generation.continuous_batching``) needs its own attention kernels
and request manager; this keeps the stock decoder layers and attention functions.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache


class BatchedDecodeCache(Cache):
    """One decode step (one new row per session) over ``caches``, in row order."""

    def __init__(self, caches: list[DynamicCache]) -> None:
        super().__init__(layers=[])
        self.caches = caches
        # Every layer of a session holds the same history: the lengths after this step's append.
        self.lengths = [cache.get_seq_length() + 1 for cache in caches]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values ``[B, heads, 1, d]`` of this step -> the batch's ``[B, heads, longest, d]``."""
        rows, heads, _, dim = key_states.shape
        longest = max(self.lengths)
        keys = key_states.new_zeros(rows, heads, longest, dim)
        values = value_states.new_zeros(rows, heads, longest, dim)
        for row, cache in enumerate(self.caches):
            k, v = cache.update(key_states[row:row + 1], value_states[row:row + 1], layer_idx)
            keys[row, :, :k.shape[2]] = k[0]
            values[row, :, :v.shape[2]] = v[0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths) - 1


def padding_mask(lengths: list[int], dtype: torch.dtype, attn_implementation: str | None) -> torch.Tensor:
    """The 4D mask ``[B, 1, 1, longest]`` of one decode step: row ``b`` sees its first ``lengths[b]`` keys.

    SDPA takes it as booleans (True = attend); eager attention adds it, so there it is 0 / dtype-min.
    """
    longest = max(lengths)
    keep = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    keep = keep[:, None, None, :]
    if attn_implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
