"""One thread owns torch on a node: the asyncio side queues work for it and awaits the result.

The thread takes everything that waits whenever it becomes free and hands that round to the
:class:`~node_agent.step_batcher.StepBatcher`, so sessions that are ready together share a forward.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import TypeVar, cast

from node_agent.step_batcher import CallJob, Job, StepBatcher, StepJob, StepResult

T = TypeVar("T")

GATHER_QUIET_PARTS = 4  # a gap of this fraction of the gather window between arrivals ends the wait


class ComputeThread:
    """Serialises model work so sessions never fight over cores, and never blocks the event loop."""

    def __init__(self, max_batch_rows: int = 1, gather_s: float = 0.0,
                 expected_rows: Callable[[], int] | None = None) -> None:
        self._batcher = StepBatcher(max_batch_rows)
        self._max_rows = max_batch_rows
        self._gather_s = gather_s
        self._quiet_s = gather_s / GATHER_QUIET_PARTS
        self._expected_rows = expected_rows
        self._waiting: list[Job] = []
        self._last_put = 0.0
        self._wake = threading.Condition()
        self._closed = False
        self.rounds_done = 0  # rounds finished: progress a waiting head can read (see ProbeReply.compute_rounds)
        self._thread = threading.Thread(target=self._loop, name="torch", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        job = CallJob(fn, args)
        self._put(job)
        return cast(T, await asyncio.wrap_future(job.future))

    async def step(self, job: StepJob) -> StepResult:
        """Run one session's segments; decode rows that wait together are batched."""
        self._put(job)
        return await asyncio.wrap_future(job.future)

    def _put(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the compute thread is shut down")
            self._waiting.append(job)
            self._last_put = time.monotonic()
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                self._gather()
                if self._closed:
                    return
                taken, self._waiting = self._waiting, []
            # A job whose caller went away (cancelled) before the thread reached it is dropped here.
            self._batcher.run_round([job for job in taken if job.future.set_running_or_notify_cancel()])
            self.rounds_done += 1  # one writer (this thread); readers only compare successive values

    def _gather(self) -> None:
        """Hold the round open while decode rows of more sessions are still arriving (the lock is held).

        The rows of one batch reach the next node as one message per session, spread over a few
        milliseconds; taking the first alone would cost a whole forward for one row, and the split would
        persist step after step. So while fewer batchable jobs (decode rows, first prefill chunks) wait than
        the node has sessions, the round waits for more, until a quiet gap of ``gather_s /
        GATHER_QUIET_PARTS`` or ``gather_s`` in all.
        A node with one session never waits.
        """
        if self._gather_s <= 0.0 or self._max_rows <= 1 or self._expected_rows is None:
            return
        deadline = time.monotonic() + self._gather_s
        while not self._closed:
            rows = sum(1 for job in self._waiting if isinstance(job, StepJob) and job.batchable)
            if rows == 0 or rows >= min(self._max_rows, self._expected_rows()):
                return
            until = min(deadline, self._last_put + self._quiet_s)
            left = until - time.monotonic()
            if left <= 0.0:
                return
            self._wake.wait(left)

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._wake.notify()
