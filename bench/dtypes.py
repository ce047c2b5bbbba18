"""fp32 vs bf16 vs int8 weights: speed, memory, bytes per hop, and quality against fp32, in one run.

For each dtype the embedded model is converted once into the store (``<name>-<dtype>``; fp32 is the
embedded import itself) and measured:

- single process (transformers' own model and ``generate``): decode ms/token and tokens/s at 1 session
  and at ``--sessions`` sessions batched (left-padded prompts), prefill ms per 1,000 tokens;
- a 3-segment mesh on loopback (real node processes, encrypted hops): single-session decode ms/token and
  tokens/s, resident memory (RSS) of every node after it, the RSS of a fourth node that hosts nothing (the
  runtime a node costs before any layer) and each node's RSS above it, and aggregate tokens/s of ``--sessions``
  concurrent sessions (one SDK client each, batched on the nodes);
- bytes per hop per token: the payload of one decode step's activation, as the tensor codec encodes it;
- the peer, when ``scripts/build_llama_cpp.sh`` has built it: llama.cpp on the embedded Q4_1 GGUF itself,
  single-stream, ``--sessions`` parallel sequences and a 2-way RPC split on loopback (bench/llama_cpp_peer.py),
  with splitmesh / llama.cpp ratios;
- quality against fp32 (not a gate): greedy agreement on the test prompts and perplexity on the first
  ``--ppl-tokens`` tokens of the Apache-2.0 text that ships in grpcio's dist-info (``licenses/LICENSE``).

Prints tables, ratios to fp32 beside the issue's targets, then one JSON line with every figure.

    .venv/bin/python bench/dtypes.py                   # about 10 minutes on 2 cores
    .venv/bin/python bench/dtypes.py --no-mesh --dtypes float32,int8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import llama_cpp_peer
from bench.concurrency_runs import mesh_run
from bench.embedded import TEXT_SOURCE, model_in, shipped_text
from bench.overhead import single_process_step_times
from common.chat import chat_token_ids
from common.model_import import (
    embedded_gguf_path,
    ensure_embedded,
)
from common.model_store import ModelStore, StoredModel
from common.reference_model import load_reference_model
from common.spans import Span
from common.tensor_codec import encode_tensor
from node_agent.segment import SegmentRunner
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec

PROMPTS = [  # the oracle tests' prompts (tests/test_split_equals_generate.py)
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
    "Translate 'good morning' into Spanish.",
]
BATCH_PROMPTS = [*PROMPTS, "Why is the sky blue?", "Name a famous painter.", "What is two plus two?",
                 "Describe a cat in five words.", "Give me a synonym for happy.", "What is the boiling point of water?",
                 "Who wrote Hamlet?", "Suggest a name for a dog.", "What does a bee make?",
                 "How many legs does a spider have?", "Tell me a fun fact about the moon."]
QUALITY_TOKENS = 24
IDLE_NODE = "node-3"
TARGETS = {"batch_bf16": 1.3, "batch_int8": 1.6, "mem_bf16": 0.55, "mem_int8": 0.35, "mesh_tps": 2 * 13.3}


def weight_bytes(model: torch.nn.Module) -> int:
    seen: dict[int, int] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def batched_decode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sessions: int, tokens: int) -> float:
    """Aggregate decode tokens/s of ``sessions`` left-padded prompts generated together (prefill excluded)."""
    texts = [chat_token_ids(tokenizer, [{"role": "user", "content": p}]) for p in
             itertools.islice(itertools.cycle(BATCH_PROMPTS), sessions)]
    width = max(map(len, texts))
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    ids = torch.tensor([[pad] * (width - len(t)) + t for t in texts])
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in texts])

    def run(new: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,  # type: ignore[operator]
                           do_sample=False, pad_token_id=pad)
        return time.perf_counter() - started

    run(2)  # warm-up
    prefill = run(1)
    total = run(tokens)
    return sessions * (tokens - 1) / max(total - prefill, 1e-9)


def prefill_ms_per_1000(model: PreTrainedModel, ids: list[int]) -> float:
    x = torch.tensor([ids[:1000]])
    with torch.inference_mode():
        started = time.perf_counter()
        model(x)
        elapsed = time.perf_counter() - started
    return elapsed * 1000 * 1000 / x.shape[1]


def perplexity(model: PreTrainedModel, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(x).logits[0, :-1].float()
    return math.exp(float(torch.nn.functional.cross_entropy(logits, x[0, 1:])))


def greedy(model: PreTrainedModel, prompt_ids: list[int]) -> list[int]:
    mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=mask,  # type: ignore[operator]
                             max_new_tokens=QUALITY_TOKENS, do_sample=False, pad_token_id=model.config.eos_token_id)
    return [int(t) for t in out[0, len(prompt_ids):]]


def hop_bytes_per_token(model: StoredModel) -> int:
    """The activation payload one decode step sends across a boundary, as the codec encodes it."""
    runner = SegmentRunner(model, Span(0, 1))
    cache = runner.new_cache()
    runner.run(cache, torch.tensor([[1, 2, 3]]), 0)
    hidden = runner.run(cache, torch.tensor([[4]]), 3)
    return sum(len(c.data) for c in encode_tensor(hidden))


def mesh_figures(store: ModelStore, models: dict[str, StoredModel], args: argparse.Namespace, work: Path,
                 tokenizer: PreTrainedTokenizerBase, console: Console) -> dict[str, dict[str, Any]]:
    """A 3-segment mesh per dtype, all up at once and run round by round: single-session decode, node RSS
    after it, then ``args.sessions`` concurrent sessions (one SDK client each, bench/concurrency_runs.py)."""
    prompt = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    many = [chat_token_ids(tokenizer, [{"role": "user", "content": p}])
            for p in itertools.islice(itertools.cycle(BATCH_PROMPTS), args.sessions)]
    limits = {"SPLITMESH_MAX_SESSIONS": str(args.sessions), "SPLITMESH_MAX_QUEUED_SESSIONS": str(args.sessions)}
    # node-3 joins every mesh and hosts nothing: its RSS is what a node costs before any layer (the runtime).
    meshes = {d: LocalMesh(MeshSpec(nodes=4, store=store.root, workdir=work / d, model=m.manifest.name,
                                    orchestrator_port=0, trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                                    placement=("node-0", "node-1", "node-2"), extra_env=limits))
              for d, m in models.items()}
    steps: dict[str, list[float]] = {d: [] for d in models}
    batched: dict[str, list[float]] = {d: [] for d in models}
    out: dict[str, dict[str, Any]] = {}
    try:
        with console.status("starting a 3-segment mesh per dtype"):
            for mesh in meshes.values():
                mesh.start()
        clients = {d: Client(m.address) for d, m in meshes.items()}
        for d, client in clients.items():
            list(client.generate(prompt, max_new_tokens=4, ignore_eos=True))  # warm-up
            mesh_run(meshes[d].address, many[:2], 4)
        for r in range(args.rounds):
            for d, client in clients.items():
                console.print(f"  mesh round {r + 1}/{args.rounds}: {d}, 1 session")
                arrivals = [time.perf_counter() for _ in client.generate(prompt, max_new_tokens=args.tokens,
                                                                         ignore_eos=True)]
                steps[d] += [b - a for a, b in itertools.pairwise(arrivals)]
        rss = {d: {n: psutil.Process(mesh.processes[n].pid).memory_info().rss for n in mesh.node_ids}
               for d, mesh in meshes.items()}  # after single-session decoding: weights, runtime, one cache
        for r in range(args.rounds):
            for d, mesh in meshes.items():
                console.print(f"  mesh round {r + 1}/{args.rounds}: {d}, {args.sessions} sessions")
                batched[d].append(mesh_run(mesh.address, many, args.tokens).figures()["tokens_per_s"])
        for d in meshes:
            ms = statistics.median(steps[d]) * 1000
            idle = rss[d].pop(IDLE_NODE)
            out[d] = {"mesh3_ms_per_token": round(ms, 2), "mesh3_tokens_per_s": round(1000 / ms, 2),
                      f"mesh3_batch{args.sessions}_tokens_per_s": round(statistics.median(batched[d]), 1),
                      "mesh3_rss_mb": {n: round(v / 2**20, 1) for n, v in rss[d].items()},
                      "idle_node_rss_mb": round(idle / 2**20, 1),
                      "mesh3_rss_above_idle_mb": {n: round((v - idle) / 2**20, 1) for n, v in rss[d].items()}}
        for client in clients.values():
            client.close()
    finally:
        for mesh in meshes.values():
            mesh.stop()
    return out


def measure(models: dict[str, StoredModel], args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase,
            ppl_ids: list[int], console: Console) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """Single-process figures for every dtype, timed round by round so machine noise hits all alike."""
    references = {d: load_reference_model(m) for d, m in models.items()}
    figures: dict[str, dict[str, Any]] = {
        d: {"weight_mb": round(weight_bytes(ref) / 2**20, 1), "hop_bytes_per_token": hop_bytes_per_token(models[d]),
            "hidden_size": int(models[d].manifest.config["hidden_size"])} for d, ref in references.items()}
    outputs: dict[str, dict[str, list[int]]] = {d: {} for d in models}
    if not args.no_quality:
        for d, ref in references.items():
            console.print(f"  quality: {d}")
            figures[d]["perplexity"] = round(perplexity(ref, ppl_ids), 4)
            for prompt in PROMPTS:
                outputs[d][prompt] = greedy(ref, chat_token_ids(tokenizer, [{"role": "user", "content": prompt}]))
    prompt_ids = chat_token_ids(tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    steps: dict[str, list[float]] = {d: [] for d in models}
    batched: dict[str, list[float]] = {d: [] for d in models}
    prefill: dict[str, list[float]] = {d: [] for d in models}
    for ref in references.values():
        single_process_step_times(ref, prompt_ids, 4)  # warm-up
    for r in range(args.rounds):
        for d, ref in references.items():
            console.print(f"  single-process round {r + 1}/{args.rounds}: {d}")
            steps[d] += single_process_step_times(ref, prompt_ids, args.tokens)
            batched[d].append(batched_decode(ref, tokenizer, args.sessions, args.tokens))
            prefill[d].append(prefill_ms_per_1000(ref, ppl_ids))
    for d in models:
        ms = statistics.median(steps[d]) * 1000
        figures[d].update({"single_ms_per_token": round(ms, 2), "single_tokens_per_s": round(1000 / ms, 2),
                           f"batch{args.sessions}_tokens_per_s": round(statistics.median(batched[d]), 1),
                           "prefill_ms_per_1000_tokens": round(statistics.median(prefill[d]), 1)})
    return figures, outputs


def agreement(ours: dict[str, list[int]], fp32: dict[str, list[int]]) -> tuple[int, float]:
    """(prompts whose greedy ids equal fp32's, share of positions before the first divergence)."""
    same = sum(ours[p] == fp32[p] for p in fp32)
    prefix = 0
    for p, theirs in fp32.items():
        for a, b in zip(ours[p], theirs, strict=False):
            if a != b:
                break
            prefix += 1
    return same, prefix / sum(len(v) for v in fp32.values())


def peer_figures(args: argparse.Namespace, figures: dict[str, dict[str, Any]],
                 console: Console) -> dict[str, Any] | None:
    """llama.cpp on the same GGUF in the same run, and splitmesh's best figures as ratios of it."""
    bin_dir = llama_cpp_peer.binaries(args.llama_cpp.expanduser())
    if bin_dir is None:
        console.print(f"llama.cpp peer skipped: not built in {args.llama_cpp} (scripts/build_llama_cpp.sh)")
        return None
    peer: dict[str, Any] = dict(llama_cpp_peer.measure(bin_dir, embedded_gguf_path(), tokens=args.tokens,
                                                       sequences=args.sessions, threads=args.threads))
    parallel = f"parallel{args.sessions}_tokens_per_s"
    ours = {
        "single process, 1 session": ("single_tokens_per_s", "single_tokens_per_s"),
        f"single process, {args.sessions} sessions": (f"batch{args.sessions}_tokens_per_s", parallel),
        f"3-segment mesh, {args.sessions} sessions": (f"mesh3_batch{args.sessions}_tokens_per_s", parallel),
        "3-segment mesh vs llama.cpp 2-way RPC split": ("mesh3_tokens_per_s", "rpc2_tokens_per_s"),
    }
    table = Table(title=f"llama.cpp {llama_cpp_peer.VERSION} on the Q4_1 GGUF, tokens/s, and splitmesh / llama.cpp")
    table.add_column("figure")
    table.add_column("llama.cpp", justify="right")
    for dtype in figures:
        table.add_column(dtype, justify="right")
    ratios: dict[str, dict[str, float]] = {}
    for label, (key, peer_key) in ours.items():
        cells = []
        for dtype, fig in figures.items():
            if key in fig and peer[peer_key]:
                ratio = round(fig[key] / peer[peer_key], 3)
                ratios.setdefault(dtype, {})[key] = ratio
                cells.append(f"{fig[key]:.1f} ({ratio:.2f}x)")
            else:
                cells.append("-")
        table.add_row(label, f"{peer[peer_key]:.1f}", *cells)
    table.add_row("llama.cpp 1 thread, 1 sequence", f"{peer['single_1thread_tokens_per_s']:.1f}",
                  *("" for _ in figures))
    console.print(table)
    peer["splitmesh_over_llama_cpp"] = ratios
    return peer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="~/.cache/splitmesh/store", help="store holding (or to receive) the models")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent sessions (single process and mesh)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process")
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--no-mesh", action="store_true", help="skip the 3-segment mesh")
    parser.add_argument("--no-quality", action="store_true", help="skip perplexity and greedy agreement")
    parser.add_argument("--llama-cpp", type=Path, default=llama_cpp_peer.DEFAULT_DIR,
                        help="where scripts/build_llama_cpp.sh built the peer (skipped when it is not there)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    store = ModelStore(Path(args.store).expanduser())
    fp32 = store.open(ensure_embedded(store))
    tokenizer = AutoTokenizer.from_pretrained(str(fp32.export_tokenizer(Path(tempfile.mkdtemp()))))
    text = shipped_text()
    ppl_ids = tokenizer(text)["input_ids"][: args.ppl_tokens]
    if len(ppl_ids) < args.ppl_tokens:
        raise SystemExit(f"{TEXT_SOURCE} has only {len(ppl_ids)} tokens")
    work = Path(tempfile.mkdtemp(prefix="splitmesh-dtypes-"))
    models = {d.strip(): model_in(store, d.strip()) for d in args.dtypes.split(",")}
    figures, outputs = measure(models, args, tokenizer, ppl_ids, console)
    if not args.no_mesh:
        for d, mesh_fig in mesh_figures(store, models, args, work, tokenizer, console).items():
            figures[d].update(mesh_fig)
    base = figures.get("float32")
    batch = f"batch{args.sessions}_tokens_per_s"
    mesh_batch = f"mesh3_batch{args.sessions}_tokens_per_s"
    for dtype, fig in figures.items():
        if base is not None:
            fig["batch_vs_fp32"] = round(fig[batch] / base[batch], 3)
            if mesh_batch in fig:
                fig["mesh3_batch_vs_fp32"] = round(fig[mesh_batch] / base[mesh_batch], 3)
            fig["single_vs_fp32"] = round(fig["single_tokens_per_s"] / base["single_tokens_per_s"], 3)
            fig["weight_vs_fp32"] = round(fig["weight_mb"] / base["weight_mb"], 3)
            if "perplexity" in fig:
                fig["perplexity_vs_fp32"] = round(fig["perplexity"] / base["perplexity"], 4)
                fig["greedy_identical_prompts"], share = agreement(outputs[dtype], outputs["float32"])
                fig["greedy_agreement"] = round(share, 3)
            if "mesh3_rss_mb" in fig:
                fig["mesh3_rss_vs_fp32"] = {n: round(v / base["mesh3_rss_mb"][n], 3)
                                            for n, v in fig["mesh3_rss_mb"].items()}
                fig["mesh3_rss_above_idle_vs_fp32"] = {n: round(v / base["mesh3_rss_above_idle_mb"][n], 3)
                                                       for n, v in fig["mesh3_rss_above_idle_mb"].items()}
        fig["hop_bytes_is_hidden_x_item"] = fig["hop_bytes_per_token"] == fig["hidden_size"] * (
            4 if dtype == "float32" else 2)

    table = Table(title=f"SmolLM2-135M on CPU, {args.threads} threads single-process, {args.tokens} tokens per run")
    rows: list[tuple[str, str]] = [
        ("single_ms_per_token", "single process, ms/token (1 session)"),
        ("single_tokens_per_s", "single process, tokens/s (1 session)"),
        (batch, f"single process, tokens/s ({args.sessions} sessions)"),
        ("prefill_ms_per_1000_tokens", "prefill ms per 1,000 tokens"),
        ("mesh3_ms_per_token", "3-segment mesh, ms/token (1 session)"),
        ("mesh3_tokens_per_s", "3-segment mesh, tokens/s (1 session)"),
        (mesh_batch, f"3-segment mesh, tokens/s ({args.sessions} sessions)"),
        ("weight_mb", "weights in memory, MiB"),
        ("mesh3_rss_mb", "3-segment mesh RSS per node, MiB"),
        ("idle_node_rss_mb", "RSS of a node hosting nothing, MiB"),
        ("mesh3_rss_above_idle_mb", "RSS per node above that, MiB"),
        ("hop_bytes_per_token", "bytes per hop per token"),
        ("perplexity", f"perplexity, {args.ppl_tokens} tokens"),
        ("greedy_identical_prompts", f"greedy ids equal fp32 (of {len(PROMPTS)} prompts)"),
        ("greedy_agreement", "greedy agreement before divergence"),
    ]
    table.add_column("figure")
    for dtype in figures:
        table.add_column(dtype, justify="right")
    for key, label in rows:
        if any(key in f for f in figures.values()):
            table.add_row(label, *(str(f.get(key, "-")) if not isinstance(f.get(key), dict) else
                                   " / ".join(str(v) for v in f[key].values()) for f in figures.values()))
    console.print(table)
    if base is not None:
        for dtype, target_batch, target_mem in (("bfloat16", TARGETS["batch_bf16"], TARGETS["mem_bf16"]),
                                                ("int8", TARGETS["batch_int8"], TARGETS["mem_int8"])):
            if dtype not in figures:
                continue
            fig = figures[dtype]
            rss = fig.get("mesh3_rss_vs_fp32", {})
            above = fig.get("mesh3_rss_above_idle_vs_fp32", {})
            console.print(f"{dtype}: {args.sessions} sessions {fig['batch_vs_fp32']:.2f}x fp32 single-process"
                          + (f", {fig['mesh3_batch_vs_fp32']:.2f}x on the mesh" if "mesh3_batch_vs_fp32" in fig else "")
                          + f" (target >= {target_batch}x); weights {fig['weight_vs_fp32']:.2f}x fp32"
                          + f" (target <= {target_mem}x)"
                          + (", node RSS " + " / ".join(f"{v:.2f}" for v in rss.values()) + "x fp32" if rss else "")
                          + (", above an idle node " + " / ".join(f"{v:.2f}" for v in above.values()) + "x"
                             if above else "")
                          + f"; bytes per hop per token {fig['hop_bytes_per_token']} = hidden x "
                          f"{fig['hop_bytes_per_token'] / fig['hidden_size']:g}"
                          + (f"; perplexity {fig['perplexity_vs_fp32']:.4f}x fp32" if "perplexity_vs_fp32" in fig
                             else ""))
        best = max((f.get("mesh3_tokens_per_s", 0.0), d) for d, f in figures.items())
        if best[0]:
            console.print(f"best 3-segment mesh single-session decode: {best[0]:.1f} tokens/s ({best[1]}), target >= "
                          f"{TARGETS['mesh_tps']:.1f} (2x 13.3)")
    peer = peer_figures(args, figures, console)
    print(json.dumps({"threads": args.threads, "tokens": args.tokens, "sessions": args.sessions,
                      "ppl_source": "/".join(TEXT_SOURCE), "ppl_tokens": args.ppl_tokens, "dtypes": figures,
                      "llama_cpp": peer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
