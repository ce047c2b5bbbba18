"""Hand memory freed by unloaded segments and closed sessions back to the operating system.

Two things keep freed memory resident. Python frees an object caught in a reference cycle only in a
collection of its generation, and a node that has imported torch and transformers holds some 370,000
objects, so full collections are rare (and each took 200-240 ms on the 2-core dev box, all of it under
the GIL): a closed session or a released segment runner in a cycle kept its tensors for minutes.
:func:`freeze_startup_objects` takes what start-up imported out of the collector's sight, so full
collections are cheap and come often; :func:`return_freed_memory` collects before trimming.
Then glibc keeps freed heap pages for reuse, and after large frees it raises its mmap threshold, so the
weights of a released segment stay in the process's resident set. A node that loads and releases
segments as plans change would then look (to the OS, to an operator, to an OOM killer) as if it still
held them. ``malloc_trim`` returns the free pages; elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def freeze_startup_objects() -> int:
    """Move every object alive now (modules, classes, what imports built) to the collector's permanent
    generation: they live as long as the process, and no collection has to walk them again. Call it once,
    after start-up imports and before serving. Returns how many objects are frozen."""
    gc.collect()  # what start-up already dropped must not be frozen with the rest
    gc.freeze()
    return gc.get_freeze_count()


def return_freed_memory() -> bool:
    """Free what only reference cycles still hold, then trim the heap. True when the C allocator handed
    pages back (glibc only)."""
    gc.collect()
    if _TRIM is None:
        return False
    return bool(_TRIM(0))
