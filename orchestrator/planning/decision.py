"""The decision loop of the papers' Algorithm 1, as a pure class: observations in, a recorded Decision out.

Order per call: triggers (ShouldReconfigure) -> cool-down -> migration (same spans, new nodes) -> re-split
only if the migration cannot meet the targets -> hysteresis against the current plan's predicted Phi, at the load
in the workload (sessions and decode rows per forward measured now: Phi then charges the pipeline's bound).
A current plan that lost a node or no longer fits the cluster forces a decision past cool-down and
hysteresis. The only state is the latency EWMA and the time of the last change; no clock, no I/O.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from .costs import CostBreakdown, evaluate_plan
from .plan import Plan, plan_violations
from .profiles import ClusterState, CostWeights, ModelProfile, PrivacyPolicy, Problem, Workload
from .solver import SolveResult, solve_migration, solve_resplit
from .triggers import Trigger, bandwidth_trigger, latency_trigger, lost_nodes, utilisation_trigger

log = logging.getLogger(__name__)

DecisionKind = Literal["keep", "migrate", "resplit", "infeasible"]


@dataclass(frozen=True)
class DecisionConfig:
    """Thresholds and weights of the decision loop."""

    latency_max_ms: float = 150.0  # L_max: EWMA per-token latency above this fires; also the migration target
    utilisation_max: float = 0.85  # U_max: a plan node busier than this fires
    bandwidth_min_bps: float = 50e6  # B_min: a link below this (bit/s) fires
    bandwidth_scope: Literal["plan", "all"] = "plan"  # watch the links the plan uses (ring included) or all
    cooldown_s: float = 30.0  # T_cool: no voluntary change sooner than this after the last one
    hysteresis: float = 0.05  # a new plan must cut predicted Phi by more than this fraction
    ewma_alpha: float = 0.3  # weight of the newest latency sample in the EWMA
    weights: CostWeights = CostWeights()  # objective weights and privacy mode for the solvers
    privacy: PrivacyPolicy = PrivacyPolicy()  # privacy-critical layers

    def __post_init__(self) -> None:
        if not 0 < self.ewma_alpha <= 1:
            raise ValueError("ewma_alpha must be in (0, 1]")
        if self.hysteresis < 0 or self.cooldown_s < 0:
            raise ValueError("hysteresis and cooldown_s must be non-negative")


@dataclass(frozen=True)
class Decision:
    """One run of the loop, recorded whether or not anything changes."""

    at: float  # the caller's clock, seconds
    kind: DecisionKind  # what to do
    plan: Plan | None  # the new plan for migrate/resplit, else None
    triggers: tuple[Trigger, ...]  # everything that fired, with values
    old_cost: CostBreakdown | None  # predicted cost of the current plan (None if it is unusable)
    new_cost: CostBreakdown | None  # predicted cost of the best candidate considered
    reason: str  # one line for `splitmesh history`


class DecisionEngine:
    """Holds the latency EWMA and the last change time; everything else comes in as arguments."""

    def __init__(self, config: DecisionConfig = DecisionConfig()) -> None:
        self.config = config
        self._ewma_ms: float | None = None
        self._last_change: float | None = None

    @property
    def ewma_ms(self) -> float | None:
        return self._ewma_ms

    def observe_latency(self, ms: float) -> None:
        """Feed one per-token latency sample (milliseconds)."""
        a = self.config.ewma_alpha
        self._ewma_ms = ms if self._ewma_ms is None else a * ms + (1 - a) * self._ewma_ms

    def triggers(self, cluster: ClusterState, plan: Plan) -> list[Trigger]:
        """ShouldReconfigure's three tests on the current plan."""
        cfg = self.config
        fired = [
            latency_trigger(self._ewma_ms, cfg.latency_max_ms),
            utilisation_trigger(cluster, plan, cfg.utilisation_max),
            bandwidth_trigger(cluster, plan, cfg.bandwidth_min_bps, cfg.bandwidth_scope),
        ]
        return [t for t in fired if t is not None]

    def meets_targets(self, cluster: ClusterState, plan: Plan, cost: CostBreakdown) -> bool:
        """A candidate is good enough when its predicted ms/token at the load and its nodes/links pass every
        threshold."""
        cfg = self.config
        return (cost.token_ms <= cfg.latency_max_ms
                and utilisation_trigger(cluster, plan, cfg.utilisation_max) is None
                and bandwidth_trigger(cluster, plan, cfg.bandwidth_min_bps, "plan") is None)

    def decide(self, now: float, cluster: ClusterState, model: ModelProfile, workload: Workload,
               current_plan: Plan | None) -> Decision:
        problem = Problem(cluster, model, workload, self.config.weights, self.config.privacy)
        fired, old_cost, forced = self._assess(problem, current_plan)
        if not fired:
            return self._record(Decision(now, "keep", None, (), old_cost, None, "no trigger fired"))
        left = self._cooldown_left(now)
        if not forced and left > 0:
            return self._record(Decision(now, "keep", None, tuple(fired), old_cost, None,
                                         f"cool-down: {left:.1f} s left"))
        kind, result = self._candidate(problem, current_plan)
        if result.plan is None or result.cost is None:
            if old_cost is not None:
                reason = f"no feasible alternative ({result.reason}); keeping the current plan"
                return self._record(Decision(now, "keep", None, tuple(fired), old_cost, None, reason))
            return self._record(Decision(now, "infeasible", None, tuple(fired), None, None, result.reason))
        if not forced and old_cost is not None:
            gain = (old_cost.phi - result.cost.phi) / old_cost.phi if old_cost.phi > 0 else 0.0
            if result.plan == current_plan or gain <= self.config.hysteresis:
                reason = f"{kind} gains {gain:.1%}, not above the {self.config.hysteresis:.0%} hysteresis"
                return self._record(Decision(now, "keep", None, tuple(fired), old_cost, result.cost, reason))
        self._last_change = now
        self._ewma_ms = None  # latency samples of the old plan say nothing about the new one
        why = "forced: current plan unusable" if forced else "triggers: " + ", ".join(map(str, fired))
        return self._record(Decision(now, kind, result.plan, tuple(fired), old_cost, result.cost,
                                     f"{kind} to {result.plan} ({why})"))

    def _assess(self, problem: Problem, plan: Plan | None) -> tuple[list[Trigger], CostBreakdown | None, bool]:
        """(triggers, cost of the current plan or None if unusable, whether a change is forced)."""
        if plan is None:
            return [Trigger("no_plan", 1, 0)], None, True
        lost = lost_nodes(problem.cluster, plan)
        if lost:
            return [Trigger("lost_node", len(lost), 0), *self.triggers(problem.cluster, plan)], None, True
        broken = plan_violations(problem, plan)
        if broken:
            log.info("current plan no longer fits: %s", "; ".join(broken))
            return [Trigger("invalid_plan", len(broken), 0), *self.triggers(problem.cluster, plan)], None, True
        return self.triggers(problem.cluster, plan), evaluate_plan(problem, plan), False

    def _cooldown_left(self, now: float) -> float:
        if self._last_change is None:
            return 0.0
        return self.config.cooldown_s - (now - self._last_change)

    def _candidate(self, problem: Problem, plan: Plan | None) -> tuple[DecisionKind, SolveResult]:
        """Migration first; re-split only when the migration misses the targets (or does not exist)."""
        migration = solve_migration(problem, plan.spans) if plan is not None else None
        if (migration is not None and migration.plan is not None and migration.cost is not None
                and self.meets_targets(problem.cluster, migration.plan, migration.cost)):
            return "migrate", migration
        resplit = solve_resplit(problem)
        if migration is None or migration.cost is None:
            return "resplit", resplit
        if resplit.cost is not None and resplit.cost.phi < migration.cost.phi:
            return "resplit", resplit
        return "migrate", migration

    @staticmethod
    def _record(decision: Decision) -> Decision:
        log.info("decision %s at %.1f: %s", decision.kind, decision.at, decision.reason)
        return decision

