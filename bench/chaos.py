"""Fault trials against a local mesh: kill -9 a random middle node, or pause it (SIGSTOP), at a random
token of a streaming generation; check the generation completes with the fault-free tokens and that no
session is left behind; report recovery time (the longest token gap) p50/p95.

    .venv/bin/python bench/chaos.py --trials 50
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import sync_channel
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

PROMPT = [{"role": "user", "content": "Explain how a bicycle works."}]
MIDDLE = ["node-1", "node-2"]


def sessions_left(mesh: LocalMesh, settle_s: float = 15.0) -> int:
    """Open sessions on every node once cancellations have had ``settle_s`` to propagate (a leak stays)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = _open_sessions(mesh)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


def _open_sessions(mesh: LocalMesh) -> int:
    total = 0
    for node, address in mesh.node_addresses.items():
        if mesh.processes[node].poll() is not None:
            continue
        with sync_channel(address, mesh.client_tls) as channel:
            total += pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions
    return total


def wait_all_alive(mesh: LocalMesh, timeout_s: float = 60.0) -> None:
    """Until every node (a restarted one too) reports to the orchestrator again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = mesh.status()
        if status is not None and sum(n.alive for n in status.nodes) == len(mesh.node_ids):
            return
        time.sleep(0.2)
    raise TimeoutError("a node did not come back")


def trial(mesh: LocalMesh, rng: random.Random, kind: str, tokens: int, expected: list[int]) -> dict[str, float]:
    victim = rng.choice(MIDDLE)
    at = rng.randint(1, tokens // 2)
    with Client(mesh.address) as client:
        client.resplit([0, 10, 20, 30], ["node-0", victim, "node-0"])
        mesh.wait_serving(60)
        arrivals, ids = [], []
        signalled = False
        try:
            for event in client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True):
                arrivals.append(time.perf_counter())
                ids.append(event.token_id)
                if event.index == at:
                    mesh.signal(victim, signal.SIGKILL if kind == "kill" else signal.SIGSTOP)
                    signalled = True
            completed = 1.0
        except Exception:
            completed = 0.0
    if kind == "stop" and signalled:
        mesh.signal(victim, signal.SIGCONT)
    elif signalled:
        mesh.processes[victim].wait(timeout=30)
        mesh.start_node(victim)  # back for the next trial
    mesh.wait_serving(60)
    wait_all_alive(mesh)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return {"completed": completed, "identical": float(ids == expected), "recovery_s": max(gaps) if gaps else 0.0,
            "sessions_left": float(sessions_left(mesh))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50, help="trials per fault kind")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--kinds", default="kill,stop", help="comma-separated: kill, stop")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    console = Console()
    rng = random.Random(args.seed)
    spec = MeshSpec(nodes=3, store=Path("~/.cache/splitmesh/store"), workdir=Path(tempfile.mkdtemp()),
                    orchestrator_port=0, trusted=("node-0",), boundaries=(0, 10, 20, 30),
                    placement=("node-0", "node-1", "node-0"))
    results: dict[str, list[dict[str, float]]] = {}
    with LocalMesh(spec) as mesh, Progress(console=console) as progress:
        with Client(mesh.address) as client:
            expected = [e.token_id for e in client.generate(PROMPT, max_new_tokens=args.tokens, ignore_eos=True)]
        for kind in args.kinds.split(","):
            task = progress.add_task(f"{kind} trials", total=args.trials)
            results[kind] = []
            for _ in range(args.trials):
                results[kind].append(trial(mesh, rng, kind, args.tokens, expected))
                progress.advance(task)
    table = Table(title="chaos trials on a 3-node loopback mesh (SmolLM2-135M)")
    for column in ("fault", "trials", "completed", "identical tokens", "recovery p50 s", "recovery p95 s",
                   "sessions left"):
        table.add_column(column, justify="right")
    figures: dict[str, float] = {}
    for kind, rows in results.items():
        recovery = sorted(r["recovery_s"] for r in rows)
        p95 = recovery[min(len(recovery) - 1, int(0.95 * len(recovery)))]
        row = {"trials": len(rows), "completed": sum(r["completed"] for r in rows),
               "identical": sum(r["identical"] for r in rows), "recovery_p50_s": statistics.median(recovery),
               "recovery_p95_s": p95, "sessions_left": sum(r["sessions_left"] for r in rows)}
        figures.update({f"{kind}_{k}": round(v, 3) for k, v in row.items()})
        table.add_row(kind, str(row["trials"]), f"{row['completed']:.0f}", f"{row['identical']:.0f}",
                      f"{row['recovery_p50_s']:.2f}", f"{p95:.2f}", f"{row['sessions_left']:.0f}")
    console.print(table)
    console.print("Targets: every node-kill trial completes with identical tokens; p95 recovery <= 5 s.")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
