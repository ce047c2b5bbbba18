"""Choosing a whole new plan: the exact solver first, the static placement when it finds nothing."""

from __future__ import annotations

import logging

from common.spans import Span
from orchestrator.adaptation import Adapter
from orchestrator.planning import solve_resplit
from orchestrator.planning.profiles import Problem
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger(__name__)


def best_plan(adapter: Adapter) -> tuple[list[tuple[Span, str]], str]:
    """Segments for the schedulable nodes and a one-line account of how they were chosen."""
    policy = adapter.policy
    problem = Problem(adapter.cluster(), adapter.model, policy.workload(), policy.decision.weights,
                      policy.decision.privacy)
    result = solve_resplit(problem)
    if result.plan is not None:
        return [(s.span, s.node_id) for s in result.plan.segments], f"solver: {result.plan}"
    log.warning("solver found no feasible plan (%s); falling back to the static placement", result.reason)
    nodes = [r for r in adapter.co.registry.alive_nodes() if r.node_id not in adapter.drained]
    try:
        return place(nodes, adapter.co.model.num_layers), f"static placement ({result.reason})"
    except PlacementError as exc:
        raise PlacementError(f"{result.reason}; {exc}") from exc
