"""Times solve_resplit and solve_migration on seeded random clusters, up to 80 layers x 64 nodes.

Prints a table (median / p95 ms per solve), then one JSON line with every figure. Run:
    python -m bench.solver [--reps N]
The DP carries one row per possible head (trusted node, with privacy hard), so the trusted count is a column.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from common.spans import even_boundaries, spans_from_boundaries
from orchestrator.planning import Problem, SolveResult, solve_migration, solve_resplit
from orchestrator.planning.synthetic import random_problem

log = logging.getLogger("bench.solver")

SIZES = [(8, 4, 1), (32, 8, 2), (32, 16, 4), (80, 32, 4), (80, 64, 1), (80, 64, 4), (80, 64, 8), (80, 64, 16),
         (80, 64, 64)]


def _time(fn: Callable[[Problem], SolveResult], problems: list[Problem]) -> tuple[list[float], int]:
    times, feasible = [], 0
    for p in problems:
        t0 = time.perf_counter()
        r = fn(p)
        times.append((time.perf_counter() - t0) * 1e3)
        feasible += r.feasible
    return times, feasible


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=40, help="random instances per size")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    load = os.getloadavg()[0]
    rows = []
    for layers, nodes, trusted in SIZES:
        rng = random.Random(layers * 1000 + nodes * 10 + trusted)
        problems = [random_problem(rng, layers, nodes, trusted) for _ in range(args.reps)]
        solve_resplit(problems[0])  # warm caches and imports outside the timing
        spans = spans_from_boundaries(even_boundaries(layers, min(4, layers)))
        t_rs, ok_rs = _time(solve_resplit, problems)
        t_mg, ok_mg = _time(partial(solve_migration, current_spans=spans), problems)
        row = {"layers": layers, "nodes": nodes, "trusted": trusted, "reps": args.reps,
               "resplit_median_ms": statistics.median(t_rs), "resplit_p95_ms": _p95(t_rs),
               "migration_median_ms": statistics.median(t_mg), "migration_p95_ms": _p95(t_mg),
               "resplit_feasible": ok_rs, "migration_feasible": ok_mg}
        rows.append(row)
        log.info("done %dx%d (trusted %d): resplit median %.1f ms", layers, nodes, trusted, row["resplit_median_ms"])
    print(f"solver timings, {args.reps} seeded random clusters per row, {os.cpu_count()} CPUs, load avg {load:.1f}")
    print(f"{'layers':>6} {'nodes':>5} {'trusted':>7} | {'resplit med':>11} {'p95':>7} | {'migrate med':>11} "
          f"{'p95':>7} | feasible rs/mg")
    for r in rows:
        print(f"{r['layers']:>6} {r['nodes']:>5} {r['trusted']:>7} | {r['resplit_median_ms']:>8.2f} ms "
              f"{r['resplit_p95_ms']:>7.2f} | {r['migration_median_ms']:>8.2f} ms {r['migration_p95_ms']:>7.2f} | "
              f"{r['resplit_feasible']}/{r['migration_feasible']}")
    print(json.dumps({"bench": "solver", "cpus": os.cpu_count(), "load_avg_1m": load, "rows": rows}))


if __name__ == "__main__":
    main()
