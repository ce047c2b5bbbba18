"""Hand memory freed by unloaded segments back to the operating system, and keep the heap compact.

glibc keeps freed heap pages for reuse, and after large frees it raises its mmap threshold, so the
weights of a released segment stay in the process's resident set. A node that loads and releases
segments as plans change would then look (to the OS, to an operator, to an OOM killer) as if it still
held them. ``malloc_trim`` returns the free pages. glibc also gives every thread that allocates its own
arena (up to 8 per core); a node's threads (torch, gRPC, loaders) each then keep a fragmented heap of
their own. Two arenas are enough for one torch thread. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

M_ARENA_MAX = -8  # glibc's mallopt parameter
NODE_ARENAS = 2


def _libc_function(symbol: str) -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function: Callable[..., int] | None = getattr(ctypes.CDLL(name), symbol, None)
    except OSError:
        return None
    return function


_TRIM = _libc_function("malloc_trim")


def limit_arenas(arenas: int = NODE_ARENAS) -> bool:
    """Cap glibc's malloc arenas (call before the process starts its threads); True when it took.

    Measured with ``bench/soak.py`` (300 s, 16 sessions, a fault every 30 s; one run each): the default
    arenas left node-2's memory floor rising (854 -> 998 MB), two arenas kept every floor stable."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, arenas))


def return_freed_memory() -> bool:
    """True when the C allocator handed pages back (glibc only)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
