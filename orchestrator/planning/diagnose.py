"""Plain-language reasons for an infeasible solve, checked from the most specific to the most general."""

from __future__ import annotations

import numpy as np

from common.spans import Span

from .profiles import Problem
from .tables import Tables


def _can_host(tables: Tables, span: Span) -> bool:
    ok = tables.allowed[:, span.start : span.end].all(axis=1) & np.isfinite(tables.seg[span.start, span.end, :])
    return bool(ok.any())


def _who(problem: Problem, span: Span) -> str:
    critical = problem.privacy.critical_layers(problem.model.num_layers)
    needs_trust = problem.weights.privacy_hard and any(i in span for i in critical)
    return "trusted node" if needs_trust else "node"


def explain_infeasible(problem: Problem, tables: Tables, spans: list[Span] | None) -> str:
    if not problem.cluster.nodes:
        return "the cluster has no nodes"
    n_layers = problem.model.num_layers
    if spans is None:
        first, last = Span(0, 1), Span(n_layers - 1, n_layers)
        named = [(first, "the first segment"), (last, "the last segment")]
        named += [(Span(i, i + 1), f"layer {i}") for i in range(1, n_layers - 1)]
        for span, label in named:
            if _who(problem, span) == "trusted node" and not any(n.trusted for n in problem.cluster.nodes):
                return f"no live trusted node for {label}"
            if not _can_host(tables, span):
                need = int(tables.mem[span.start, span.end])
                return f"no {_who(problem, span)} can hold {label} (needs at least {need} bytes)"
        return (f"no chain of linked nodes covers all {n_layers} layers within memory "
                "(links missing, or too little memory in total)")
    for span in spans:
        if not _can_host(tables, span):
            need = int(tables.mem[span.start, span.end])
            return f"no {_who(problem, span)} can hold segment {span} (needs {need} bytes)"
    return "no assignment of distinct, linked nodes to the current spans fits memory and links"
