"""The placement used before any measurements exist, and for operator-forced splits.

Segment 0 and the last segment go to trusted nodes (the head keeps both when it is the only trusted
one, closing the token ring at the head); middle segments spread over the other nodes.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.privacy import ENDS_ONLY, TrustRule
from common.spans import check_cover, even_boundaries, spans_from_boundaries
from orchestrator.planning import Plan
from orchestrator.registry import NodeRecord


class PlacementError(ValueError):
    """No placement satisfies the request; the message says why."""


def place(nodes: Sequence[NodeRecord], num_layers: int, boundaries: Sequence[int] = (),
          placement: Sequence[str] = (), rule: TrustRule = ENDS_ONLY) -> Plan:
    """A plan for ``nodes``: the operator's split and placement when given (checked), else an even split."""
    if not nodes:
        raise PlacementError("no live nodes")
    by_id = {n.node_id: n for n in nodes}
    if boundaries:
        try:
            spans = spans_from_boundaries(list(boundaries))
            check_cover(spans, num_layers)
        except ValueError as exc:
            raise PlacementError(f"bad boundaries {list(boundaries)}: {exc}") from exc
    else:
        # With a single trusted node the ring starts and ends there, so it hosts two segments.
        ring_closes_at_head = len(nodes) > 1 and sum(n.trusted for n in nodes) == 1
        parts = len(nodes) + (1 if ring_closes_at_head else 0)
        spans = spans_from_boundaries(even_boundaries(num_layers, min(parts, num_layers)))
    last = len(spans) - 1
    if placement:
        if len(placement) != len(spans):
            raise PlacementError(f"placement names {len(placement)} nodes for {len(spans)} segments")
        for i, node_id in enumerate(placement):
            if node_id not in by_id:
                raise PlacementError(f"segment {i}: node {node_id!r} is not registered and alive")
            if rule.segment_is_critical(spans[i], num_layers) and not by_id[node_id].trusted:
                raise PlacementError(f"segment {i} is privacy-critical; node {node_id!r} is not trusted")
        return Plan.of(list(zip(spans, placement, strict=True)))
    trusted = [n.node_id for n in nodes if n.trusted]
    if not trusted:
        raise PlacementError("no trusted node is alive: the first and last segments need one")
    head = trusted[0]
    tail = trusted[1] if len(trusted) > 1 and last >= 1 else head  # never two adjacent segments on the head
    middle_pool = [n.node_id for n in nodes if not n.trusted] + [t for t in trusted if t not in (head, tail)]
    middle_pool = middle_pool or [head]
    chosen = [head] + [middle_pool[(i - 1) % len(middle_pool)] for i in range(1, last)] + ([tail] if last else [])
    plan = Plan.of(list(zip(spans, chosen, strict=True)))
    exposed = [s for s in plan.segments
               if not by_id[s.node_id].trusted and rule.segment_is_critical(s.span, num_layers)]
    if exposed:
        raise PlacementError(f"segment {exposed[0].span} is privacy-critical and only untrusted nodes are left for it")
    return plan
