"""Hand memory freed by unloaded segments back to the operating system.

glibc keeps freed heap pages for reuse, and after large frees it raises its mmap threshold, so the
weights of a released segment stay in the process's resident set. A node that loads and releases
segments as plans change would then look (to the OS, to an operator, to an OOM killer) as if it still
held them. ``malloc_trim`` returns the free pages; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] | None = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None
    return trim


_TRIM = _malloc_trim()


def return_freed_memory() -> bool:
    """True when the C allocator handed pages back (glibc only)."""
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
