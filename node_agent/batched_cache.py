"""Many sessions' keys and values as one batch, so a decode forward serves them all without copying.

Each session keeps its own cache (:class:`SessionCache`, a transformers ``DynamicCache``): it joins and
leaves batches between steps with its history intact, and a session running alone (a prefill chunk, a
replay, strict mode) runs today's exact code. Sessions that decode together step after step form a
:class:`DecodeGroup`: per layer, one right-padded ``[B, heads, capacity, d]`` buffer holding every
member's history. A step writes each row's new key/value in place (one indexed write per layer) and
attention reads the buffer up to the longest history; :func:`padding_mask` hides the padding. Building
the batch afresh every step instead costs two copies of every session's history per layer per step
(``DynamicCache`` grows by concatenation, then the rows are padded into a batch), which at 16 sessions
was a sixth of a node's compute.

While a session is in a group the group holds the truth; the session's own layers are stale. Any use of
the session outside that exact group first dissolves the group (:func:`settle`), writing every member's
history back. The group is referenced only by its members, so it is freed with the last of them.

transformers' paged cache (``generation.continuous_batching``) needs its own attention kernels and
request manager; this keeps the stock decoder layers and attention functions.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

HEADROOM = 64  # positions a group's buffers hold beyond the longest history, so most steps never grow them


class SessionCache(DynamicCache):
    """One session's cache on one segment; ``group`` is set while a :class:`DecodeGroup` holds its history."""

    group: DecodeGroup | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions of history, wherever they are held."""
        if self.group is not None:
            return self.group.length_of(self)
        return super().get_seq_length(layer_idx)

    def kv_bytes(self) -> int:
        """Bytes of keys and values of this session (its share of a group's buffers while in one)."""
        if self.group is not None:
            return self.group.bytes_of(self)
        return _own_bytes(self)


def _own_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def settle(cache: DynamicCache) -> None:
    """Make ``cache`` hold its own history again (before it runs alone or joins another batch)."""
    if isinstance(cache, SessionCache) and cache.group is not None:
        cache.group.dissolve()


class DecodeGroup:
    """The padded keys/values of sessions that decode together, one buffer pair per layer."""

    def __init__(self, caches: list[SessionCache]) -> None:
        self._members = [weakref.ref(c) for c in caches]
        self._rows = {id(c): row for row, c in enumerate(caches)}
        self.lengths = [c.get_seq_length() for c in caches]  # history before the step being run (no group yet)
        self._keys: dict[int, torch.Tensor] = {}  # by layer index, filled as the first step reaches each layer
        self._values: dict[int, torch.Tensor] = {}
        self._where: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (rows, positions) to write
        for cache in caches:
            cache.group = self

    @classmethod
    def for_step(cls, caches: list[DynamicCache]) -> DecodeGroup:
        """The group of exactly these sessions in this order: kept from the last step, or formed now."""
        first = caches[0]
        group = first.group if isinstance(first, SessionCache) else None
        if group is not None and group.holds(caches):
            return group
        for cache in caches:
            settle(cache)
        sessions = []
        for cache in caches:
            if not isinstance(cache, SessionCache):
                raise TypeError("a batched decode needs SessionCache caches (SegmentRunner.new_cache)")
            sessions.append(cache)
        return cls(sessions)

    def holds(self, caches: list[DynamicCache]) -> bool:
        return len(caches) == len(self._members) and all(
            ref() is cache for ref, cache in zip(self._members, caches, strict=True))

    def row_of(self, cache: DynamicCache) -> int | None:
        row = self._rows.get(id(cache))
        return row if row is not None and self._members[row]() is cache else None

    def length_of(self, cache: SessionCache) -> int:
        row = self.row_of(cache)
        assert row is not None, "a cache points at a group that does not hold it"
        return self.lengths[row]

    def bytes_of(self, cache: SessionCache) -> int:
        """The session's row of the group's buffers (headroom included: it is allocated), plus what its own
        layers still hold (those the group has not reached)."""
        assert self.row_of(cache) is not None, "a cache points at a group that does not hold it"
        total = 0
        for buffers in (self._keys, self._values):
            for buffer in buffers.values():
                total += buffer[0].numel() * buffer.element_size()
        return total + _own_bytes(cache)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys/values ``[B, heads, 1, d]`` -> the batch's ``[B, heads, longest, d]``."""
        keys, values = self._keys.get(layer_idx), self._values.get(layer_idx)
        longest = max(self.lengths) + 1
        if keys is None or values is None:
            keys, values = self._gather(layer_idx, key_states, longest + HEADROOM)
        elif keys.shape[2] < longest:
            keys, values = _grown(keys, longest * 2), _grown(values, longest * 2)
        self._keys[layer_idx], self._values[layer_idx] = keys, values
        if self._where is None:  # the same for every layer of the step
            self._where = (torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        rows, at = self._where
        keys[rows, :, at] = key_states[:, :, 0]
        values[rows, :, at] = value_states[:, :, 0]
        return keys[:, :, :longest], values[:, :, :longest]

    def advance(self) -> None:
        """The step ran through every layer: each history is one longer."""
        self.lengths = [length + 1 for length in self.lengths]
        self._where = None

    def dissolve(self) -> None:
        """Write every living member's history back into its own cache and leave them free."""
        for row, ref in enumerate(self._members):
            cache = ref()
            if cache is None or cache.group is not self:
                continue
            length = self.lengths[row]
            for index, keys in self._keys.items():  # a layer the group never reached: the session's own holds
                values = self._values[index]
                while len(cache.layers) <= index:  # a session whose first step ran in the group
                    cache.layers.append(DynamicLayer())  # type: ignore[no-untyped-call]
                layer = cache.layers[index]
                assert isinstance(layer, DynamicLayer), "a session cache holds full-attention layers"
                own_keys, own_values = keys[row:row + 1, :, :length].clone(), values[row:row + 1, :, :length].clone()
                if not layer.is_initialized:
                    layer.lazy_initialization(own_keys, own_values)
                layer.keys, layer.values = own_keys, own_values
            cache.group = None
        self._members = []
        self._keys, self._values = {}, {}

    def _gather(self, layer_idx: int, like: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers built from every member's own history (once, when the group forms)."""
        rows, heads, _, dim = like.shape
        keys = like.new_zeros(rows, heads, capacity, dim)
        values = like.new_zeros(rows, heads, capacity, dim)
        for row, ref in enumerate(self._members):
            cache = ref()
            assert cache is not None, "a member of a forming group is alive"
            length = self.lengths[row]
            if not length:
                continue
            layer = cache.layers[layer_idx]
            own_keys, own_values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if length and isinstance(own_keys, torch.Tensor) and isinstance(own_values, torch.Tensor):
                keys[row, :, :length] = own_keys[0]
                values[row, :, :length] = own_values[0]
                # The group holds the truth from now on (dissolve writes it back): the stale copy would double
                # the session's KV memory for as long as it decodes in this group.
                assert isinstance(layer, DynamicLayer), "a session cache holds full-attention layers"
                layer.keys, layer.values = own_keys[:, :, :0].clone(), own_values[:, :, :0].clone()
        return keys, values


def _grown(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    grown = buffer.new_zeros(buffer.shape[0], buffer.shape[1], capacity, buffer.shape[3])
    grown[:, :, :buffer.shape[2]] = buffer
    return grown


class BatchedDecodeCache(Cache):
    """The ``Cache`` a decoder layer sees for one decode step (one new row per session) of a group."""

    def __init__(self, caches: list[DynamicCache]) -> None:
        super().__init__(layers=[])
        self.group = DecodeGroup.for_step(caches)
        self.lengths = [length + 1 for length in self.group.lengths]  # after this step's append

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        return self.group.update(key_states, value_states, layer_idx)

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
