"""How the compute thread runs what is waiting: decode rows of many sessions as one forward.

Everything a node computes arrives as work on the compute thread's queue. When the thread becomes
free it takes all that waits and hands it here. Decode steps (one token row) of sessions on the same
local segments run as one batch through transformers' decoder layers, each row with its own position,
history and padding mask (node_agent/batched_cache.py). The first prefill chunks of sessions that start
together run as one right-padded forward when they pad well (:func:`run_prefill_batch`); everything else
runs alone, in arrival order.
A group of one, or ``max_rows`` of 1, runs exactly the single-session code, bit for bit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import DynamicCache

from node_agent.batched_cache import SessionCache
from node_agent.metrics_registry import BATCH_ROWS
from node_agent.sampler import SamplingConfig, sample
from node_agent.segment import SegmentRunner

if TYPE_CHECKING:
    from node_agent.compute import DueRow

log = logging.getLogger(__name__)
# A batched prefill (first chunks of several sessions, right-padded to the longest) carries at most this many
# padded tokens: about what 8 prompts of a chat turn make, so one round stays short.
PREFILL_BATCH_TOKENS = 2048

StepResult = torch.Tensor | int
# (token rows, decode: one row per session, seconds in decoder layers, seconds in all). A batched forward
# reports all its rows as decode, so a node's per-row decode cost is not inflated under load.
OnDone = Callable[[int, bool, float, float], None]


@dataclass(eq=False)
class StepJob:
    """One session's run of its local segments: hidden states out, or a sampled token on the tail."""

    runners: tuple[SegmentRunner, ...]
    caches: tuple[DynamicCache, ...]
    inputs: torch.Tensor  # token ids [1, n] (first span) or hidden states [1, n, H]
    position: int
    sampling: SamplingConfig | None = None  # set: the last runner samples and the result is the token id
    step: int = 0
    on_done: OnDone | None = None
    future: Future[StepResult] = field(default_factory=Future)
    waiter: asyncio.Future[StepResult] | None = None  # the awaiting coroutine's (node_agent/compute.py)
    due: DueRow | None = None  # a merging head session's: its next row is counted due while this one runs
    shared: bool = False  # set when run: its forward carried other sessions' rows too (they leave together)

    @property
    def rows(self) -> int:
        return int(self.inputs.shape[1])

    @property
    def batchable(self) -> bool:
        """A decode row, or a first prefill chunk: the jobs that share forwards with others."""
        return self.rows == 1 or self.position == 0

    def group(self) -> tuple[int, ...]:
        """Jobs with the same key may share a forward: they run the very same segment objects."""
        return tuple(id(r) for r in self.runners)


@dataclass(eq=False)
class CallJob:
    """Any other work that must own torch (loading a segment, warming it up)."""

    fn: Callable[..., object]
    args: tuple[object, ...]
    future: Future[object] = field(default_factory=Future)


Job = StepJob | CallJob


def run_one(job: StepJob) -> StepResult:
    """One session alone: today's exact path (per-session cache, no padding)."""
    started = time.perf_counter()
    hidden = job.inputs
    in_layers = 0.0
    for runner, cache in zip(job.runners, job.caches, strict=True):
        hidden, seconds = runner.run_timed(cache, hidden, job.position)
        in_layers += seconds
    if job.on_done is not None:
        job.on_done(job.rows, job.rows == 1, in_layers, time.perf_counter() - started)
    if job.sampling is None:
        return hidden
    return sample(job.runners[-1].last_logits(hidden), job.sampling, job.step)


def run_batch(jobs: list[StepJob]) -> list[StepResult]:
    """Decode rows of ``jobs`` (same runners, one row each) as one forward per segment; results in the
    order of ``jobs``."""
    order = _group_order(jobs)
    if order != list(range(len(jobs))):
        results = run_batch([jobs[i] for i in order])
        placed: list[StepResult] = [0] * len(jobs)
        for result, index in zip(results, order, strict=True):
            placed[index] = result
        return placed
    started = time.perf_counter()
    hidden = torch.cat([job.inputs for job in jobs])
    positions = [job.position for job in jobs]
    in_layers = 0.0
    for index, runner in enumerate(jobs[0].runners):
        hidden, seconds = runner.run_batch_timed([job.caches[index] for job in jobs], hidden, positions)
        in_layers += seconds
    BATCH_ROWS.observe(len(jobs))
    head = jobs[0]
    if head.on_done is not None:  # once per forward: every row of it is a decode row, and waited this long
        head.on_done(len(jobs), True, in_layers, time.perf_counter() - started)
    if head.sampling is None:
        return [hidden[row:row + 1] for row in range(len(jobs))]
    return _sampled(jobs, hidden)


def run_prefill_batch(jobs: list[StepJob]) -> list[StepResult]:
    """First prefill chunks of ``jobs`` (same runners, empty caches) as one right-padded forward per segment."""
    started = time.perf_counter()
    hidden = [job.inputs for job in jobs]
    in_layers = 0.0
    for index, runner in enumerate(jobs[0].runners):
        hidden, seconds = runner.run_prefill_batch_timed([job.caches[index] for job in jobs], hidden)
        in_layers += seconds
    head = jobs[0]
    if head.on_done is not None:  # once per forward, with every prompt token it carried
        head.on_done(sum(job.rows for job in jobs), False, in_layers, time.perf_counter() - started)
    if head.sampling is None:
        return list(hidden)
    return _sampled(jobs, torch.cat([h[:, -1:] for h in hidden]))


def _sampled(jobs: list[StepJob], last_rows: torch.Tensor) -> list[StepResult]:
    """On the tail: each session's token, sampled from its row of ``last_rows`` (``[B, 1, H]``)."""
    logits = jobs[0].runners[-1].last_logits_batch(last_rows)
    return [sample(logits[row], job.sampling, job.step) for row, job in enumerate(jobs)
            if job.sampling is not None]


def _decode_fits(batch: list[StepJob], other: StepJob) -> bool:
    """Decode rows share a forward with any number of other decode rows."""
    return other.rows == 1


def _prefill_fits(batch: list[StepJob], other: StepJob) -> bool:
    """A first prefill chunk joins if the forward stays at most a third padding and PREFILL_BATCH_TOKENS."""
    if other.position != 0 or other.rows < 2:
        return False
    rows = [job.rows for job in batch] + [other.rows]
    padded = len(rows) * max(rows)
    return padded <= PREFILL_BATCH_TOKENS and padded * 2 <= sum(rows) * 3


def _group_order(jobs: list[StepJob]) -> list[int]:
    """Job indices in the row order of the decode group their first caches form (node_agent/batched_cache.py),
    so a batch of the same sessions as the last step keeps its group whatever order its rows arrived in."""
    first = jobs[0].caches[0]
    group = first.group if isinstance(first, SessionCache) else None
    rows = [group.row_of(job.caches[0]) for job in jobs] if group is not None else []
    if not rows or any(row is None for row in rows):
        return list(range(len(jobs)))
    return sorted(range(len(jobs)), key=lambda index: rows[index] or 0)


class StepBatcher:
    """Runs one round of waiting work; decode rows of a group share forwards of at most ``max_rows``."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows

    def run_round(self, jobs: list[Job], settled: Callable[[list[StepJob]], None] | None = None) -> None:
        """Run every job (already marked running) and settle its future; ``settled`` hears of each forward's
        jobs as soon as their futures are set (node_agent/compute.py wakes them together)."""
        done: set[int] = set()
        for index, job in enumerate(jobs):
            if index in done:
                continue
            done.add(index)
            if isinstance(job, CallJob):
                _settle(job.future, partial(job.fn, *job.args))
                continue
            batch = [job]
            if job.rows == 1 and self.max_rows > 1:
                batch += self._companions(jobs, index, done, _decode_fits)
            elif job.position == 0 and self.max_rows > 1:
                batch += self._companions(jobs, index, done, _prefill_fits)
            for member in batch:
                member.shared = len(batch) > 1
            if len(batch) == 1:
                _settle(job.future, partial(run_one, job))
            elif job.rows == 1:
                self._run_batch(batch, run_batch)
            else:
                self._run_batch(batch, run_prefill_batch)
            if settled is not None:
                settled(batch)

    def _companions(self, jobs: list[Job], index: int, done: set[int],
                    fits: Callable[[list[StepJob], StepJob], bool]) -> list[StepJob]:
        """Later jobs of the same group that ``fits`` admits beside those taken, up to the batch limit, each
        cache at most once."""
        first = jobs[index]
        assert isinstance(first, StepJob)
        key = first.group()
        seen = {id(c) for c in first.caches}
        batch = [first]
        for later in range(index + 1, len(jobs)):
            if len(batch) >= self.max_rows:
                break
            other = jobs[later]
            if (later in done or not isinstance(other, StepJob) or other.group() != key
                    or any(id(c) in seen for c in other.caches) or not fits(batch, other)):
                continue
            seen.update(id(c) for c in other.caches)
            batch.append(other)
            done.add(later)
        return batch[1:]

    @staticmethod
    def _run_batch(batch: list[StepJob], run: Callable[[list[StepJob]], list[StepResult]]) -> None:
        try:
            results = run(batch)
        except Exception as exc:  # every row of a failed forward hears why
            log.exception("batched step of %d sessions failed", len(batch))
            for job in batch:
                job.future.set_exception(exc)
            return
        for job, result in zip(batch, results, strict=True):
            job.future.set_result(result)


def _settle(future: Future[object] | Future[StepResult], fn: Callable[[], object]) -> None:
    try:
        result = fn()
    except BaseException as exc:  # the awaiting coroutine re-raises it
        future.set_exception(exc)
        return
    future.set_result(result)  # type: ignore[arg-type]
