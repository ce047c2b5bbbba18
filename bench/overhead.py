"""What splitting costs: single-process decode vs the mesh with 1 and 3 segments on loopback.

All run in one session, interleaved round by round so machine noise hits them alike. The 3-segment
mesh runs twice, with activation encryption on (the default) and off, to price the frame crypto
(target: encrypted tokens/s >= 0.97x plaintext). The per-hop overhead is measured per step by the
nodes themselves (see bench/hop_metrics.py): the head's wait for the token minus the compute of every
node after it, per boundary, so compute noise cancels; the difference of end-to-end token times is
printed beside it, and so is the floor of the transport itself on this box (bench/transport_floor.py:
a bare gRPC aio stream between two processes with the same pause between round trips). Prints a table,
the ratios and the per-hop overhead, then one JSON line with every figure.

    .venv/bin/python bench/overhead.py --tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from bench.embedded import embedded_model
from bench.hop_metrics import delta, quantile, scrape
from bench.transport_floor import floors
from common.chat import chat_token_ids
from common.model_import import EMBEDDED_MODEL_NAME
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec, free_port

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def single_process_step_times(model: torch.nn.Module, prompt_ids: list[int], tokens: int) -> list[float]:
    """Greedy decode with transformers' own model and cache; seconds per decode step (prefill excluded)."""
    times = []
    with torch.inference_mode():
        cache = DynamicCache()
        ids = torch.tensor([prompt_ids])
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(tokens - 1):
            nxt = logits[:, -1:].argmax(-1)
            started = time.perf_counter()
            logits = model(nxt, past_key_values=cache, use_cache=True).logits
            times.append(time.perf_counter() - started)
    return times


def mesh_step_times(client: Client, tokens: int) -> list[float]:
    """Inter-arrival time of streamed tokens after the first (the decode steps)."""
    arrivals = [time.perf_counter() for _ in client.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True)]
    return [b - a for a, b in itertools.pairwise(arrivals)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each configuration")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    console = Console()
    embedded = embedded_model(args.store)
    store, reference, tokenizer = embedded.store, embedded.reference, embedded.tokenizer
    prompt_ids = chat_token_ids(tokenizer, PROMPT)

    work = Path(tempfile.mkdtemp(prefix="splitmesh-bench-"))

    def three_segments(name: str, encrypt: bool) -> LocalMesh:
        return LocalMesh(MeshSpec(nodes=3, store=store.root, workdir=work / name, orchestrator_port=0,
                                  trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                                  placement=("node-0", "node-1", "node-2"), encrypt_activations=encrypt,
                                  metrics_port=free_port()))

    one = LocalMesh(MeshSpec(nodes=1, store=store.root, workdir=work / "one", orchestrator_port=0))
    three = three_segments("three", encrypt=True)
    three_plain = three_segments("three-plain", encrypt=False)
    meshes = [one, three, three_plain]
    samples: dict[str, list[float]] = {"single": [], "mesh1": [], "mesh3": [], "mesh3_plain": []}
    try:
        with console.status("starting three local meshes (1 segment; 3 segments encrypted and in clear)"):
            for mesh in meshes:
                mesh.start()
        with Client(one.address) as c1, Client(three.address) as c3, Client(three_plain.address) as c3p, \
                Progress(console=console) as progress:
            for client in (c1, c3, c3p):
                mesh_step_times(client, 4)  # warm-up: first calls load tokenizers and open channels
            hops_before = {m: scrape(m.node_metrics_ports) for m in (three, three_plain)}
            task = progress.add_task("interleaved rounds", total=args.rounds)
            for _ in range(args.rounds):
                samples["single"] += single_process_step_times(reference, prompt_ids, args.tokens)
                samples["mesh1"] += mesh_step_times(c1, args.tokens)
                samples["mesh3"] += mesh_step_times(c3, args.tokens)
                samples["mesh3_plain"] += mesh_step_times(c3p, args.tokens)
                progress.advance(task)
            hops = {m: delta(scrape(m.node_metrics_ports), hops_before[m]) for m in (three, three_plain)}
    finally:
        for mesh in meshes:
            mesh.stop()

    with console.status("transport floor: bare gRPC aio round trips between two processes"):
        floor = floors(store.root, EMBEDDED_MODEL_NAME)
    median_ms = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    tps = {k: 1000.0 / v for k, v in median_ms.items()}
    boundaries = 2  # the 3-segment chain crosses two node boundaries per token (the token goes tail -> head)
    end_to_end_per_hop_ms = (median_ms["mesh3"] - median_ms["mesh1"]) / boundaries
    # Only the head observes (the ring's wait, per boundary); a link nobody observed has no figure.
    hop_ms = {f"{'encrypted' if m is three else 'plain'} {a}->{b}": quantile(buckets, 0.5) * 1000
              for m, per_link in hops.items() for (a, b), buckets in sorted(per_link.items())
              if buckets and max(buckets.values()) > 0}
    encrypted_hops = [v for k, v in hop_ms.items() if k.startswith("encrypted")]
    per_hop_ms = statistics.median(encrypted_hops)
    figures = {
        "tokens_per_run": args.tokens, "rounds": args.rounds,
        "single_ms_per_token": round(median_ms["single"], 3), "mesh1_ms_per_token": round(median_ms["mesh1"], 3),
        "mesh3_ms_per_token": round(median_ms["mesh3"], 3),
        "single_tokens_per_s": round(tps["single"], 2), "mesh1_tokens_per_s": round(tps["mesh1"], 2),
        "mesh3_tokens_per_s": round(tps["mesh3"], 2),
        "mesh1_vs_single": round(tps["mesh1"] / tps["single"], 3),
        "mesh3_vs_single": round(tps["mesh3"] / tps["single"], 3),
        "mesh3_plain_ms_per_token": round(median_ms["mesh3_plain"], 3),
        "mesh3_plain_tokens_per_s": round(tps["mesh3_plain"], 2),
        "encrypted_vs_plain": round(tps["mesh3"] / tps["mesh3_plain"], 3),
        "per_hop_overhead_ms_median": round(per_hop_ms, 3),
        "per_hop_overhead_ms_by_link": {k: round(v, 3) for k, v in hop_ms.items()},
        "end_to_end_difference_ms_per_boundary": round(end_to_end_per_hop_ms, 3),
        **floor, "per_hop_vs_floor_with_compute": round(per_hop_ms / floor["floor_with_compute_ms"], 3),
    }
    table = Table(title=f"decode speed, median of {args.rounds} x {args.tokens - 1} steps, SmolLM2-135M fp32 on CPU")
    for column in ("configuration", "ms/token", "tokens/s", "vs single-process"):
        table.add_column(column, justify="right")
    for key, label in (("single", "single process (transformers)"), ("mesh1", "mesh, 1 segment"),
                       ("mesh3", "mesh, 3 segments (encrypted)"),
                       ("mesh3_plain", "mesh, 3 segments (in clear)")):
        table.add_row(label, f"{median_ms[key]:.2f}", f"{tps[key]:.2f}", f"{tps[key] / tps['single']:.3f}x")
    console.print(table)
    console.print(f"per-hop overhead (per node boundary: the ring's wait beyond compute over its boundaries, "
                  f"measured per step by the head): "
                  f"{per_hop_ms:.3f} ms median (target <= 0.5 ms); by link: "
                  + ", ".join(f"{k} {v:.3f} ms" for k, v in hop_ms.items()))
    console.print(f"transport floor (bare gRPC aio, no splitmesh code): {floor['floor_back_to_back_ms']:.3f} ms back "
                  f"to back, {floor['floor_idle_gap_ms']:.3f} ms when both sides sleep a decode step between round "
                  f"trips, {floor['floor_with_compute_ms']:.3f} ms with a real 10-layer decode step on the server; "
                  f"the mesh's hop costs {figures['per_hop_vs_floor_with_compute']:.2f}x the last")
    console.print(f"end-to-end: (3-segment - 1-segment ms/token) / {boundaries} boundaries = "
                  f"{end_to_end_per_hop_ms:.3f} ms "
                  f"(includes compute noise); 3-segment / single = {figures['mesh3_vs_single']:.3f} (target >= 0.95)")
    console.print(f"activation encryption: {tps['mesh3']:.2f} vs {tps['mesh3_plain']:.2f} tokens/s in clear = "
                  f"{figures['encrypted_vs_plain']:.3f}x (target >= 0.97)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
