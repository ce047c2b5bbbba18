"""Tensors travel as raw bytes in chunks and are checked on arrival."""

from __future__ import annotations

import pytest
import torch

from common.proto import splitmesh_pb2 as pb
from common.tensor_codec import TensorAssembler, TensorError, check_activation, decode_bytes, encode_tensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_in_chunks(dtype: torch.dtype) -> None:
    tensor = torch.randn(1, 1000, 576).to(dtype)
    chunks = encode_tensor(tensor, chunk_bytes=1 << 20)
    assert len(chunks) == -(-tensor.numel() * tensor.element_size() // (1 << 20))
    assert all(len(c.data) <= 1 << 20 for c in chunks)
    assembler = TensorAssembler()
    results = [assembler.add(c) for c in chunks]
    assert all(r is None for r in results[:-1])
    assert results[-1] is not None and torch.equal(results[-1], tensor)
    assert not assembler.in_progress


def test_out_of_order_and_inconsistent_chunks_are_rejected() -> None:
    chunks = encode_tensor(torch.randn(1, 100, 64), chunk_bytes=4096)
    assembler = TensorAssembler()
    assembler.add(chunks[0])
    with pytest.raises(TensorError, match="expected 1"):
        assembler.add(chunks[2])
    bad = pb.TensorChunk()
    bad.CopyFrom(chunks[1])
    bad.shape[:] = [1, 99, 64]
    fresh = TensorAssembler()
    fresh.add(chunks[0])
    with pytest.raises(TensorError, match="differs"):
        fresh.add(bad)


@pytest.mark.parametrize(("dtype", "shape", "size", "message"), [
    ("int64", [1, 2], 16, "not allowed"),
    ("float32", [1, 2, 3], 23, "needs 24"),
    ("float32", [], 0, "bad shape"),
    ("float32", [1, -2], 0, "bad shape"),
    ("float32", [1 << 20, 1 << 20], 0, "exceeds"),
])
def test_malformed_headers(dtype: str, shape: list[int], size: int, message: str) -> None:
    with pytest.raises(TensorError, match=message):
        decode_bytes(dtype, shape, b"\0" * size)


def test_activation_checks() -> None:
    check_activation(torch.zeros(1, 3, 8), hidden_size=8, max_rows=4)
    with pytest.raises(TensorError, match="not"):
        check_activation(torch.zeros(1, 3, 9), hidden_size=8, max_rows=4)
    with pytest.raises(TensorError, match="rows"):
        check_activation(torch.zeros(1, 5, 8), hidden_size=8, max_rows=4)
    with pytest.raises(TensorError, match="non-finite"):
        check_activation(torch.tensor([[[0.0] * 7 + [float("inf")]]]), hidden_size=8, max_rows=4)
