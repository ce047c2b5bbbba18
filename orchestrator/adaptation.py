"""The live side of the papers' Algorithm 1: every interval, build E(t) and ask the decision engine.

The engine is pure (orchestrator.planning); this module feeds it the registry's measurements. What it
decides is installed and recorded by the controller, through the same two-phase switch the operator uses.
"""

from __future__ import annotations

import json
import logging
import math
import time

from orchestrator.coordinator import Coordinator
from orchestrator.environment import cluster_state, current_load, model_profile
from orchestrator.planning import ClusterState, CostBreakdown, Decision, DecisionEngine, Plan, Workload, evaluate_plan
from orchestrator.planning.profiles import Problem
from orchestrator.policy import Policy, apply_policy, policy_to_json, policy_values
from orchestrator.registry import NodeRecord

log = logging.getLogger(__name__)


def _inputs(cluster: ClusterState, ewma_ms: float | None, load: Workload) -> str:
    return json.dumps({
        "ewma_latency_ms": ewma_ms,
        "sessions": load.sessions, "decode_rows_per_forward": round(load.rows, 2),
        "nodes": {n.node_id: {"trusted": n.trusted, "utilisation": round(n.utilisation, 3),
                              "decode_ms_per_layer": round(n.decode_s_per_layer * 1e3, 4),
                              "decode_row_ms_per_layer": round(n.row_s_per_layer * 1e3, 4),
                              "memory_gb": round(n.memory_bytes / 1e9, 2)} for n in cluster.nodes},
        "links_mbps": {f"{a}->{b}": round(link.bandwidth_bps / 1e6, 2) for (a, b), link in cluster.links.items()},
    }, sort_keys=True)


class Adapter:
    """The decision engine fed with live measurements, the policy and the drained nodes; it decides, and the
    controller (orchestrator.controller) installs and records."""

    def __init__(self, co: Coordinator, policy: Policy) -> None:
        self.co = co
        self.policy = policy
        self.engine = DecisionEngine(self.policy.decision)
        self.model = model_profile(co.model)
        self.drained: set[str] = set(json.loads(co.state.get_meta("drained") or "[]"))
        self.last: Decision | None = None
        self._repeat: tuple[object, float, int] | None = None  # (key, when last recorded, repeats not recorded)

    # -- operator controls ---------------------------------------------------
    def set_policy(self, updates: dict[str, str]) -> dict[str, str]:
        """Validate the whole new policy first (PolicyError changes and persists nothing), then switch to it."""
        policy = apply_policy(self.policy, updates)
        self.co.state.set_meta("policy", policy_to_json(policy))
        self.policy = policy
        self.engine.config = policy.decision
        return policy_values(policy)

    def set_drained(self, node_id: str, drained: bool) -> None:
        (self.drained.add if drained else self.drained.discard)(node_id)
        self.co.state.set_meta("drained", json.dumps(sorted(self.drained)))

    def observe_latency(self, ms: float) -> None:
        self.engine.observe_latency(ms)

    def schedulable(self) -> list[NodeRecord]:
        """Alive nodes the operator has not drained and whose latest report was not refused: the only ones any
        new plan may use."""
        registry = self.co.registry
        return [r for r in registry.alive_nodes() if r.node_id not in self.drained and not registry.suspect(r.node_id)]

    def cluster(self) -> ClusterState:
        return cluster_state(self.schedulable(), self.policy)

    def workload(self) -> Workload:
        """The policy's request shape at the load the nodes report now (sessions, decode rows per forward)."""
        return current_load(self.schedulable(), self.policy.workload())

    def problem(self, head: str | None = None) -> Problem:
        p = self.policy
        return Problem(self.cluster(), self.model, self.workload(), p.decision.weights, p.decision.privacy, head=head)

    def forecast(self, plan: Plan | None) -> CostBreakdown | None:
        """Predicted cost of ``plan`` on the current cluster at the current load (None when it cannot be
        evaluated: no plan, or a node it needs is gone)."""
        if plan is None:
            return None
        try:
            cost = evaluate_plan(self.problem(), plan)
        except (KeyError, ValueError):
            return None
        return cost if math.isfinite(cost.token_s) else None

    def predicted_ms(self, plan: Plan | None) -> float:
        """Predicted ms/token of a session on ``plan`` at the current load (0 when it cannot be evaluated)."""
        cost = self.forecast(plan)
        return cost.token_ms if cost is not None else 0.0

    def decide(self) -> tuple[Decision, ClusterState] | None:
        """One monitoring cycle's decision on the committed plan (None while there is none or the loop is off)."""
        current = self.co.current_plan()
        if current is None or not self.policy.adaptive:
            return None
        cluster = self.cluster()
        decision = self.engine.decide(time.monotonic(), cluster, self.model, self.workload(), current)
        self.last = decision
        return decision, cluster

    def inputs(self, cluster: ClusterState | None) -> str:
        return _inputs(cluster or self.cluster(), self.engine.ewma_ms, self.workload())
