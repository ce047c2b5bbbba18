"""One OpenMP team per node: torch runs many-threaded on the compute thread alone.

Any thread that runs a large enough torch op (a finiteness check of a prefill activation, a copy, the
warm-up of a segment loaded off the event loop) makes libgomp start a team of workers for that thread,
and the team stays. Once the process has more OpenMP threads than cores, libgomp throttles every
worker's wait to a hundred spins, so the compute thread's workers sleep between the many small kernels
of a decode step and each kernel pays a futex wake-up. Measured on a 2-core box, int8 layers 10-20 at
one row, libgomp's default spin: 3.6-4.0 ms per step with one team, 7.8-8.6 ms once a second thread had
run one parallel op.

So every node thread but the compute thread runs torch ops on itself alone: its OpenMP and MKL thread
counts (both per-thread settings) are 1, and it never starts a team. torch's own ``set_num_threads``
cannot do this: it also changes the default every later thread starts from.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Per-thread thread-count setters, by symbol, and the libraries that may export them: OpenMP's own (the
# count at::parallel_for reads) and MKL's (its vector maths, e.g. the cos of the rotary tables, starts
# OpenMP teams of its own size; the mixed-case name is its C entry, by value). torch's wheels link MKL into
# libtorch_cpu.
_SETTERS = {"omp_set_num_threads": ("libgomp", "libiomp5", "libomp"),
            "MKL_Set_Num_Threads_Local": ("libtorch_cpu", "libmkl_rt", "libmkl_core")}


def _loaded_setters() -> list[Callable[[int], object]]:
    """The per-thread setters the libraries this process loaded export (empty where there is no /proc)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    fields = (line.split(maxsplit=5) for line in maps)
    paths = dict.fromkeys(f[5] for f in fields if len(f) == 6)  # the mapped file, where there is one
    setters: list[Callable[[int], object]] = []
    for symbol, libraries in _SETTERS.items():
        for path in paths:
            if not Path(path).name.startswith(libraries):
                continue
            try:
                setter = getattr(ctypes.CDLL(path), symbol)
            except (OSError, AttributeError):
                continue
            setter.argtypes = [ctypes.c_int]
            setters.append(setter)
            break
    return setters


_setters = _loaded_setters()


def single_threaded_here() -> bool:
    """Make torch ops of the calling thread run on it alone, starting no OpenMP team; whether it could."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count on its first use there: let it, then override
    for setter in _setters:
        setter(1)
    return len(_setters) == len(_SETTERS) and torch.get_num_threads() == 1


def confined_executor(thread_name_prefix: str, max_workers: int | None = None) -> ThreadPoolExecutor:
    """A thread pool whose threads are :func:`single_threaded_here` from their start."""
    return ThreadPoolExecutor(max_workers, thread_name_prefix=thread_name_prefix, initializer=single_threaded_here)
