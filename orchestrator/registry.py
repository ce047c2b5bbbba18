"""Registered nodes and their latest reports: the live view of the cluster."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.proto import splitmesh_pb2 as pb

LINK_SETTLE_S = 3.0  # after a node registers, how long others' reports that it is unreachable are ignored


class AwakeClock:
    """Monotonic seconds that stand still while this process was not running (SIGSTOP, a frozen host).

    Liveness means "no report for N seconds of the orchestrator's own time": reports that sat unread in
    the socket while the orchestrator itself was paused say nothing about the nodes, and blaming them
    re-planned a healthy mesh ("lost node-0; the cluster has no nodes"). The clock is read at least every
    half second (control loop, reports), so a longer gap between two readings is a pause and left out.
    """

    def __init__(self, max_gap_s: float, source: Callable[[], float] = time.monotonic) -> None:
        self.max_gap_s = max_gap_s
        self._source = source
        self._last = source()
        self._paused = 0.0

    def __call__(self) -> float:
        now = self._source()
        if now - self._last > self.max_gap_s:
            self._paused += now - self._last
        self._last = now
        return now - self._paused


@dataclass
class NodeRecord:
    node_id: str
    address: str
    trusted: bool
    model_digests: set[str]
    capacity: pb.Capacity
    last_seen: float = 0.0  # Registry.clock() time of the last report (the registry sets both)
    registered_at: float = 0.0
    links: list[pb.LinkStatus] = field(default_factory=list)
    active_sessions: int = 0
    plan_epoch: int = 0
    x25519_public_key: bytes = b""  # the node's frame-encryption key, copied into every plan


@dataclass
class Refusals:
    """Registrations and reports of one node refused as implausible: the node is flagged, its figures dropped."""

    count: int = 0
    reason: str = ""  # the last refusal's reason
    suspect: bool = True  # the node's latest registration or report was refused: no new plan uses it


class Registry:
    def __init__(self, trusted: set[str], dead_after_s: float, rejoin_grace_s: float = 0.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self.refused: dict[str, Refusals] = {}  # only for registered node ids, so a flood of made-up ids costs nothing
        self._trusted = trusted
        self.dead_after_s = dead_after_s
        self.rejoin_grace_s = rejoin_grace_s
        # A pause shorter than half the dead time cannot make a node look dead; a longer one is left out.
        self.clock = clock or AwakeClock(max_gap_s=max(0.5, dead_after_s / 2))
        self.started_at = self.clock()

    def register(self, request: pb.RegisterRequest) -> NodeRecord:
        now = self.clock()
        record = NodeRecord(node_id=request.node_id, address=request.address,
                            trusted=request.node_id in self._trusted, model_digests=set(request.model_digests),
                            capacity=request.capacity, last_seen=now, registered_at=now,
                            x25519_public_key=bytes(request.x25519_public_key))
        self.nodes[request.node_id] = record
        return record

    def report(self, report: pb.NodeReport) -> NodeRecord | None:
        record = self.nodes.get(report.node_id)
        if record is None:
            return None
        record.last_seen = self.clock()
        if report.node_id in self.refused:
            self.refused[report.node_id].suspect = False
        record.capacity = report.capacity
        record.links = list(report.links)
        record.active_sessions = report.active_sessions
        record.plan_epoch = report.plan_epoch
        return record

    def refuse(self, node_id: str, reason: str) -> None:
        """Flag a registered node whose registration or report was refused (shown by Status and the metrics)."""
        if node_id in self.nodes:
            flag = self.refused.setdefault(node_id, Refusals())
            flag.count += 1
            flag.reason = reason
            flag.suspect = True

    def suspect(self, node_id: str) -> bool:
        """Whether the node's latest registration or report was refused (until an accepted report clears it)."""
        flag = self.refused.get(node_id)
        return flag is not None and flag.suspect

    def lost_stream(self, node_id: str, registered_at: float) -> None:
        """The report stream of one registration ended: that registration is dead."""
        record = self.nodes.get(node_id)
        if record is not None and record.registered_at == registered_at:
            record.last_seen = float("-inf")

    def alive(self, node_id: str) -> bool:
        record = self.nodes.get(node_id)
        return record is not None and self.clock() - record.last_seen <= self.dead_after_s

    def lost(self, node_id: str) -> bool:
        """Known to be gone: registered and then silent, or never back within the grace after a restart.

        A node this orchestrator has not heard from since it started is not lost yet: after an
        orchestrator restart the nodes re-register within seconds, and replacing the plan before
        they do would re-split a healthy mesh (and tell clients there is no route).
        """
        if node_id in self.nodes:
            return not self.alive(node_id)
        return self.clock() - self.started_at > self.rejoin_grace_s

    def link_down(self, src: str, dst: str) -> bool:
        """Whether ``src`` reports its link to ``dst`` unreachable (a failed probe reports bandwidth 0).

        Not within LINK_SETTLE_S of ``dst`` registering: a peer that probed ``dst`` while it was down
        needs a moment to see it back, and that stale mark must not re-plan around a node just returned.
        """
        record, peer = self.nodes.get(src), self.nodes.get(dst)
        if record is None or (peer is not None and self.clock() - peer.registered_at < LINK_SETTLE_S):
            return False
        return any(link.peer_id == dst and link.bandwidth_bps <= 0 for link in record.links)

    def silent_for(self, node_id: str) -> float:
        """Seconds (of the orchestrator's own running time) since the node's last report."""
        return self.clock() - self.nodes[node_id].last_seen

    def alive_nodes(self) -> list[NodeRecord]:
        return sorted((r for r in self.nodes.values() if self.alive(r.node_id)), key=lambda r: r.node_id)
