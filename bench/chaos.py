"""Fault trials against a local mesh: at a random token of a streaming generation, kill -9 a random middle
node, pause it (SIGSTOP), or cut the link to it (a TCP proxy in front of the node resets every connection
and refuses new ones, while the node itself keeps running and reporting); check the generation completes
with the fault-free tokens, that no token came from an older plan once a newer one was serving the session
(a resumed or reconnected node's late work is never mixed in), and that no session is left behind; report
recovery time (the longest token gap) p50/p95 per fault kind.

    .venv/bin/python bench/chaos.py --trials 50
    .venv/bin/python bench/chaos.py --kinds link-cut --trials 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.faults import FAULT_KINDS, heal, inject, put_proxies, sessions_left, wait_all_alive, wait_links_up
from bench.tcp_proxy import TcpProxy
from splitmesh import Client
from splitmesh.client import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec

PROMPT = [{"role": "user", "content": "Explain how a bicycle works."}]
MIDDLE = ["node-1", "node-2"]


def trial(mesh: LocalMesh, proxies: dict[str, TcpProxy], rng: random.Random, kind: str, tokens: int,
          expected: list[int]) -> dict[str, float]:
    victim = rng.choice(MIDDLE)
    at = rng.randint(1, tokens // 2)
    with Client(mesh.address) as client:
        client.resplit([0, 10, 20, 30], ["node-0", victim, "node-0"])
        mesh.wait_serving(60)
        arrivals, ids, epochs = [], [], []
        injected = False
        try:
            for event in client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True):
                arrivals.append(time.perf_counter())
                ids.append(event.token_id)
                epochs.append(event.epoch)
                if event.index == at:
                    inject(mesh, proxies, kind, victim)
                    injected = True
            completed = 1.0
        except SplitmeshError as exc:
            print(f"{kind} trial on {victim} at token {at} failed: {exc}", file=sys.stderr)
            completed = 0.0
    if injected:
        heal(mesh, proxies, kind, victim)  # back for the next trial
    mesh.wait_serving(60)
    wait_all_alive(mesh)
    wait_links_up(mesh)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    stale = sum(1 for i, epoch in enumerate(epochs) if epoch < max(epochs[: i + 1]))
    return {"completed": completed, "identical": float(ids == expected), "recovery_s": max(gaps) if gaps else 0.0,
            "stale_epoch_tokens": float(stale), "sessions_left": float(sessions_left(mesh))}


def summarise(results: dict[str, list[dict[str, float]]], console: Console) -> dict[str, float]:
    table = Table(title="chaos trials on a 3-node loopback mesh (SmolLM2-135M)")
    for column in ("fault", "trials", "completed", "identical tokens", "recovery p50 s", "recovery p95 s",
                   "old-epoch tokens", "sessions left"):
        table.add_column(column, justify="right")
    figures: dict[str, float] = {}
    for kind, rows in results.items():
        recovery = sorted(r["recovery_s"] for r in rows)
        p95 = recovery[min(len(recovery) - 1, int(0.95 * len(recovery)))]
        row = {"trials": len(rows), "completed": sum(r["completed"] for r in rows),
               "identical": sum(r["identical"] for r in rows), "recovery_p50_s": statistics.median(recovery),
               "recovery_p95_s": p95, "stale_epoch_tokens": sum(r["stale_epoch_tokens"] for r in rows),
               "sessions_left": sum(r["sessions_left"] for r in rows)}
        figures.update({f"{kind.replace('-', '_')}_{k}": round(v, 3) for k, v in row.items()})
        table.add_row(kind, str(row["trials"]), f"{row['completed']:.0f}", f"{row['identical']:.0f}",
                      f"{row['recovery_p50_s']:.2f}", f"{p95:.2f}", f"{row['stale_epoch_tokens']:.0f}",
                      f"{row['sessions_left']:.0f}")
    console.print(table)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50, help="trials per fault kind")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--kinds", default=",".join(FAULT_KINDS), help=f"comma-separated: {', '.join(FAULT_KINDS)}")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    console = Console()
    rng = random.Random(args.seed)
    spec = MeshSpec(nodes=3, store=Path("~/.cache/splitmesh/store"), workdir=Path(tempfile.mkdtemp()),
                    orchestrator_port=0, trusted=("node-0",), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-0"))
    mesh = LocalMesh(spec)
    # Proxies only when links are cut: otherwise every hop would pay for a user-space relay.
    proxies = put_proxies(mesh, MIDDLE) if "link-cut" in kinds else {}
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with mesh, Progress(console=console) as progress:
            with Client(mesh.address) as client:
                expected = [e.token_id for e in client.generate(PROMPT, max_new_tokens=args.tokens, ignore_eos=True)]
            for kind in kinds:
                task = progress.add_task(f"{kind} trials", total=args.trials)
                results[kind] = []
                for _ in range(args.trials):
                    results[kind].append(trial(mesh, proxies, rng, kind, args.tokens, expected))
                    progress.advance(task)
    finally:
        for proxy in proxies.values():
            proxy.close()
    figures = summarise(results, console)
    console.print("Targets: every trial completes with identical tokens and no old-epoch token; p95 recovery <= 5 s.")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
