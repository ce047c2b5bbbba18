"""How long a live re-split takes and what an in-flight generation notices.

For the embedded model on loopback: the time from the resplit request to COMMIT, and the longest
gap between two streamed tokens of a generation running across the switch, once with every node's
weights already in its local store and once with empty node stores (weights streamed from the
orchestrator during PREPARE). Every generation must finish with the tokens of a run without re-split.

    .venv/bin/python bench/reconfig.py --switches 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from common.model_import import ensure_embedded
from common.model_store import ModelStore
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

PROMPT = [{"role": "user", "content": "Describe the water cycle in detail."}]
PLANS = [([0, 10, 20, 30], ["node-0", "node-1", "node-2"]), ([0, 4, 25, 30], ["node-0", "node-2", "node-1"]),
         ([0, 15, 30], ["node-0", "node-2"]), ([0, 7, 14, 30], ["node-0", "node-1", "node-2"])]


def measure(mesh: LocalMesh, switches: int, tokens: int, progress: Progress, label: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"commit_s": [], "pause_s": [], "steady_gap_s": [], "failed": [], "mismatch": []}
    with Client(mesh.address) as client:
        reference = [e.token_id for e in client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True)]
        task = progress.add_task(label, total=switches)
        for i in range(switches):
            boundaries, placement = PLANS[(i + 1) % len(PLANS)]
            arrivals: list[float] = []
            ids: list[int] = []
            commit: list[float] = []

            def resplit(boundaries: list[int] = boundaries, placement: list[str] = placement,
                        commit: list[float] = commit) -> None:
                started = time.perf_counter()
                with Client(mesh.address) as admin:
                    admin.resplit(boundaries, placement)
                commit.append(time.perf_counter() - started)

            switcher = threading.Thread(target=resplit)
            try:
                for event in client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True):
                    arrivals.append(time.perf_counter())
                    ids.append(event.token_id)
                    if event.index == tokens // 3:
                        switcher.start()
            except Exception:
                out["failed"].append(1.0)
            switcher.join()
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            out["commit_s"] += commit
            out["pause_s"].append(max(gaps))
            out["steady_gap_s"].append(statistics.median(gaps))
            out["mismatch"].append(float(ids != reference))
            progress.advance(task)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=6, help="re-splits per configuration")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per generation")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    console = Console()
    store = ModelStore(Path(args.store).expanduser())
    ensure_embedded(store)
    results = {}
    with Progress(console=console) as progress:
        for label, empty in (("local weights", False), ("streamed weights", True)):
            work = Path(tempfile.mkdtemp(prefix="splitmesh-reconfig-"))
            spec = MeshSpec(nodes=3, store=store.root, workdir=work, orchestrator_port=0,
                            trusted=("node-0", "node-1", "node-2"), boundaries=PLANS[0][0], placement=PLANS[0][1],
                            node_stores_empty=empty)
            with LocalMesh(spec) as mesh:
                results[label] = measure(mesh, args.switches, args.tokens, progress, label)
    table = Table(title=f"live re-split, SmolLM2-135M on loopback, {args.switches} switches each")
    for column in ("weights", "request -> COMMIT median s", "max s", "token pause median s", "max s",
                   "steady gap s", "failed", "outputs differ"):
        table.add_column(column, justify="right")
    figures: dict[str, float] = {"switches": args.switches}
    for label, r in results.items():
        key = label.split()[0]
        row = {"commit_median_s": statistics.median(r["commit_s"]), "commit_max_s": max(r["commit_s"]),
               "pause_median_s": statistics.median(r["pause_s"]), "pause_max_s": max(r["pause_s"]),
               "steady_gap_s": statistics.median(r["steady_gap_s"]), "failed": sum(r["failed"]),
               "mismatched": sum(r["mismatch"])}
        figures.update({f"{key}_{k}": round(v, 4) for k, v in row.items()})
        table.add_row(label, *(f"{row[k]:.3f}" for k in ("commit_median_s", "commit_max_s", "pause_median_s",
                                                          "pause_max_s", "steady_gap_s")),
                      str(int(row["failed"])), str(int(row["mismatched"])))
    console.print(table)
    console.print("Target: <= 1 s request -> COMMIT with local weights, no failed request.")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
