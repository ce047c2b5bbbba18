"""How long a live re-split takes and what an in-flight generation notices.

For the embedded model on loopback: the time from the resplit request to COMMIT, and the longest
gap between two streamed tokens of a generation running across the switch, once with every node's
weights already in its local store and once with empty node stores (weights streamed from the
orchestrator during PREPARE). Every generation must finish with the tokens of a run without re-split.
``--encrypted`` instead compares local weights from a plaintext store with local weights from the same model
encrypted at rest (private plaintext and encrypted copies of the store, in one run; target: at most 5%
slower to COMMIT): once on nodes with their default settings, and once on nodes with a 60 s weight reserve
(``SPLITMESH_WEIGHT_RESERVE_S=60``: the layers of a plan change decrypted into memory released layers left).

    .venv/bin/python bench/reconfig.py --switches 6
    .venv/bin/python bench/reconfig.py --switches 6 --encrypted
"""

from __future__ import annotations

import argparse
import contextlib
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
from common.store_encryption import encrypted_copy, plaintext_copy
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

PROMPT = [{"role": "user", "content": "Describe the water cycle in detail."}]
PLANS = [([0, 10, 20, 30], ["node-0", "node-1", "node-2"]), ([0, 4, 25, 30], ["node-0", "node-2", "node-1"]),
         ([0, 15, 30], ["node-0", "node-2"]), ([0, 7, 14, 30], ["node-0", "node-1", "node-2"])]


def _switch(mesh: LocalMesh, client: Client, i: int, tokens: int, reference: list[int],
            out: dict[str, list[float]]) -> None:
    """One re-split to the next plan in PLANS while a generation streams, its figures appended to ``out``."""
    boundaries, placement = PLANS[(i + 1) % len(PLANS)]
    arrivals: list[float] = []
    ids: list[int] = []
    commit: list[float] = []

    def resplit() -> None:
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


def measure(meshes: dict[str, LocalMesh], switches: int, tokens: int,
            progress: Progress) -> dict[str, dict[str, list[float]]]:
    """``switches`` re-splits on each mesh, taking turns (mesh A, mesh B, A, ...), so a machine whose load
    drifts during the run weighs on every mesh alike."""
    out: dict[str, dict[str, list[float]]] = {
        label: {"commit_s": [], "pause_s": [], "steady_gap_s": [], "failed": [], "mismatch": []} for label in meshes}
    with contextlib.ExitStack() as stack:
        clients = {label: stack.enter_context(Client(mesh.address)) for label, mesh in meshes.items()}
        references = {label: [e.token_id for e in c.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True)]
                      for label, c in clients.items()}
        task = progress.add_task(" vs ".join(meshes), total=switches * len(meshes))
        for i in range(switches):
            for label, mesh in meshes.items():
                _switch(mesh, clients[label], i, tokens, references[label], out[label])
                progress.advance(task)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=6, help="re-splits per configuration")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per generation")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    parser.add_argument("--encrypted", action="store_true",
                        help="plaintext vs encrypted store, both with local weights (the store is only read)")
    args = parser.parse_args()
    console = Console()
    store = ModelStore(Path(args.store).expanduser())
    ensure_embedded(store)
    results = {}
    runs: list[tuple[str, str, ModelStore, bool, dict[str, str]]] = [("local", "local", store, False, {}),
                                                                     ("streamed", "streamed", store, True, {})]
    if args.encrypted:
        name = "smollm2-135m-instruct"
        encrypted = encrypted_copy(store, name, Path(tempfile.mkdtemp(prefix="splitmesh-enc-")))
        plain = plaintext_copy(store, name, Path(tempfile.mkdtemp(prefix="splitmesh-plain-")))
        runs = [("plaintext", "plain", plain, False, {}), ("encrypted", "encrypted", encrypted, False, {}),
                ("+ reserve", "reserved", encrypted, False, {"SPLITMESH_WEIGHT_RESERVE_S": "60"})]
    keys = {label: key for label, key, *_ in runs}
    # Plaintext and encrypted stores run side by side, taking turns; local and streamed weights one after the
    # other, as before.
    groups = [runs] if args.encrypted else [[run] for run in runs]
    with Progress(console=console) as progress:
        for group in groups:
            with contextlib.ExitStack() as stack:
                meshes: dict[str, LocalMesh] = {}
                for label, _, run_store, empty, env in group:
                    work = Path(tempfile.mkdtemp(prefix="splitmesh-reconfig-"))
                    spec = MeshSpec(nodes=3, store=run_store.root, workdir=work, orchestrator_port=0,
                                    trusted=("node-0", "node-1", "node-2"), boundaries=PLANS[0][0],
                                    placement=PLANS[0][1], node_stores_empty=empty, extra_env=env)
                    meshes[label] = stack.enter_context(LocalMesh(spec))
                results.update(measure(meshes, args.switches, args.tokens, progress))
    table = Table(title=f"live re-split, SmolLM2-135M on loopback, {args.switches} switches each")
    for column in ("weights", "COMMIT s", "max s", "pause s", "max s", "gap s", "failed", "differ"):
        table.add_column(column, justify="right")
    figures: dict[str, float] = {"switches": args.switches}
    for label, r in results.items():
        key = keys[label]
        row = {"commit_median_s": statistics.median(r["commit_s"]), "commit_max_s": max(r["commit_s"]),
               "pause_median_s": statistics.median(r["pause_s"]), "pause_max_s": max(r["pause_s"]),
               "steady_gap_s": statistics.median(r["steady_gap_s"]), "failed": sum(r["failed"]),
               "mismatched": sum(r["mismatch"])}
        figures.update({f"{key}_{k}": round(v, 4) for k, v in row.items()})
        table.add_row(label, *(f"{row[k]:.3f}" for k in ("commit_median_s", "commit_max_s", "pause_median_s",
                                                          "pause_max_s", "steady_gap_s")),
                      str(int(row["failed"])), str(int(row["mismatched"])))
    console.print(table)
    console.print("COMMIT s: request -> COMMIT, median; pause s: the longest gap between two tokens of a generation "
                  "across the switch, median; gap s: the median gap between tokens. Target: <= 1 s request -> "
                  "COMMIT with local weights, no failed request.")
    if args.encrypted:
        figures["encrypted_commit_ratio"] = round(figures["encrypted_commit_median_s"] /
                                                  figures["plain_commit_median_s"], 4)
        figures["reserved_commit_ratio"] = round(figures["reserved_commit_median_s"] /
                                                 figures["plain_commit_median_s"], 4)
        console.print(f"encrypted / plaintext request -> COMMIT median: {figures['encrypted_commit_ratio']:.3f} "
                      f"(target <= 1.05); with a 60 s weight reserve: {figures['reserved_commit_ratio']:.3f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
