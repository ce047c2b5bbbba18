"""ShouldReconfigure: which of the papers' three triggers fire for the current plan, and with what values."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Plan
from .profiles import ClusterState


@dataclass(frozen=True)
class Trigger:
    """One threshold crossing, kept with its numbers for the decision record."""

    name: str  # "latency", "utilisation", "bandwidth", "lost_node" or "no_plan"
    value: float  # the observed value (ms, fraction, bit/s, or count of lost nodes)
    threshold: float  # the configured limit it crossed

    def __str__(self) -> str:
        return f"{self.name}={self.value:g} (limit {self.threshold:g})"


def latency_trigger(ewma_ms: float | None, limit_ms: float) -> Trigger | None:
    if ewma_ms is not None and ewma_ms > limit_ms:
        return Trigger("latency", ewma_ms, limit_ms)
    return None


def utilisation_trigger(cluster: ClusterState, plan: Plan, limit: float) -> Trigger | None:
    """Max utilisation over the plan's nodes (busy nodes outside the plan do not slow it down)."""
    loads = [cluster.node(n).utilisation for n in set(plan.node_ids) if cluster.has_node(n)]
    if loads and max(loads) > limit:
        return Trigger("utilisation", max(loads), limit)
    return None


def plan_min_bandwidth(cluster: ClusterState, plan: Plan) -> float | None:
    """Slowest link the plan uses, the ring return included; None when it uses no link."""
    values = [lk.bandwidth_bps for a, b in plan.hops() if (lk := cluster.link(a, b)) is not None]
    return min(values) if values else None


def cluster_min_bandwidth(cluster: ClusterState) -> float | None:
    return min((lk.bandwidth_bps for lk in cluster.links.values()), default=None)


def bandwidth_trigger(cluster: ClusterState, plan: Plan, limit_bps: float, scope: str) -> Trigger | None:
    low = plan_min_bandwidth(cluster, plan) if scope == "plan" else cluster_min_bandwidth(cluster)
    if low is not None and low < limit_bps:
        return Trigger("bandwidth", low, limit_bps)
    return None


def lost_nodes(cluster: ClusterState, plan: Plan) -> list[str]:
    return sorted({n for n in plan.node_ids if not cluster.has_node(n)})
