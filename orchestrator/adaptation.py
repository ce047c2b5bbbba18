"""The live side of the papers' Algorithm 1: every interval, build E(t), ask the decision engine, act.

The engine is pure (orchestrator.planning); this module feeds it the registry's measurements, installs
what it decides through the same two-phase switch the operator uses, and records every decision.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import Counter

from common.proto import splitmesh_pb2 as pb
from orchestrator.coordinator import Coordinator
from orchestrator.environment import cluster_state, model_profile
from orchestrator.planning import ClusterState, Decision, DecisionEngine, Plan, evaluate_plan
from orchestrator.planning.profiles import Problem
from orchestrator.policy import Policy, apply_policy, policy_from_json, policy_to_json, policy_values

log = logging.getLogger(__name__)
DECISIONS = Counter("splitmesh_decisions_total", "Decisions of the adaptive loop and operator actions", ["kind"])
REPEAT_RECORD_S = 60.0  # a "keep" with the same triggers on the same plan is recorded at most this often


def _inputs(cluster: ClusterState, ewma_ms: float | None) -> str:
    return json.dumps({
        "ewma_latency_ms": ewma_ms,
        "nodes": {n.node_id: {"trusted": n.trusted, "utilisation": round(n.utilisation, 3),
                              "decode_ms_per_layer": round(n.decode_s_per_layer * 1e3, 4),
                              "memory_gb": round(n.memory_bytes / 1e9, 2)} for n in cluster.nodes},
        "links_mbps": {f"{a}->{b}": round(link.bandwidth_bps / 1e6, 2) for (a, b), link in cluster.links.items()},
    }, sort_keys=True)


class Adapter:
    def __init__(self, co: Coordinator, policy: Policy) -> None:
        self.co = co
        saved = co.state.get_meta("policy")
        self.policy = policy_from_json(saved, policy) if saved else policy
        self.engine = DecisionEngine(self.policy.decision)
        self.model = model_profile(co.model)
        self.drained: set[str] = set(json.loads(co.state.get_meta("drained") or "[]"))
        self.last: Decision | None = None
        self._repeat: tuple[object, float, int] | None = None  # (key, when last recorded, repeats not recorded)

    # -- operator controls ---------------------------------------------------
    def set_policy(self, updates: dict[str, str]) -> dict[str, str]:
        self.policy = apply_policy(self.policy, updates)
        self.engine.config = self.policy.decision
        self.co.state.set_meta("policy", policy_to_json(self.policy))
        return policy_values(self.policy)

    def set_drained(self, node_id: str, drained: bool) -> None:
        (self.drained.add if drained else self.drained.discard)(node_id)
        self.co.state.set_meta("drained", json.dumps(sorted(self.drained)))

    def observe_latency(self, ms: float) -> None:
        self.engine.observe_latency(ms)

    def schedulable(self) -> list[str]:
        return [r.node_id for r in self.co.registry.alive_nodes() if r.node_id not in self.drained]

    def cluster(self) -> ClusterState:
        nodes = [r for r in self.co.registry.alive_nodes() if r.node_id not in self.drained]
        return cluster_state(nodes, self.policy)

    def current_plan(self) -> Plan | None:
        view = self.co.view
        return None if view is None else Plan.of([(s.span, s.node_id) for s in view.segments])

    def predicted_ms(self, plan: Plan | None) -> float:
        """Predicted decode step of ``plan`` on the current cluster (0 when it cannot be evaluated)."""
        if plan is None:
            return 0.0
        problem = Problem(self.cluster(), self.model, self.policy.workload(), self.policy.decision.weights,
                          self.policy.decision.privacy)
        try:
            return evaluate_plan(problem, plan).decode_step_ms
        except (KeyError, ValueError):
            return 0.0

    # -- the loop --------------------------------------------------------------
    async def tick(self) -> Decision | None:
        """One monitoring cycle; installs the engine's plan when it decides to change."""
        if self.co.view is None or not self.policy.adaptive:
            return None
        cluster = self.cluster()
        current = self.current_plan()
        decision = self.engine.decide(time.monotonic(), cluster, self.model, self.policy.workload(), current)
        self.last = decision
        epoch_before = self.co.view.epoch
        epoch_after = 0
        if decision.plan is not None and decision.kind in ("migrate", "resplit"):
            committed, reason, plan = await self.co.install([(s.span, s.node_id) for s in decision.plan.segments])
            if committed and plan is not None:
                epoch_after = plan.epoch
            else:
                log.warning("adaptive %s not installed: %s", decision.kind, reason)
        note = self._repeat_note(decision, epoch_before) if decision.kind != "keep" or decision.triggers else None
        if note is not None:
            self.record(decision.kind, decision.reason + note, cluster, epoch_before, epoch_after,
                        triggers=", ".join(map(str, decision.triggers)),
                        old=decision.old_cost.phi if decision.old_cost else 0.0,
                        new=decision.new_cost.phi if decision.new_cost else 0.0,
                        old_ms=decision.old_cost.decode_step_ms if decision.old_cost else 0.0,
                        new_ms=decision.new_cost.decode_step_ms if decision.new_cost else 0.0)
        return decision

    def _repeat_note(self, decision: Decision, epoch: int) -> str | None:
        """None when this "keep" repeats the last recorded one (same triggers, same plan) too soon to record;
        else what to add to its reason.

        While a trigger stays fired the loop keeps the plan every interval; one row per second would
        bury every other decision in the history, so repeats are counted and summarised once a minute.
        """
        if decision.kind != "keep":
            self._repeat = None
            return ""
        key = (epoch, tuple(sorted(t.name for t in decision.triggers)))
        now = time.monotonic()
        if self._repeat is not None and self._repeat[0] == key and now - self._repeat[1] < REPEAT_RECORD_S:
            self._repeat = (key, self._repeat[1], self._repeat[2] + 1)
            DECISIONS.labels(kind=decision.kind).inc()
            log.debug("decision keep (repeat): %s", decision.reason)
            return None
        repeats = self._repeat[2] if self._repeat is not None and self._repeat[0] == key else 0
        self._repeat = (key, now, 0)
        return f" (and {repeats} times since the last record)" if repeats else ""

    def record(self, kind: str, reason: str, cluster: ClusterState | None, epoch_before: int, epoch_after: int, *,
               triggers: str = "", old: float = 0.0, new: float = 0.0, old_ms: float = 0.0,
               new_ms: float = 0.0) -> None:
        self.co.state.record_decision(pb.DecisionRecord(
            at_ms=int(time.time() * 1000), kind=kind, triggers=triggers, reason=reason, predicted_cost_old=old,
            predicted_cost_new=new, epoch_before=epoch_before, epoch_after=epoch_after,
            inputs_json=_inputs(cluster or self.cluster(), self.engine.ewma_ms), predicted_latency_old_ms=old_ms,
            predicted_latency_new_ms=new_ms))
        DECISIONS.labels(kind=kind).inc()
        log.info("decision %s: %s", kind, reason)
