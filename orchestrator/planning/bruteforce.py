"""Enumerates the whole search space; the oracle the DP is tested against on small instances.

It shares no code with the DP: plans are built as objects, checked with ``plan_violations`` and costed with
``evaluate_plan``. Exponential: keep it to a handful of layers and nodes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from common.spans import Span, spans_from_boundaries

from .costs import evaluate_plan
from .plan import Plan, Segment, plan_violations
from .profiles import Problem
from .solver import SolveResult


def chains(node_ids: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Node sequences of the search space: a head, other nodes in pipeline order, optionally the head again."""
    for head in node_ids:
        others = [n for n in node_ids if n != head]
        for r in range(len(others) + 1):
            for sub in itertools.combinations(others, r):
                yield (head, *sub)
                if sub:
                    yield (head, *sub, head)


def _span_sets(num_layers: int, parts: int, tail_on_head: bool) -> Iterator[list[Span]]:
    if tail_on_head:  # the head takes back exactly the last layer
        for cuts in itertools.combinations(range(1, num_layers - 1), parts - 2):
            yield spans_from_boundaries([0, *cuts, num_layers - 1, num_layers])
        return
    for cuts in itertools.combinations(range(1, num_layers), parts - 1):
        yield spans_from_boundaries([0, *cuts, num_layers])


def _best(problem: Problem, candidates: Iterator[Plan]) -> SolveResult:
    best: tuple[float, Plan] | None = None
    for plan in candidates:
        if plan_violations(problem, plan):
            continue
        phi = evaluate_plan(problem, plan).phi
        if best is None or phi < best[0]:
            best = (phi, plan)
    if best is None:
        return SolveResult(None, None, "infeasible")
    return SolveResult(best[1], evaluate_plan(problem, best[1]), "optimal")


def brute_force_resplit(problem: Problem) -> SolveResult:
    ids = [n.node_id for n in problem.cluster.nodes]
    n_layers = problem.model.num_layers

    def gen() -> Iterator[Plan]:
        for chain in chains(ids):
            tail_on_head = len(chain) > 1 and chain[0] == chain[-1]
            for spans in _span_sets(n_layers, len(chain), tail_on_head):
                yield Plan(tuple(Segment(s, n) for s, n in zip(spans, chain, strict=True)))

    return _best(problem, gen())


def brute_force_migration(problem: Problem, spans: Sequence[Span]) -> SolveResult:
    ids = [n.node_id for n in problem.cluster.nodes]

    def gen() -> Iterator[Plan]:
        for chain in chains(ids):
            if len(chain) == len(spans):
                yield Plan(tuple(Segment(s, n) for s, n in zip(spans, chain, strict=True)))

    return _best(problem, gen())
