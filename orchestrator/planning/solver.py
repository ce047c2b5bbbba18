"""Exact solvers: ``solve_resplit`` (new boundaries and nodes) and ``solve_migration`` (same spans, new nodes).

Both minimise Phi over the search space documented in ``plan``. A best-first branch and bound over the
relaxed DP (``dp``, ``branch``) makes the answer exact: the relaxed Phi of a mask is a lower bound for all
plans it allows, so the first relaxed optimum that is inside the search space is the optimum.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.spans import Span, check_cover

from .branch import children, find_conflict
from .costs import CostBreakdown, evaluate_plan
from .diagnose import explain_infeasible
from .dp import Relaxed, solve_chain
from .plan import Plan, Segment
from .profiles import Problem
from .tables import BoolArr, IntArr, Tables, build_tables, masked_segments

log = logging.getLogger(__name__)

MAX_NODES = 20_000  # branch-and-bound nodes before giving up on a proof (never reached in tests or benches)


@dataclass(frozen=True)
class SolveResult:
    """A solver's answer: the best plan and its cost, or why there is none."""

    plan: Plan | None  # None when infeasible
    cost: CostBreakdown | None  # predicted cost of ``plan``
    reason: str  # "optimal" or why no plan exists
    proved_optimal: bool  # False only if the branch and bound hit MAX_NODES
    dp_solves: int  # relaxed DPs run (1 when the relaxation was already inside the search space)

    @property
    def feasible(self) -> bool:
        return self.plan is not None


def _to_plan(tables: Tables, relaxed: Relaxed) -> Plan:
    return Plan(tuple(Segment(Span(a, b), tables.node_ids[v]) for a, b, v in relaxed.segments))


def _search(tables: Tables, breakpoints: IntArr, free: bool) -> tuple[Relaxed | None, bool, int]:
    """Best-first branch and bound; returns (optimum, proved, dp solves)."""

    def relax(mask: BoolArr) -> Relaxed | None:
        return solve_chain(tables, masked_segments(tables, mask), breakpoints, free)

    counter = itertools.count()
    solves = 1
    root = relax(tables.allowed)
    if root is None:
        return None, True, solves
    heap: list[tuple[float, int, Relaxed, BoolArr]] = [(root.phi, next(counter), root, tables.allowed)]
    while heap:
        _, _, relaxed, mask = heapq.heappop(heap)
        conflict = find_conflict(relaxed)
        if conflict is None:
            return relaxed, True, solves
        if solves >= MAX_NODES:
            log.warning("branch and bound stopped after %d DP solves without a proof", solves)
            return None, False, solves
        for kid in children(mask, conflict, int(breakpoints[-2]) if len(breakpoints) > 1 else 0):
            solves += 1
            sub = relax(kid)
            if sub is not None:
                heapq.heappush(heap, (sub.phi, next(counter), sub, kid))
    return None, True, solves


def _finish(problem: Problem, tables: Tables, found: Relaxed | None, proved: bool, solves: int,
            why: str) -> SolveResult:
    if found is None:
        return SolveResult(None, None, why if proved else "search budget exhausted", proved, solves)
    plan = _to_plan(tables, found)
    return SolveResult(plan, evaluate_plan(problem, plan), "optimal", proved, solves)


def solve_resplit(problem: Problem) -> SolveResult:
    """Best boundaries and placement together."""
    tables = build_tables(problem)
    points = np.arange(problem.model.num_layers + 1, dtype=np.int64)
    found, proved, solves = _search(tables, points, free=True)
    why = "" if found else explain_infeasible(problem, tables, None)
    return _finish(problem, tables, found, proved, solves, why)


def solve_migration(problem: Problem, current_spans: Sequence[Span]) -> SolveResult:
    """Best placement of the given spans (boundaries unchanged)."""
    check_cover(current_spans, problem.model.num_layers)
    tables = build_tables(problem)
    points = np.array([0] + [s.end for s in current_spans], dtype=np.int64)
    found, proved, solves = _search(tables, points, free=False)
    why = "" if found else explain_infeasible(problem, tables, list(current_spans))
    return _finish(problem, tables, found, proved, solves, why)

