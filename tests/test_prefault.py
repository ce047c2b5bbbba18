"""common/prefault.py: fresh buffers are mapped before decryption writes them, and a kernel without the
call costs nothing but speed."""

from __future__ import annotations

import ctypes
import mmap
import sys
from pathlib import Path

import pytest
import torch

from common import prefault as prefault_module
from common.prefault import _Populator, prefault

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mincore are Linux calls")


def resident_share(tensor: torch.Tensor) -> float:
    """Share of the tensor's whole pages that are in memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    pages = (last - first) // page
    vec = ctypes.create_string_buffer(pages)
    assert libc.mincore(first, last - first, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw) / pages


def test_a_fresh_buffer_is_resident_after_prefault() -> None:
    buffer = torch.empty(64 << 20, dtype=torch.uint8)  # large enough that malloc maps it fresh
    assert resident_share(buffer) < 0.1
    if not prefault(buffer):
        pytest.skip("this kernel has no MADV_POPULATE_WRITE")
    assert resident_share(buffer) == 1.0
    buffer.fill_(7)  # still ordinary, writable memory
    assert int(buffer[-1]) == 7


def test_only_contiguous_cpu_memory_is_populated() -> None:
    strided = torch.empty(1024, 1024, dtype=torch.uint8).t()
    assert not prefault(strided)
    assert not prefault(torch.empty(16, dtype=torch.uint8))  # no whole page inside


def test_a_kernel_that_refuses_is_not_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def refusing(address: int, length: int, advice: int) -> int:
        calls.append(advice)
        ctypes.set_errno(22)  # EINVAL: what a kernel before 5.14 answers
        return -1

    populator = _Populator()
    monkeypatch.setattr(populator, "_madvise", refusing)
    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    assert not populator(buffer)
    assert not populator(buffer)
    assert calls == [prefault_module.MADV_POPULATE_WRITE]


def test_the_store_decrypts_into_populated_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common import model_store

    seen: list[float] = []

    def recording(tensor: torch.Tensor) -> bool:
        done = prefault(tensor)
        seen.append(resident_share(tensor) if done else -1.0)
        return done

    monkeypatch.setattr(model_store, "prefault", recording)
    store = model_store.ModelStore(tmp_path)
    plaintext = bytes(range(256)) * (48 << 10)  # 12 MiB
    entry = store.put_encrypted_blob(plaintext)
    assert bytes(store.plain_bytes(entry).numpy()) == plaintext
    assert len(seen) == 1 and seen[0] in (1.0, -1.0)
