"""Exact solvers: ``solve_resplit`` (new boundaries and nodes) and ``solve_migration`` (same spans, new nodes).

Both minimise Phi over the search space documented in ``plan`` with one pass of the DP in ``dp`` (exact while
Phi is additive: one session, or every session in one forward); under load further passes under bottleneck
caps (``bottleneck``) find plans whose slowest stage is shorter. Every optimum is re-costed with
``evaluate_plan`` so callers see the same numbers as for any other plan, and the cheapest is returned.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.spans import Span, check_cover

from .bottleneck import candidate_segments
from .costs import CostBreakdown, evaluate_plan
from .diagnose import explain_infeasible
from .dp import solve_chain
from .plan import Plan, Segment
from .profiles import Problem
from .tables import build_tables

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolveResult:
    """A solver's answer: the best plan and its cost, or why there is none."""

    plan: Plan | None  # None when infeasible
    cost: CostBreakdown | None  # predicted cost of ``plan``
    reason: str  # "optimal", or why no plan exists

    @property
    def feasible(self) -> bool:
        return self.plan is not None


def _solve(problem: Problem, pts: list[int], free: bool, spans: list[Span] | None) -> SolveResult:
    tables = build_tables(problem)
    points = np.array(pts, dtype=np.int64)
    best: SolveResult | None = None
    tail = (pts[-2], pts[-1])
    for seg in candidate_segments(tables, tail, problem.workload.forwards):  # one pass unless under load
        found = solve_chain(dataclasses.replace(tables, seg=seg), points, free)
        if found is None:
            continue
        plan = Plan(tuple(Segment(Span(a, b), tables.node_ids[v]) for a, b, v in found.segments))
        cost = evaluate_plan(problem, plan)
        if best is None or best.cost is None or cost.phi < best.cost.phi:
            best = SolveResult(plan, cost, "optimal")
    if best is None:
        why = explain_infeasible(problem, tables, spans)
        log.debug("infeasible: %s", why)
        return SolveResult(None, None, why)
    return best


def solve_resplit(problem: Problem) -> SolveResult:
    """Best boundaries and placement together."""
    if not problem.cluster.nodes:
        return SolveResult(None, None, "the cluster has no nodes")
    return _solve(problem, list(range(problem.model.num_layers + 1)), True, None)


def solve_migration(problem: Problem, current_spans: Sequence[Span]) -> SolveResult:
    """Best placement of the given spans (boundaries unchanged)."""
    spans = list(current_spans)
    check_cover(spans, problem.model.num_layers)
    if not problem.cluster.nodes:
        return SolveResult(None, None, "the cluster has no nodes")
    return _solve(problem, [0] + [s.end for s in spans], False, spans)
