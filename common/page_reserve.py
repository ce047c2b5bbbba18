"""Warm pages for decrypted weights: the mappings released layers leave, wiped and kept a while for the next load.

A decrypted layer needs memory, and memory the process has never touched is slow to get: on the reference
VM the kernel hands out fresh pages at about 2.4 GB/s (faults, zeroing, the host backing them), against
9-10 GB/s for AES-GCM decrypting into pages the process already holds. A plaintext store's layers pay none
of it (they are the page cache), so without a reserve an encrypted store loses most of a re-split's time to
page faults (bench/reconfig.py --encrypted).

So a node given ``--weight-reserve-s`` (off by default) keeps the mapping of each layer it releases, wiped
at once (no plaintext outlives its segment; about 6 ms for 226 MB), and unmaps it after ``keep_s`` seconds.
A load of about the same size within that time decrypts into it. The reserve never holds more than the
layers released since, which the node held until then anyway (so a plan change needs no more memory at its
peak than the last one did), and never more than ``limit_bytes``. (``MADV_FREE`` would let the kernel take
kept pages under pressure, but writing them again cost 14 ms per 226 MB here, two thirds of the decryption.)

Each blob gets a mapping of its own, not C heap, with or without a reserve: glibc raises its mmap threshold
after a large free (up to 32 MB), and from then on every layer (14 MB in fp32) would come from the heap,
where a released one leaves holes among live blocks. On a node whose plan changes again and again those
holes kept hundreds of megabytes resident beyond the weights it held (bench/soak.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SIZE_SLACK = 1 / 16  # a kept mapping serves a load at most this much smaller than itself


@dataclass
class _Kept:
    mapping: mmap.mmap
    since: float


class PageReserve:
    """Anonymous mappings for decrypted blobs; with ``keep_s`` > 0, released ones wait here for reuse."""

    def __init__(self, keep_s: float = 0.0, limit_bytes: int = 1 << 30) -> None:
        self.keep_s = keep_s
        self.limit_bytes = limit_bytes
        self._kept: list[_Kept] = []
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.reused = 0  # loads served from the reserve (for tests and logs)
        self.fresh = 0  # loads that needed new pages

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat writable uint8 tensor of ``nbytes`` over a mapping of its own (its pages zero or wiped). With a
        reserve, the mapping comes back here when the tensor's last view goes; without, it is unmapped then."""
        import numpy as np  # imported here: the operator CLI opens stores without loading torch
        import torch

        mapping = self._reuse(nbytes)
        if mapping is None:
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if self.keep_s <= 0:
                return torch.frombuffer(mapping, dtype=torch.uint8)
        array = np.frombuffer(mapping, dtype=np.uint8, count=nbytes)
        finalizer = weakref.finalize(array, self._give_back, mapping)  # torch's storage holds ``array``
        finalizer.atexit = False  # at exit the mapping may still be in use: it goes with the process
        return torch.from_numpy(array)

    def held_bytes(self) -> int:
        """Bytes of released mappings kept here now."""
        with self._lock:
            return sum(len(k.mapping) for k in self._kept)

    def expire(self, now: float | None = None) -> None:
        """Unmap what has waited ``keep_s`` or longer."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._timer = None
            busy = []
            for k in [k for k in self._kept if now - k.since >= self.keep_s]:
                try:
                    k.mapping.close()
                except BufferError:  # its last array is still being freed: the next round unmaps it
                    busy.append(k)
                    continue
                self._kept.remove(k)
            if busy:
                self._schedule(0.05)
            elif self._kept:
                self._schedule(min(k.since for k in self._kept) + self.keep_s - now)

    def clear(self) -> None:
        """Unmap everything kept now (a process that ends need not: its mappings go with it)."""
        with self._lock:
            kept, self._kept = self._kept, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for k in kept:
            with contextlib.suppress(BufferError):  # one whose array is still being freed goes with its object
                k.mapping.close()

    def _reuse(self, nbytes: int) -> mmap.mmap | None:
        """The smallest kept mapping that fits ``nbytes`` (None: new pages), counted either way; several
        decryption threads take at once, so the counts change under the lock."""
        with self._lock:
            fits = [k for k in self._kept if nbytes <= len(k.mapping) <= nbytes + nbytes * SIZE_SLACK]
            if not fits:
                self.fresh += 1
                return None
            self.reused += 1
            best = min(fits, key=lambda k: len(k.mapping))
            self._kept.remove(best)
            return best.mapping

    def _give_back(self, mapping: mmap.mmap) -> None:
        """The last view of ``mapping`` went: wipe it and keep it. This runs while that view's array is being
        freed, so nothing is unmapped here: what goes over the limit (oldest first) is marked expired and the
        timer unmaps it at once."""
        _wipe(mapping)
        with self._lock:
            now = time.monotonic()
            self._kept.append(_Kept(mapping, now))
            excess = self.held_bytes() - self.limit_bytes
            over = excess > 0
            for k in self._kept:
                if excess <= 0:
                    break
                k.since, excess = now - self.keep_s, excess - len(k.mapping)
            if over:
                if self._timer is not None:
                    self._timer.cancel()
                self._schedule(0.0)
            elif self._timer is None:
                self._schedule(self.keep_s)

    def _schedule(self, delay: float) -> None:
        self._timer = threading.Timer(max(0.0, delay) + 0.01, self.expire)
        self._timer.daemon = True
        self._timer.start()


def _wipe(mapping: mmap.mmap) -> None:
    """Zero the mapping's pages (GIL released; about 6 ms for 226 MB here)."""
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        ctypes.memset(ctypes.addressof(anchor), 0, len(mapping))
    finally:
        del anchor
