"""Is a step that waits for its token still moving? The head's one answer, shared by every session.

A step can wait long because its path is working (64 sessions replaying long prompts after a
re-split keep every node busy for a minute) or because a node is gone or stuck. A fixed deadline
cannot tell the two apart: it fails working sessions on a busy mesh and, set high, keeps a stuck
one waiting. So the head asks the nodes: each answers an empty probe with the number of compute
rounds it has finished. A node that does not answer is *silent*; a path whose counts stop moving
makes *no progress*. A step fails only when one of those has lasted ``hop_timeout_s``.

Probes are coalesced per peer: however many sessions wait, a peer gets at most one probe per
interval from this node.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from node_agent.hops import HopError

PROBE_TIMEOUT_S = 1.0  # a node that does not answer an empty probe this fast counts as silent
PROBE_INTERVAL_S = 0.5  # a peer is probed at most this often, however many steps wait on it


@dataclass(frozen=True)
class PeerReading:
    """One probe's answer: ``rounds`` is None when the peer did not answer in time."""

    rounds: int | None
    at: float  # time.monotonic() when the answer (or its absence) was known


ProbeFn = Callable[[str, str], Awaitable[int | None]]  # (node id, address) -> its compute rounds or None


class PeerProbes:
    """The latest reading of each peer, refreshed at most every ``interval_s`` by one probe in flight."""

    def __init__(self, probe: ProbeFn, interval_s: float = PROBE_INTERVAL_S) -> None:
        self._probe = probe
        self._interval_s = interval_s
        self._latest: dict[tuple[str, str], PeerReading] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[PeerReading]] = {}

    async def read(self, peer: str, address: str) -> PeerReading:
        key = (peer, address)
        latest = self._latest.get(key)
        if latest is not None and time.monotonic() - latest.at < self._interval_s:
            return latest
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._refresh(key))
            self._inflight[key] = task
        # shielded: one waiting step that gives up must not cancel the probe the others wait on
        return await asyncio.shield(task)

    async def read_all(self, view: PlanView, peers: list[str]) -> dict[str, PeerReading]:
        readings = await asyncio.gather(*(self.read(p, view.addresses[p]) for p in peers))
        return dict(zip(peers, readings, strict=True))

    async def _refresh(self, key: tuple[str, str]) -> PeerReading:
        try:
            rounds = await self._probe(*key)
            reading = PeerReading(rounds, time.monotonic())
            self._latest[key] = reading
            return reading
        finally:
            self._inflight.pop(key, None)


def grpc_probe(channel_for: Callable[[str, str], grpc.aio.Channel]) -> ProbeFn:
    """Probe a peer over its node channel: its compute rounds, or None when it does not answer in time."""

    async def probe(peer: str, address: str) -> int | None:
        try:
            reply = await pb_grpc.NodeStub(channel_for(address, peer)).Probe(pb.ProbeRequest(),
                                                                            timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return None
        return int(reply.compute_rounds)

    return probe


class PathWatch:
    """One waiting step's view of its path: which nodes are silent, and whether the path still moves.

    ``own_rounds`` reads this node's own compute count (the head is on the path too). Call
    :meth:`observe` with readings as they come; :meth:`stuck` says why the step should give up, if it should.
    """

    def __init__(self, view: PlanView, node_id: str, own_rounds: Callable[[], int], timeout_s: float) -> None:
        self.peers = sorted({s.node_id for s in view.segments if s.node_id != node_id})
        self._own_rounds = own_rounds
        self._timeout_s = timeout_s
        now = time.monotonic()
        self._counts: dict[str, int] = {}
        self._own = own_rounds()
        self._moved_at = now  # the last time any node on the path finished a round
        self._silent_since: dict[str, float] = {}
        self.silent: list[str] | None = None  # None until every peer has been read once

    def observe(self, readings: dict[str, PeerReading]) -> None:
        now = time.monotonic()
        own = self._own_rounds()
        if own != self._own:
            self._own, self._moved_at = own, now
        for peer, reading in readings.items():
            if reading.rounds is None:
                self._silent_since.setdefault(peer, reading.at)
                continue
            self._silent_since.pop(peer, None)
            before = self._counts.get(peer)
            if before is not None and reading.rounds != before:
                self._moved_at = max(self._moved_at, reading.at)
            self._counts[peer] = reading.rounds
        if all(p in readings for p in self.peers) or self.silent is not None:
            self.silent = sorted(self._silent_since)

    def stuck(self) -> str | None:
        """Why the step should fail now, or None while its path is alive and moving."""
        now = time.monotonic()
        for peer, since in sorted(self._silent_since.items()):
            if now - since >= self._timeout_s:
                return f"{peer} has not answered a probe for {now - since:.1f}s"
        if now - self._moved_at >= self._timeout_s:
            return f"no node on the path finished any work for {now - self._moved_at:.1f}s"
        return None

    @staticmethod
    def error(reason: str, waited_s: float) -> HopError:
        return HopError(grpc.StatusCode.UNAVAILABLE, f"no token from the ring after {waited_s:.1f}s: {reason}")
