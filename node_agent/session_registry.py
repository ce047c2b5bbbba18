"""Every session a node serves, in one place: its slot, its pipelines, and the segments they hold.

A session holds one slot (node_agent/admission.py: taken without awaiting, so the limit holds under
any concurrency) and any number of pipelines: the head's generation from segment 0, the tail segment
the head may also host, a replay's stream on a newer epoch. Pipelines are keyed by (session id, epoch,
first segment), so a replayed session's new stream stays apart from a stale one of the old plan that a
stalled peer may still hold open. Opening takes the slot and the segments' runners; closing gives back
exactly what that open took, whatever fails in between.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from common.plan_view import PlanView
from common.spans import Span
from node_agent.admission import SessionSlots
from node_agent.hops import HopError
from node_agent.pipeline import SessionPipeline
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (session id, epoch, first segment index)
Acquire = Callable[[PlanView, int], Awaitable[list[SegmentRunner]]]  # the runners of this node's segments from one
Release = Callable[[str, list[SegmentRunner]], None]  # (model digest, runners) back to the segment pool
Build = Callable[[str, PlanView, int, list[SegmentRunner], SamplingConfig, Callable[[HopError], None] | None],
                 SessionPipeline]


class NotHostedError(Exception):
    """The requested segment is not placed on this node by the named plan."""


class SessionRegistry:
    def __init__(self, node_id: str, max_sessions: int, acquire: Acquire, release: Release, build: Build) -> None:
        self.node_id = node_id
        self.slots = SessionSlots(node_id, max_sessions)
        self._acquire = acquire
        self._release = release
        self._build = build
        self._pipelines: dict[Key, SessionPipeline] = {}
        self._models: dict[Key, str] = {}
        self._closed = 0  # pipelines closed since take_closed(): their caches went back to the heap

    @contextlib.contextmanager
    def slot(self, session_id: str) -> Iterator[None]:
        """Hold ``session_id``'s slot for the block (a generation at its head); SessionLimitError if full."""
        self.slots.take(session_id)
        try:
            yield
        finally:
            self.slots.give(session_id)

    async def open(self, session_id: str, view: PlanView, first: int, sampling: SamplingConfig,
                   on_failure: Callable[[HopError], None] | None = None) -> SessionPipeline:
        """The session's pipeline from segment ``first`` of ``view``; :meth:`close` gives back what it took.
        ``on_failure`` hears of a failure downstream of this node (the head learns through its token inbox)."""
        if view.segments[first].node_id != self.node_id:
            raise NotHostedError(f"epoch {view.epoch} places segment {first} on {view.segments[first].node_id}")
        self.slots.take(session_id)  # before any await
        key = (session_id, view.epoch, first)
        if key in self._pipelines:  # the upstream re-opened (a retry after a failure): the new stream wins
            log.info("session %s segment %d re-opened on epoch %d; closing the stale stream", session_id[:8], first,
                     view.epoch)
            self.close(session_id, first, view.epoch)
        try:
            runners = await self._acquire(view, first)
        except BaseException:
            self.slots.give(session_id)
            raise
        try:
            pipeline = self._build(session_id, view, first, runners, sampling, on_failure)
        except BaseException:
            self._release(view.model_digest, runners)
            self.slots.give(session_id)
            raise
        self._pipelines[key] = pipeline
        self._models[key] = view.model_digest
        return pipeline

    def close(self, session_id: str, first: int | None = None, epoch: int | None = None,
              only: SessionPipeline | None = None) -> None:
        """Free one pipeline of a session (``first`` and ``epoch`` given) or all of them on this node;
        with ``only``, just that pipeline, so a superseded stream never closes its replacement."""
        keys = [k for k, p in self._pipelines.items() if k[0] == session_id and (epoch is None or k[1] == epoch)
                and (first is None or k[2] == first) and (only is None or p is only)]
        for key in keys:
            pipeline = self._pipelines.pop(key)
            pipeline.close()
            self._release(self._models.pop(key), pipeline.runners)
            self.slots.give(session_id)
            self._closed += 1

    def take_closed(self) -> int:
        """Pipelines closed since the last call."""
        closed, self._closed = self._closed, 0
        return closed

    def pipelines(self) -> list[SessionPipeline]:
        return list(self._pipelines.values())

    def pipeline_count(self) -> int:
        return len(self._pipelines)

    def session_ids(self) -> set[str]:
        """Sessions with a pipeline here."""
        return {session_id for session_id, _, _ in self._pipelines}

    def holders(self) -> dict[tuple[str, Span], set[str]]:
        """Which sessions hold which segments: (model digest, span) -> session ids."""
        held: dict[tuple[str, Span], set[str]] = {}
        for key, pipeline in self._pipelines.items():
            for runner in pipeline.runners:
                held.setdefault((self._models[key], runner.span), set()).add(key[0])
        return held

    def __len__(self) -> int:
        """Sessions holding a slot (one per session id, however many pipelines it has)."""
        return len(self.slots)
