"""Tensors on the wire: raw bytes + allow-listed dtype + shape, chunked, never pickle.

Decoding checks everything a hostile or broken peer could get wrong: dtype, shape, byte length,
chunk order, expected hidden size and finiteness, and raises :class:`TensorError` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from common.proto import splitmesh_pb2 as pb

if TYPE_CHECKING:
    from common.tensor_budget import BufferBudget

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEM_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
DEFAULT_CHUNK_BYTES = 1 << 20  # activations above 1 MiB travel in several messages
MAX_TENSOR_BYTES = 512 << 20


class TensorError(ValueError):
    """A tensor message is malformed; the message says how."""


def encode_tensor(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[pb.TensorChunk]:
    """Split a tensor into chunks of at most ``chunk_bytes`` payload bytes."""
    if tensor.dtype not in DTYPE_NAMES:
        raise TensorError(f"dtype {tensor.dtype} is not allowed on the wire")
    flat = tensor.detach().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    count = max(1, math.ceil(len(raw) / chunk_bytes))
    name = DTYPE_NAMES[tensor.dtype]
    shape = list(tensor.shape)
    return [
        pb.TensorChunk(dtype=name, shape=shape, data=raw[i * chunk_bytes : (i + 1) * chunk_bytes],
                       chunk_index=i, chunk_count=count)
        for i in range(count)
    ]


def _tensor_bytes(dtype: str, shape: list[int]) -> int:
    if dtype not in DTYPES:
        raise TensorError(f"dtype {dtype!r} not allowed (allowed: {', '.join(DTYPES)})")
    if not shape or any(d < 0 for d in shape) or len(shape) > 8:
        raise TensorError(f"bad shape {shape}")
    size = math.prod(shape) * ITEM_BYTES[dtype]
    if size > MAX_TENSOR_BYTES:
        raise TensorError(f"tensor of {size} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    return size


Admit = Callable[[str, list[int]], None]  # checks a declared dtype and shape; raises TensorError to refuse


class TensorAssembler:
    """Collects the chunks of one tensor in order and yields it when complete.

    Everything about the tensor is checked on its FIRST chunk, before anything is buffered: dtype,
    shape and byte size, the caller's ``admit`` (expected shape, row limits) and the node's ``budget``.
    Chunks are then copied into one buffer of the declared size, so reassembly is linear in the size
    and holds the bytes once; an empty chunk (of a non-empty tensor) or more chunks than bytes is refused.
    Only a tensor of several chunks draws on the budget: a one-chunk tensor is complete on arrival, its
    bytes already bounded by the transport's message limit.
    """

    def __init__(self, budget: BufferBudget | None = None) -> None:
        self._budget = budget
        self._first: pb.TensorChunk | None = None
        self._buffer = bytearray()
        self._size = 0
        self._reserved = 0  # bytes this tensor holds of the budget
        self._received = 0
        self._next = 0

    @property
    def in_progress(self) -> bool:
        return self._first is not None

    def add(self, chunk: pb.TensorChunk, admit: Admit | None = None) -> torch.Tensor | None:
        try:
            return self._add(chunk, admit)
        except TensorError:
            self.discard()
            raise

    def _start(self, chunk: pb.TensorChunk, admit: Admit | None) -> None:
        size = _tensor_bytes(chunk.dtype, list(chunk.shape))
        if chunk.chunk_count < 1 or chunk.chunk_index != 0:
            raise TensorError(f"first chunk must have index 0 of >= 1, got {chunk.chunk_index}/{chunk.chunk_count}")
        if chunk.chunk_count > max(1, size):
            raise TensorError(f"{chunk.chunk_count} chunks for a tensor of {size} bytes")
        if chunk.chunk_count == 1 and len(chunk.data) != size:
            raise TensorError(f"tensor carries {len(chunk.data)} bytes, shape {list(chunk.shape)} of "
                              f"{chunk.dtype} needs {size}")
        if admit is not None:
            admit(chunk.dtype, list(chunk.shape))
        if self._budget is not None and chunk.chunk_count > 1:
            self._budget.reserve(size)
            self._reserved = size
        self._first, self._size, self._buffer = chunk, size, bytearray(size)

    def _add(self, chunk: pb.TensorChunk, admit: Admit | None) -> torch.Tensor | None:
        if self._first is None:
            self._start(chunk, admit)
        else:
            known = self._first
            header = (chunk.dtype, list(chunk.shape), chunk.chunk_count)
            if header != (known.dtype, list(known.shape), known.chunk_count):
                raise TensorError("chunk header differs from the first chunk of its tensor")
            if chunk.chunk_index != self._next:
                raise TensorError(f"chunk {chunk.chunk_index} arrived, expected {self._next}")
        first = self._first
        assert first is not None
        data = chunk.data
        if not data and self._size:
            raise TensorError(f"chunk {chunk.chunk_index} of a {self._size}-byte tensor is empty")
        end = self._received + len(data)
        if end > self._size:
            raise TensorError("chunks carry more bytes than the shape allows")
        self._buffer[self._received:end] = data
        self._received, self._next = end, self._next + 1
        if self._next < first.chunk_count:
            return None
        if self._received != self._size:
            raise TensorError(f"tensor carries {self._received} bytes, shape {list(first.shape)} of "
                              f"{first.dtype} needs {self._size}")
        buffer, dtype, shape = self._buffer, DTYPES[first.dtype], list(first.shape)
        self.discard()  # ready for the next tensor; the buffer now belongs to the tensor
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def discard(self) -> None:
        """Drop a partly received tensor and give its bytes back to the budget (a stream ended or failed)."""
        if self._reserved and self._budget is not None:
            self._budget.release(self._reserved)
        self._first, self._buffer, self._size, self._reserved, self._received, self._next = (
            None, bytearray(), 0, 0, 0, 0)


def decode_bytes(dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
    size = _tensor_bytes(dtype, shape)
    if len(raw) != size:
        raise TensorError(f"tensor carries {len(raw)} bytes, shape {shape} of {dtype} needs {size}")
    if size == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]).reshape(shape)


def check_activation(tensor: torch.Tensor, hidden_size: int, max_rows: int) -> None:
    """An activation must be ``[1, n, hidden]`` with 1 <= n <= max_rows and finite values."""
    if tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[2] != hidden_size:
        raise TensorError(f"activation shape {list(tensor.shape)} is not [1, n, {hidden_size}]")
    if not 1 <= tensor.shape[1] <= max_rows:
        raise TensorError(f"activation has {tensor.shape[1]} rows, allowed 1..{max_rows}")
    if not bool(torch.isfinite(tensor).all()):
        raise TensorError("activation holds non-finite values")
