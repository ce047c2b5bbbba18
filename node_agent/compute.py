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


class DueRow:
    """A merging head session's next decode row, as the compute thread counts it (its lock guards ``state``)."""

    IDLE, RUNNING, BACK = range(3)

    def __init__(self) -> None:
        self.state = DueRow.IDLE
        self.closed = False  # the session is gone: never counted again


class ComputeThread:
    """Serialises model work so sessions never fight over cores, and never blocks the event loop."""

    def __init__(self, max_batch_rows: int = 1, gather_s: float = 0.0,
                 expected_rows: Callable[[], int] | None = None, merge_s: float = 0.0) -> None:
        self._batcher = StepBatcher(max_batch_rows)
        self._max_rows = max_batch_rows
        self._gather_s = gather_s
        self._quiet_s = gather_s / GATHER_QUIET_PARTS
        self._expected_rows = expected_rows
        self._merge_s = merge_s
        self._coming = 0  # merging sessions whose decode step runs (here or in the ring): their next row is due
        self._back = 0  # ... whose token is back and whose next row is not put yet (row_back)
        self._last_back = 0.0
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
        """Run one session's segments; decode rows that wait together are batched.

        Every session of a forward is woken in one pass of the event loop (:func:`_wake_all`), so the rows a
        batched forward made leave together as one message per peer (node_agent/row_link.py)."""
        job.waiter = asyncio.get_running_loop().create_future()
        self._put(job)
        try:
            return await job.waiter
        except asyncio.CancelledError:
            job.future.cancel()  # not started yet: the thread drops it
            raise

    def row_back(self, due: DueRow) -> None:
        """The session's token is home: its next row follows as soon as it has handed the token on (a round waits
        for it at most ``gather_s`` after the last such return, so a session whose client reads slowly holds
        up the others no longer than that)."""
        with self._wake:
            if due.state == DueRow.RUNNING:
                self._coming -= 1
                self._back += 1
                due.state = DueRow.BACK
                self._last_back = time.monotonic()
                self._wake.notify()

    def forget(self, due: DueRow) -> None:
        """The session's next row will not come (it ended, or failed over)."""
        with self._wake:
            self._settle_due(due)
            due.closed = True
            self._wake.notify()

    def _settle_due(self, due: DueRow) -> None:
        if due.state == DueRow.RUNNING:
            self._coming -= 1
        elif due.state == DueRow.BACK:
            self._back -= 1
        due.state = DueRow.IDLE

    def _put(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise RuntimeError("the compute thread is shut down")
            self._waiting.append(job)
            if isinstance(job, StepJob) and job.due is not None:
                self._settle_due(job.due)
            self._last_put = time.monotonic()
            self._wake.notify()

    def _loop(self) -> None:
        # Each round in a call of its own: nothing of a finished round (its jobs hold runners, caches and
        # tensors) stays named while the thread waits for the next, so a node taken out of a plan frees the
        # segments it released even if no work ever comes again.
        while self._round():
            pass

    def _round(self) -> bool:
        """Wait for jobs and run them as one round; False once the thread is shut down."""
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            self._gather()
            if self._closed:
                return False
            taken, self._waiting = self._waiting, []
            for job in taken:  # a merging session's decode row runs: its next one is due
                if (isinstance(job, StepJob) and job.due is not None and job.rows == 1 and not job.due.closed
                        and not job.future.cancelled()):
                    job.due.state = DueRow.RUNNING
                    self._coming += 1
        # A job whose caller went away (cancelled) before the thread reached it is dropped here.
        running = [job for job in taken if job.future.set_running_or_notify_cancel()]
        _wake_all([job for job in taken if isinstance(job, StepJob) and job.future.cancelled()])
        self._batcher.run_round(running, _wake_all)
        self.rounds_done += 1  # one writer (this thread); readers only compare successive values
        return True

    def _gather(self) -> None:
        """Hold the round open while decode rows of more sessions are still arriving (the lock is held).

        On a head that merges micro-batches (``merge_s`` > 0 and jobs with a :class:`DueRow`; node_agent/pipeline.py
        decides per plan), a round of decode rows first waits, up to ``merge_s``, for the rows of its sessions
        whose decode step still runs (here, or in the ring), and up to ``gather_s`` after the last of their
        tokens came home for those sessions to put their rows (:meth:`row_back`): nodes that share cores run
        one batch of all sessions more cheaply than several micro-batches that take turns on the same cores.

        The rows of one batch reach the next node as one message, but its sessions put their jobs a few
        milliseconds apart (and a head's sessions put theirs as their tokens come home); taking the first
        alone would cost a whole forward for one row, and the split would persist step after step. So while
        fewer batchable jobs (decode rows, first prefill chunks) wait than the node has sessions, the round
        waits for more, until a quiet gap of ``gather_s / GATHER_QUIET_PARTS`` or ``gather_s`` in all.
        A node with one session never waits.
        """
        if self._gather_s <= 0.0 or self._max_rows <= 1 or self._expected_rows is None:
            return
        now = time.monotonic()
        deadline = now + self._gather_s
        merge_until = now + self._merge_s
        while not self._closed:
            rows = sum(1 for job in self._waiting if isinstance(job, StepJob) and job.batchable)
            if rows == 0 or rows >= self._max_rows:
                return
            if rows == len(self._waiting):  # only batchable rows wait: merge in the rows still in the ring
                left = max(merge_until - time.monotonic() if self._coming > 0 else 0.0,
                           self._last_back + self._gather_s - time.monotonic() if self._back > 0 else 0.0)
                if left > 0.0:
                    self._wake.wait(left)
                    continue
            if rows >= min(self._max_rows, self._expected_rows()):
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
            _wake_all([job for job in self._waiting if isinstance(job, StepJob)])
            self._waiting.clear()
            self._wake.notify()


def _wake_all(jobs: list[StepJob]) -> None:
    """Hand a round's results to their awaiting coroutines with one call into each event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[StepJob]] = {}
    for job in jobs:
        if job.waiter is not None:
            by_loop.setdefault(job.waiter.get_loop(), []).append(job)
    for loop, waiting in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_waiters, waiting)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            continue


def _settle_waiters(jobs: list[StepJob]) -> None:
    for job in jobs:
        waiter = job.waiter
        if waiter is None or waiter.done():
            continue
        if job.future.cancelled():
            waiter.cancel()
        elif job.future.exception() is not None:
            waiter.set_exception(job.future.exception())  # type: ignore[arg-type]
        else:
            waiter.set_result(job.future.result())
