"""A long prompt admitted while other sessions decode: how much their inter-token gaps grow while it prefills.

Two 3-segment meshes in one run, the same model and prompts: the baseline prefills a prompt whole
(``prefill_chunk_tokens`` 0), the candidate in chunks (the default 256). In each, ``--running`` sessions
decode; once every one has streamed ``--warm`` tokens, one ``--long``-token prompt arrives. The running
sessions' gaps are split into those before it arrived and those while it prefilled (until its first token).
Rounds alternate between the meshes. Prints a table, then one JSON line.

    .venv/bin/python bench/long_prompt.py --long 2000 --running 4 --rounds 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.openmp import bound_spinning

bound_spinning(1000)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.concurrency_runs import quantile  # noqa: E402
from bench.embedded import embedded_model, shipped_text  # noqa: E402
from splitmesh.launcher import LocalMesh, MeshSpec  # noqa: E402


def one_round(mesh: LocalMesh, short: list[list[int]], long_prompt: list[int], warm: int,
              tokens: int) -> dict[str, list[float]]:
    """Gaps of the running sessions before and during the long prefill, and the long prompt's TTFT."""
    arrivals: list[list[float]] = [[] for _ in short]
    warmed = threading.Barrier(len(short) + 1)

    def running(index: int) -> None:
        with mesh.client() as client:
            for _ in client.generate(short[index], max_new_tokens=tokens, ignore_eos=True):
                arrivals[index].append(time.perf_counter())
                if len(arrivals[index]) == warm:
                    warmed.wait()

    threads = [threading.Thread(target=running, args=(i,)) for i in range(len(short))]
    for thread in threads:
        thread.start()
    warmed.wait()
    with mesh.client() as client:
        sent = time.perf_counter()
        stream = client.generate(long_prompt, max_new_tokens=2, ignore_eos=True)
        next(stream)
        first = time.perf_counter()
        for _ in stream:
            pass
    for thread in threads:
        thread.join()
    before, during = [], []
    for times in arrivals:
        for a, b in itertools.pairwise(times):
            if b <= sent:
                before.append(b - a)
            elif a < first:
                during.append(b - a)
    return {"before": before, "during": during, "ttft": [first - sent]}


def figures(gaps: dict[str, list[float]]) -> dict[str, float]:
    return {"itl_before_p50_ms": round(quantile(gaps["before"], 0.5) * 1000, 1),
            "itl_during_p50_ms": round(quantile(gaps["during"], 0.5) * 1000, 1),
            "itl_during_p95_ms": round(quantile(gaps["during"], 0.95) * 1000, 1),
            "itl_during_max_ms": round(max(gaps["during"], default=float("nan")) * 1000, 1),
            "long_ttft_ms": round(quantile(gaps["ttft"], 0.5) * 1000, 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", type=int, default=2000, help="tokens in the long prompt")
    parser.add_argument("--running", type=int, default=4, help="sessions decoding when it arrives")
    parser.add_argument("--warm", type=int, default=8, help="tokens each running session streams first")
    parser.add_argument("--tokens", type=int, default=160, help="tokens each running session generates")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    console = Console()
    embedded = embedded_model(args.store)
    text = shipped_text()
    ids = [int(i) for i in embedded.tokenizer(text)["input_ids"]]
    if len(ids) < args.long + 100:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --long {args.long}")
    long_prompt = ids[100:100 + args.long]
    short = [ids[11 * k:11 * k + 12] for k in range(args.running)]
    work = Path(tempfile.mkdtemp(prefix="splitmesh-long-prompt-"))
    configs = {"whole prompt": "0", "chunks of 256": "256"}
    meshes = {name: LocalMesh(MeshSpec(nodes=3, store=embedded.store.root, workdir=work / chunk, orchestrator_port=0,
                                       trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                                       placement=("node-0", "node-1", "node-2"),
                                       extra_env={"SPLITMESH_PREFILL_CHUNK_TOKENS": chunk}))
              for name, chunk in configs.items()}
    pooled: dict[str, dict[str, list[float]]] = {n: {"before": [], "during": [], "ttft": []} for n in meshes}
    try:
        with console.status("starting two 3-node meshes"):
            for mesh in meshes.values():
                mesh.start()
        for round_ in range(args.rounds):
            for name, mesh in meshes.items():
                with console.status(f"round {round_ + 1}/{args.rounds}: {name}"):
                    for key, values in one_round(mesh, short, long_prompt, args.warm, args.tokens).items():
                        pooled[name][key].extend(values)
    finally:
        for mesh in meshes.values():
            mesh.stop()
    results = {name: figures(gaps) for name, gaps in pooled.items()}
    table = Table(title=f"{args.running} sessions decoding while a {args.long}-token prompt prefills "
                        f"(3 segments, {args.rounds} rounds, ms)")
    for column in ("prefill", "ITL before", "during p50", "p95", "max", "long TTFT"):
        table.add_column(column, justify="right")
    for name, f in results.items():
        table.add_row(name, f"{f['itl_before_p50_ms']:.0f}", f"{f['itl_during_p50_ms']:.0f}",
                      f"{f['itl_during_p95_ms']:.0f}", f"{f['itl_during_max_ms']:.0f}", f"{f['long_ttft_ms']:.0f}")
    console.print(table)
    whole, chunked = results["whole prompt"], results["chunks of 256"]
    ratio = round(chunked["itl_during_max_ms"] / whole["itl_during_max_ms"], 3)
    console.print(f"longest gap while it prefills, chunked / whole: {ratio}")
    print(json.dumps({"long_tokens": args.long, "running": args.running, "rounds": args.rounds,
                      "results": results, "max_gap_chunked_vs_whole": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
