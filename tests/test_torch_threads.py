"""node_agent/torch_threads.py: a node thread other than the compute thread starts no OpenMP team.

A second team in the process makes libgomp throttle the compute thread's workers (see the module), so
this checks the thing itself: the threads the process has before and after torch ops that would start
a team, OpenMP's own parallel loops and MKL's vector maths alike."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from node_agent.torch_threads import confined_executor, single_threaded_here

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")

OPS: dict[str, Callable[[torch.Tensor], object]] = {
    "finite check (at::parallel_for)": lambda x: bool(torch.isfinite(x).all()),
    "cos (MKL vector maths)": lambda x: x.cos(),
    "add (TensorIterator)": lambda x: x + 1,
}


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _new_threads_of(op: Callable[[torch.Tensor], object], confine: bool) -> tuple[int, bool]:
    """(threads the process gained while a fresh thread ran ``op``, what single_threaded_here answered)."""
    out: list[tuple[int, bool]] = []

    def run() -> None:
        confined = single_threaded_here() if confine else False
        x = torch.randn(2048, 2048)
        before = _threads()
        op(x)
        out.append((_threads() - before, confined))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.parametrize("name", list(OPS))
def test_a_confined_thread_starts_no_team(name: str) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # what a node on 2 cores runs with
    try:
        gained, confined = _new_threads_of(OPS[name], confine=True)
        assert confined
        assert gained == 0
        unconfined, _ = _new_threads_of(OPS[name], confine=False)
    finally:
        torch.set_num_threads(previous)
    assert unconfined >= 1  # the same op on an ordinary thread does start a team: the check can fail


def test_only_the_calling_thread_is_confined() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen: list[int] = []

        def confine_and_look() -> None:
            single_threaded_here()
            seen.append(torch.get_num_threads())

        confined = threading.Thread(target=confine_and_look)
        confined.start()
        confined.join()
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 2]  # the default a new thread (the compute thread) starts from is untouched


def test_the_node_executors_are_confined() -> None:
    """The pools a node runs plan loads and tokenizing on (node_agent/server.py, node_agent/runtime.py)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with confined_executor("test", max_workers=1) as pool:
            assert pool.submit(torch.get_num_threads).result() == 1

            def gained_by_cos() -> int:
                x = torch.randn(2048, 2048)
                before = _threads()
                x.cos()
                return _threads() - before

            assert pool.submit(gained_by_cos).result() == 0  # no team beside the pool's own thread
    finally:
        torch.set_num_threads(previous)
