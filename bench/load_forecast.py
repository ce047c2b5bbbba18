"""The load-aware cost model against the mesh it predicts: ms/token and tokens/s at each concurrency.

A 3-node mesh (SmolLM2-135M, one segment per node, loopback) runs N sessions at once; half-way through,
``resplit --dry-run`` asks the orchestrator what it predicts for the current plan at the load the nodes
report (sessions, decode rows per forward, each node's per-forward and per-row decode cost), and the run
measures what the sessions got: inter-token p50 (ms/token) and aggregate tokens/s after the first token.
Prints a table, the predicted/measured ratios, then one JSON line with every figure.

    .venv/bin/python bench/load_forecast.py --sessions 1,4,16 --tokens 48
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOPICS = ("a lighthouse keeper", "a lost cat", "the first snow", "a robot gardener")


def _steady(arrivals: list[list[float]]) -> dict[str, float]:
    """Figures of the decode phase only: gaps after each session's first token, tokens/s between the last
    first token and the first last token (every session decoding)."""
    gaps = sorted(b - a for times in arrivals for a, b in itertools.pairwise(times))
    start = max(times[0] for times in arrivals)
    end = min(times[-1] for times in arrivals)
    inside = sum(1 for times in arrivals for t in times if start < t <= end)
    return {"itl_p50_ms": round(gaps[len(gaps) // 2] * 1000, 2) if gaps else 0.0,
            "tokens_per_s": round(inside / (end - start), 2) if end > start else 0.0}


def main() -> int:
    from node_agent.openmp import bound_spinning

    bound_spinning(1000)
    from bench.embedded import embedded_model
    from common.chat import chat_token_ids
    from splitmesh import Client
    from splitmesh.launcher import LocalMesh, MeshSpec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per session")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    levels = [int(s) for s in args.sessions.split(",")]
    embedded = embedded_model(args.store)
    prompts = [chat_token_ids(embedded.tokenizer, [{"role": "user", "content": f"Tell me about {TOPICS[i % 4]}."}])
               for i in range(max(levels))]
    most = str(max(*levels, 64))
    spec = MeshSpec(nodes=3, store=embedded.store.root, workdir=Path(tempfile.mkdtemp(prefix="splitmesh-load-")),
                    orchestrator_port=0, trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-2"),
                    extra_env={"SPLITMESH_MAX_SESSIONS": most, "SPLITMESH_MAX_QUEUED_SESSIONS": most,
                               "SPLITMESH_ADAPTIVE": "false"})  # the plan predicted is the plan measured
    rows: list[dict[str, Any]] = []
    with LocalMesh(spec) as mesh, Client(mesh.address) as admin:
        for level in [1, *levels]:  # the first run warms up (and gives every node a one-row decode cost)
            arrivals: list[list[float]] = [[] for _ in range(level)]

            def session(index: int, out: list[list[float]] = arrivals) -> None:
                with Client(mesh.address) as client:
                    for _ in client.generate(prompts[index], max_new_tokens=args.tokens, ignore_eos=True):
                        out[index].append(time.perf_counter())

            threads = [threading.Thread(target=session, args=(i,)) for i in range(level)]
            for thread in threads:
                thread.start()
            while min(len(a) for a in arrivals) < args.tokens // 2 and any(t.is_alive() for t in threads):
                time.sleep(0.05)
            time.sleep(1.2)  # one more capacity report at this load
            dry = admin.resplit(dry_run=True)
            nodes = {n.node_id: {"one_row_ms": round(n.capacity.layer_decode_ms, 3),
                                 "row_ms": round(n.capacity.layer_decode_row_ms, 3),
                                 "rows_per_forward": round(n.capacity.decode_rows_mean, 2),
                                 "other_cpu": round(n.capacity.cpu_utilisation, 2)} for n in admin.status().nodes}
            for thread in threads:
                thread.join()
            measured = _steady(arrivals)
            rows.append({"sessions": level, "load_sessions": dry.load_sessions,
                         "rows_per_forward": round(dry.load_batch_rows, 2),
                         "predicted_ms": round(dry.predicted_ms_old, 2),
                         "predicted_tokens_per_s": round(dry.predicted_tokens_per_s_old, 2),
                         "bound_by": dry.bottleneck_old, "measured_itl_p50_ms": measured["itl_p50_ms"],
                         "measured_tokens_per_s": measured["tokens_per_s"],
                         "proposed_ms": round(dry.predicted_ms_new, 2),
                         "proposed_tokens_per_s": round(dry.predicted_tokens_per_s_new, 2), "nodes": nodes})
    rows = rows[1:]
    print(f"3-node mesh [0,10,20,30), SmolLM2-135M fp32 on CPU, {args.tokens} tokens per session")
    print(f"{'users':>5} {'rows/fwd':>8} {'pred ms':>8} {'meas ms':>8} {'pred tok/s':>10} {'meas tok/s':>10}  bound by")
    for r in rows:
        print(f"{r['sessions']:>5} {r['rows_per_forward']:>8} {r['predicted_ms']:>8} {r['measured_itl_p50_ms']:>8} "
              f"{r['predicted_tokens_per_s']:>10} {r['measured_tokens_per_s']:>10}  {r['bound_by']}")
    for r in rows:
        meas_ms, meas_rate = r["measured_itl_p50_ms"], r["measured_tokens_per_s"]
        r["ms_ratio"] = round(r["predicted_ms"] / meas_ms, 3) if meas_ms else 0.0
        r["rate_ratio"] = round(r["predicted_tokens_per_s"] / meas_rate, 3) if meas_rate else 0.0
        print(f"{r['sessions']} sessions: predicted/measured ms/token {r['ms_ratio']}, tokens/s {r['rate_ratio']}; "
              "per node (ms/layer one row, + per row, rows/forward, other CPU): "
              + ", ".join(f"{k} {v['one_row_ms']}+{v['row_ms']} x{v['rows_per_forward']} {v['other_cpu']:.0%}"
                          for k, v in sorted(r["nodes"].items())))
    print(json.dumps({"tokens": args.tokens, "levels": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
