"""A placement candidate and the constraints every plan must satisfy.

Search space (shared by the DP solver and the brute-force oracle):
a plan is an ordered chain of segments covering ``[0, L)``; consecutive segments sit on different nodes;
each node hosts at most one segment, except that the head node (segment 0) may also host the last
segment, which closes the token ring locally.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from common.spans import Span, check_cover

from .profiles import Problem


@dataclass(frozen=True)
class Segment:
    """One span of layers on one node."""

    span: Span  # half-open layer range
    node_id: str  # the node that runs it


@dataclass(frozen=True)
class Plan:
    """Ordered segments; the first embeds, the last applies norm, lm_head and the sampler."""

    segments: tuple[Segment, ...]  # in layer order

    @classmethod
    def of(cls, pairs: Sequence[tuple[Span, str]]) -> Plan:
        return cls(tuple(Segment(span, node) for span, node in pairs))

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(s.span for s in self.segments)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(s.node_id for s in self.segments)

    @property
    def head(self) -> str:
        return self.segments[0].node_id

    @property
    def tail(self) -> str:
        return self.segments[-1].node_id

    def hops(self) -> list[tuple[str, str]]:
        """Directed links a token crosses: each boundary, then the ring return when tail != head."""
        ids = self.node_ids
        out = list(itertools.pairwise(ids))
        if self.tail != self.head:
            out.append((self.tail, self.head))
        return out

    def __str__(self) -> str:
        return " ".join(f"{s.span}@{s.node_id}" for s in self.segments)


def segment_memory(problem: Problem, span: Span) -> int:
    """Bytes a node needs for one segment: its layers, its KV budget, and embed/head when it owns them."""
    m = problem.model
    n = len(span)
    need = n * (m.layer_bytes + m.kv_bytes_per_token_layer * problem.workload.kv_budget_tokens)
    if span.start == 0:
        need += m.embed_bytes
    if span.end == m.num_layers:
        need += m.head_bytes
    return need


def shape_violations(plan: Plan, num_layers: int) -> list[str]:
    """Structural rules of the search space, independent of the cluster."""
    if not plan.segments:
        return ["plan has no segments"]
    out: list[str] = []
    try:
        check_cover(plan.spans, num_layers)
    except ValueError as exc:
        out.append(str(exc))
    ids = plan.node_ids
    for a, b in itertools.pairwise(ids):
        if a == b:
            out.append(f"consecutive segments on the same node {a}")
    for i, node in enumerate(ids):
        later = [j for j in range(i + 1, len(ids)) if ids[j] == node]
        for j in later:
            if not (i == 0 and j == len(ids) - 1):
                out.append(f"node {node} hosts segments {i} and {j}; only head+tail may share a node")
    return out


def plan_violations(problem: Problem, plan: Plan) -> list[str]:
    """Every constraint the plan breaks on this cluster; empty means feasible."""
    out = shape_violations(plan, problem.model.num_layers)
    if out:
        return out
    cluster = problem.cluster
    used: dict[str, int] = {}
    for seg in plan.segments:
        if not cluster.has_node(seg.node_id):
            out.append(f"node {seg.node_id} is not in the cluster")
            continue
        used[seg.node_id] = used.get(seg.node_id, 0) + segment_memory(problem, seg.span)
    for node_id, need in used.items():
        have = cluster.node(node_id).memory_bytes
        if need > have:
            out.append(f"node {node_id} needs {need} bytes, has {have}")
    for src, dst in plan.hops():
        if cluster.has_node(src) and cluster.has_node(dst) and cluster.link(src, dst) is None:
            out.append(f"no link {src}->{dst}")
    if problem.weights.privacy_hard:
        critical = problem.privacy.critical_layers(problem.model.num_layers)
        for seg in plan.segments:
            if cluster.has_node(seg.node_id) and not cluster.node(seg.node_id).trusted:
                hit = sorted(i for i in critical if i in seg.span)
                if hit:
                    out.append(f"privacy-critical layers {hit} on untrusted node {seg.node_id}")
    return out
