"""One thread owns torch on a node: the asyncio side queues work for it and awaits the result.

The thread takes everything that waits whenever it becomes free and hands that round to the
:class:`~node_agent.step_batcher.StepBatcher`, so sessions that are ready together share a forward.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar, cast

from node_agent.step_batcher import CallJob, Job, StepBatcher, StepJob, StepResult

T = TypeVar("T")


class ComputeThread:
    """Serialises model work so sessions never fight over cores, and never blocks the event loop."""

    def __init__(self, max_batch_rows: int = 1) -> None:
        self._batcher = StepBatcher(max_batch_rows)
        self._waiting: list[Job] = []
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
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                taken, self._waiting = self._waiting, []
            # A job whose caller went away (cancelled) before the thread reached it is dropped here.
            self._batcher.run_round([job for job in taken if job.future.set_running_or_notify_cancel()])
            self.rounds_done += 1  # one writer (this thread); readers only compare successive values

    def shutdown(self) -> None:
        with self._wake:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            self._wake.notify()
