"""Registered nodes and their latest reports: the live view of the cluster."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.proto import splitmesh_pb2 as pb


@dataclass
class NodeRecord:
    node_id: str
    address: str
    trusted: bool
    model_digests: set[str]
    capacity: pb.Capacity
    last_seen: float = field(default_factory=time.monotonic)
    registered_at: float = field(default_factory=time.monotonic)
    links: list[pb.LinkStatus] = field(default_factory=list)
    active_sessions: int = 0
    plan_epoch: int = 0
    x25519_public_key: bytes = b""  # the node's frame-encryption key, copied into every plan


class Registry:
    def __init__(self, trusted: set[str], dead_after_s: float) -> None:
        self.nodes: dict[str, NodeRecord] = {}
        self._trusted = trusted
        self.dead_after_s = dead_after_s

    def register(self, request: pb.RegisterRequest) -> NodeRecord:
        record = NodeRecord(node_id=request.node_id, address=request.address,
                            trusted=request.node_id in self._trusted, model_digests=set(request.model_digests),
                            capacity=request.capacity, x25519_public_key=bytes(request.x25519_public_key))
        self.nodes[request.node_id] = record
        return record

    def report(self, report: pb.NodeReport) -> NodeRecord | None:
        record = self.nodes.get(report.node_id)
        if record is None:
            return None
        record.last_seen = time.monotonic()
        record.capacity = report.capacity
        record.links = list(report.links)
        record.active_sessions = report.active_sessions
        record.plan_epoch = report.plan_epoch
        return record

    def lost_stream(self, node_id: str, registered_at: float) -> None:
        """The report stream of one registration ended: that registration is dead."""
        record = self.nodes.get(node_id)
        if record is not None and record.registered_at == registered_at:
            record.last_seen = float("-inf")

    def alive(self, node_id: str) -> bool:
        record = self.nodes.get(node_id)
        return record is not None and time.monotonic() - record.last_seen <= self.dead_after_s

    def alive_nodes(self) -> list[NodeRecord]:
        return sorted((r for r in self.nodes.values() if self.alive(r.node_id)), key=lambda r: r.node_id)
