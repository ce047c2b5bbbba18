"""The reserve of released decrypted-layer memory (common.page_reserve) and the store's use of it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from common import blob_crypto
from common.blob_crypto import encrypt_blob, peek_plaintext
from common.model_store import TENSOR_ALIGN, ModelStore, tensors_to_bytes
from common.page_reserve import PageReserve

MB = 1 << 20


def _anon_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _until(condition: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_released_mapping_is_wiped_and_serves_the_next_load_of_its_size() -> None:
    reserve = PageReserve(keep_s=60)
    first = reserve.take(MB)
    address = first.data_ptr()
    first.fill_(0x5A)
    del first
    assert reserve.held_bytes() == MB
    second = reserve.take(MB)
    assert second.data_ptr() == address
    assert int(second.count_nonzero()) == 0  # wiped: nothing of the released layer is left in it
    assert (reserve.reused, reserve.fresh, reserve.held_bytes()) == (1, 1, 0)
    reserve.clear()


def test_a_view_keeps_its_mapping_out_of_the_reserve() -> None:
    reserve = PageReserve(keep_s=60)
    flat = reserve.take(MB)
    view = flat[4096:8192].view(torch.float32)
    del flat
    assert reserve.held_bytes() == 0
    view.fill_(1.0)  # still its memory
    del view
    assert reserve.held_bytes() == MB
    reserve.clear()


def _touch_and_release(reserve: PageReserve, nbytes: int) -> float:
    """Anonymous RSS (MiB) before ``nbytes`` were taken from ``reserve``, written and released."""
    before = _anon_rss_mb()
    flat = reserve.take(nbytes)
    flat.fill_(1)
    del flat
    return before


def test_kept_memory_goes_back_to_the_kernel_after_keep_s() -> None:
    reserve = PageReserve(keep_s=0.3)
    before = _touch_and_release(reserve, 64 * MB)
    assert reserve.held_bytes() == 64 * MB
    assert _anon_rss_mb() > before + 48  # kept: still resident
    assert _until(lambda: reserve.held_bytes() == 0)
    assert _anon_rss_mb() < before + 16


def test_the_reserve_never_keeps_more_than_its_limit() -> None:
    reserve = PageReserve(keep_s=60, limit_bytes=3 * MB)
    flats = [reserve.take(MB) for _ in range(5)]
    del flats
    assert _until(lambda: reserve.held_bytes() <= 3 * MB)
    reserve.clear()
    assert reserve.held_bytes() == 0


def test_without_a_reserve_released_memory_is_unmapped_at_once() -> None:
    reserve = PageReserve(keep_s=0)
    before = _touch_and_release(reserve, 64 * MB)
    assert reserve.held_bytes() == 0
    assert _anon_rss_mb() < before + 16
    reserve.take(64 * MB)
    assert reserve.reused == 0


@pytest.mark.parametrize("size", [512 * 1024, 2 * MB])
def test_a_load_of_another_size_gets_new_memory(size: int) -> None:
    reserve = PageReserve(keep_s=60)
    flat = reserve.take(MB)
    del flat
    other = reserve.take(size)
    assert other.numel() == size
    assert (reserve.reused, reserve.fresh, reserve.held_bytes()) == (0, 2, MB)
    reserve.clear()


@pytest.mark.parametrize("chunk_bytes", [blob_crypto.CHUNK_BYTES, 4096])
def test_peek_gives_the_first_plaintext_bytes(chunk_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blob_crypto, "CHUNK_BYTES", chunk_bytes)
    key, plain = os.urandom(32), os.urandom(10_000)
    sealed = encrypt_blob(key, plain, "ab" * 32)
    assert peek_plaintext(key, sealed, 8) == plain[:8]
    assert peek_plaintext(key, sealed, 16) == plain[:16]
    with pytest.raises(ValueError):
        peek_plaintext(key, sealed, 17)


def test_a_node_store_decrypts_a_layer_into_the_memory_another_one_released(tmp_path: Path) -> None:
    """As on a node after a plan change: the layers it released hold the next ones, aligned, with their own
    bytes (the reserve's wiped pages overwritten by the decryption)."""
    owner = ModelStore(tmp_path)
    blobs = [{"w": torch.randn(512, 512), "b": torch.randn(512)} for _ in range(2)]
    entries = [owner.put_encrypted_blob(tensors_to_bytes(t)) for t in blobs]
    assert entries[0].size == entries[1].size
    keys = {e.sha256: owner.keys[e.sha256] for e in entries}
    node = ModelStore(tmp_path, keys=keys, pages=PageReserve(keep_s=60))
    node.keep_resident(set())
    first = node.encrypted_tensors(entries[0], "layer.0")
    address = first["w"].data_ptr()
    node.keep_resident(set())  # released
    del first
    assert node.pages.held_bytes() > 0
    second = node.encrypted_tensors(entries[1], "layer.1")
    assert node.pages.reused == 1
    assert abs(second["w"].data_ptr() - address) < TENSOR_ALIGN * 2
    assert all(t.data_ptr() % TENSOR_ALIGN == 0 for t in second.values())
    assert all(torch.equal(second[k], v) for k, v in blobs[1].items())
    node.pages.clear()
