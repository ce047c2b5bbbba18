"""A parsed, structurally checked plan: what both sides reason about after the signature check."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.privacy import ENDS_ONLY, TrustRule
from common.proto import splitmesh_pb2 as pb
from common.spans import Span, check_cover

PLAN_KIND = "splitmesh.plan/1"


class PlanError(ValueError):
    """A plan is structurally wrong (coverage, trust, unknown node)."""


@dataclass(frozen=True)
class Segment:
    index: int
    span: Span
    node_id: str
    privacy_critical: bool


@dataclass(frozen=True)
class PlanView:
    epoch: int
    cluster_id: str
    model_digest: str
    num_layers: int
    segments: tuple[Segment, ...]
    addresses: dict[str, str]
    trusted: dict[str, bool]
    issued_at_ms: int
    expires_at_ms: int
    x25519_keys: dict[str, bytes] = field(default_factory=dict)  # node id -> raw key for sealing hop keys
    trust: TrustRule = ENDS_ONLY  # the trusted depth the plan records (a node enforces it on its own)

    @property
    def head(self) -> Segment:
        return self.segments[0]

    def segments_on(self, node_id: str) -> list[Segment]:
        return [s for s in self.segments if s.node_id == node_id]

    def node_ids(self) -> list[str]:
        return sorted({s.node_id for s in self.segments})

    @classmethod
    def parse(cls, plan: pb.Plan) -> PlanView:
        """Check kind, coverage and trust; raise PlanError naming the first problem."""
        if plan.kind != PLAN_KIND:
            raise PlanError(f"plan kind {plan.kind!r} is not {PLAN_KIND!r}")
        if not plan.segments:
            raise PlanError("plan has no segments")
        try:
            spans = [Span(s.start, s.end) for s in plan.segments]
            check_cover(spans, plan.num_layers)
        except ValueError as exc:
            raise PlanError(str(exc)) from exc
        addresses = {n.node_id: n.address for n in plan.nodes}
        trusted = {n.node_id: n.trusted for n in plan.nodes}
        if len(addresses) != len(plan.nodes):
            raise PlanError("a node is listed twice")
        keys = {n.node_id: bytes(n.x25519_public_key) for n in plan.nodes if n.x25519_public_key}
        bad_keys = sorted(n for n, k in keys.items() if len(k) != 32)
        if bad_keys:
            raise PlanError(f"X25519 keys of {bad_keys} are not 32 bytes")
        trust = TrustRule(plan.trusted_leading_layers, plan.trusted_trailing_layers)
        segments = []
        for i, (s, span) in enumerate(zip(plan.segments, spans, strict=True)):
            if s.node_id not in addresses:
                raise PlanError(f"segment {i} is placed on unlisted node {s.node_id!r}")
            critical = s.privacy_critical or trust.segment_is_critical(span, plan.num_layers)
            if critical and not trusted[s.node_id]:
                raise PlanError(f"privacy-critical segment {i} {span} is placed on untrusted node {s.node_id!r}")
            segments.append(Segment(i, span, s.node_id, critical))
        return cls(plan.epoch, plan.cluster_id, plan.model_digest, plan.num_layers, tuple(segments), addresses,
                   trusted, plan.issued_at_ms, plan.expires_at_ms, keys, trust)

    def describe(self) -> str:
        return " ".join(f"{s.span}@{s.node_id}" for s in self.segments)
