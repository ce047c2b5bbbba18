"""Orchestrator time per monitoring cycle with N nodes: ingest every node's report, rebuild E(t),
update the latency EWMA and evaluate ShouldReconfigure on the current plan (no trigger firing, so no
solve: the solver has its own benchmark, bench/solver.py).

    .venv/bin/python bench/monitoring.py --nodes 64 --cycles 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.proto import splitmesh_pb2 as pb
from common.spans import Span, even_boundaries, spans_from_boundaries
from orchestrator.environment import cluster_state
from orchestrator.planning import DecisionEngine, Plan
from orchestrator.policy import Policy
from orchestrator.registry import Registry


def reports(nodes: int, cycle: int) -> list[bytes]:
    """Serialized reports as they arrive on the wire, each with links to every other node."""
    out = []
    for i in range(nodes):
        links = [pb.LinkStatus(peer_id=f"node-{j}", bandwidth_bps=1e9 - cycle, rtt_ms=1.0)
                 for j in range(nodes) if j != i]
        out.append(pb.NodeReport(node_id=f"node-{i}", capacity=pb.Capacity(
            cpu_utilisation=0.3, memory_total_bytes=64 << 30, memory_available_bytes=48 << 30,
            layer_decode_ms=0.4, cpu_count=16), links=links, token_latency_ms=80.0 if i == 0 else 0.0,
            tokens=10 if i == 0 else 0, plan_epoch=1).SerializeToString())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    registry = Registry({f"node-{i}" for i in range(4)}, dead_after_s=3.0)
    for i in range(args.nodes):
        registry.register(pb.RegisterRequest(node_id=f"node-{i}", address=f"10.0.0.{i}:50061"))
    policy = Policy()
    engine = DecisionEngine(policy.decision)
    spans = spans_from_boundaries(even_boundaries(32, 4))
    plan = Plan.of([(s, n) for s, n in zip(spans, ["node-0", "node-5", "node-9", "node-1"], strict=True)])
    assert isinstance(plan.spans[0], Span)
    batches = [reports(args.nodes, c) for c in range(args.cycles)]
    times = []
    for batch in track(batches, description=f"{args.cycles} monitoring cycles, {args.nodes} nodes"):
        started = time.perf_counter()
        for raw in batch:
            report = pb.NodeReport()
            report.ParseFromString(raw)
            registry.report(report)
            if report.tokens:
                engine.observe_latency(report.token_latency_ms)
        cluster = cluster_state(registry.alive_nodes(), policy)
        fired = engine.triggers(cluster, plan)
        times.append(time.perf_counter() - started)
        assert not fired, fired
    median_ms = statistics.median(times) * 1000
    p95_ms = sorted(times)[int(0.95 * (len(times) - 1))] * 1000
    table = Table(title="orchestrator monitoring cycle")
    for column in ("nodes", "links", "median ms", "p95 ms", "target ms", "median / target"):
        table.add_column(column, justify="right")
    table.add_row(str(args.nodes), str(args.nodes * (args.nodes - 1)), f"{median_ms:.2f}", f"{p95_ms:.2f}", "10",
                  f"{median_ms / 10:.2f}")
    Console().print(table)
    print(json.dumps({"nodes": args.nodes, "cycles": args.cycles, "median_ms": round(median_ms, 3),
                      "p95_ms": round(p95_ms, 3), "target_ms": 10.0, "median_over_target": round(median_ms / 10, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
