"""The measurements behind bench/concurrency.py (imported once the OpenMP settings are made)."""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from bench.embedded import embedded_model
from common.chat import chat_token_ids
from splitmesh import Client
from splitmesh.launcher import LocalMesh, MeshSpec, free_port

TOPICS = ("a lighthouse keeper", "a lost cat", "the first snow", "a robot gardener", "an old map", "a night train",
          "a quiet library", "a red kite")


@dataclass
class Run:
    """Arrival times of every session's tokens, from a common start."""

    start: float
    arrivals: list[list[float]]

    def figures(self) -> dict[str, float]:
        tokens = sum(len(a) for a in self.arrivals)
        end = max(a[-1] for a in self.arrivals if a)
        gaps = [b - a for times in self.arrivals for a, b in itertools.pairwise(times)]
        ttft = [times[0] - self.start for times in self.arrivals if times]
        return {"tokens_per_s": round(tokens / (end - self.start), 2),
                "itl_p50_ms": round(quantile(gaps, 0.5) * 1000, 2),
                "itl_p95_ms": round(quantile(gaps, 0.95) * 1000, 2),
                "ttft_p50_ms": round(quantile(ttft, 0.5) * 1000, 1),
                "ttft_p95_ms": round(quantile(ttft, 0.95) * 1000, 1)}


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


class _StepClock(LogitsProcessor):
    """Called once per generated token of the whole batch: when each step's tokens exist."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def single_process(model: PreTrainedModel, prompts: list[list[int]], tokens: int, pad_id: int) -> Run:
    """transformers' batched greedy ``generate``: every session's token of a step arrives together."""
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    clock = _StepClock()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,  # type: ignore[operator]
                       do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))
    return Run(start, [list(clock.times) for _ in prompts])


def mesh_run(address: str, prompts: list[list[int]], tokens: int) -> Run:
    """One SDK client per session on its own thread, all released by one barrier."""
    arrivals: list[list[float]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    ready = threading.Barrier(len(prompts) + 1)
    clients = [Client(address) for _ in prompts]

    def session(index: int) -> None:
        ready.wait()
        try:
            for _ in clients[index].generate(prompts[index], max_new_tokens=tokens, ignore_eos=True):
                arrivals[index].append(time.perf_counter())
        except BaseException as exc:  # reported below, with the session it broke
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    ready.wait()
    for thread in threads:
        thread.join()
    for client in clients:
        client.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(prompts)} sessions failed; first: {errors[0]}")
    return Run(start, arrivals)


def batch_rows(mesh: LocalMesh) -> tuple[float, float]:
    """(forwards that carried 2+ sessions' rows, rows in them) summed over the mesh's nodes so far."""
    forwards = rows = 0.0
    for port in mesh.node_metrics_ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "splitmesh_agent_batch_rows":
                for sample in family.samples:
                    if sample.name.endswith("_count"):
                        forwards += sample.value
                    elif sample.name.endswith("_sum"):
                        rows += sample.value
    return forwards, rows


def main(doc: str) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,4,16", help="concurrency levels, comma-separated (e.g. 1,4,16,64)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per session")
    parser.add_argument("--strict-baseline", action="store_true", help="also the 3-segment mesh in strict mode")
    parser.add_argument("--gather-baseline", action="store_true",
                        help="also the 3-segment mesh with no gather window (batch_gather_ms 0)")
    parser.add_argument("--quick", action="store_true", help="levels 1,4 and 16 tokens (a smoke run)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "int8"),
                        help="the embedded model's weights and compute dtype, for every configuration")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    levels = [1, 4] if args.quick else [int(s) for s in args.sessions.split(",")]
    tokens = 16 if args.quick else args.tokens
    console = Console()
    embedded = embedded_model(args.store, args.dtype)
    store, model, reference, tokenizer = embedded.store, embedded.model, embedded.reference, embedded.tokenizer
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}])
               for i in range(max(levels))]
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    work = Path(tempfile.mkdtemp(prefix="splitmesh-concurrency-"))
    most = str(max(*levels, 64))
    limits = {"SPLITMESH_MAX_SESSIONS": most, "SPLITMESH_MAX_QUEUED_SESSIONS": most}

    def three(name: str, **env: str) -> LocalMesh:
        return LocalMesh(MeshSpec(nodes=3, store=store.root, workdir=work / name, orchestrator_port=0,
                                  model=model.manifest.name,
                                  trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30),
                                  placement=("node-0", "node-1", "node-2"), extra_env={**limits, **env},
                                  metrics_port=free_port()))

    meshes: dict[str, LocalMesh] = {
        "mesh1": LocalMesh(MeshSpec(nodes=1, store=store.root, workdir=work / "one", orchestrator_port=0,
                                    model=model.manifest.name,
                                    extra_env=limits, metrics_port=free_port())),
        "mesh3": three("three"),
    }
    if args.strict_baseline:
        meshes["mesh3_strict"] = three("three-strict", SPLITMESH_STRICT_BATCHING="true")
    if args.gather_baseline:
        meshes["mesh3_nogather"] = three("three-nogather", SPLITMESH_BATCH_GATHER_MS="0")
    runs: dict[str, Callable[[list[list[int]]], Run]] = {
        "single": lambda ps: single_process(reference, ps, tokens, pad_id)}
    for name, mesh in meshes.items():
        runs[name] = lambda ps, address=mesh.address: mesh_run(address, ps, tokens)  # type: ignore[misc]
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in runs}
    try:
        with console.status(f"starting {len(meshes)} local meshes"):
            for mesh in meshes.values():
                mesh.start()
        for run in runs.values():
            run(prompts[:2])  # warm-up: tokenizers, channels, first-call allocations
        for level in levels:
            for name, run in runs.items():
                with console.status(f"{name}: {level} sessions x {tokens} tokens"):
                    measured = meshes.get(name)
                    before = batch_rows(measured) if measured else (0.0, 0.0)
                    results[name][level] = run(prompts[:level]).figures()
                    if measured:  # how many sessions' decode rows shared a forward, on average where 2+ did
                        after = batch_rows(measured)
                        forwards, rows = after[0] - before[0], after[1] - before[1]
                        results[name][level]["batched_forwards"] = forwards
                        results[name][level]["mean_rows_when_batched"] = round(rows / forwards, 2) if forwards else 0.0
    finally:
        for mesh in meshes.values():
            mesh.stop()

    labels = {"single": "(a) single", "mesh1": "(b) mesh1", "mesh3": "(c) mesh3", "mesh3_strict": "(d) strict3",
              "mesh3_nogather": "(e) no gather"}
    table = Table(title=f"{tokens} tokens per session, SmolLM2-135M {model.manifest.compute_dtype} on CPU, "
                        "latencies in ms")
    for column in ("config", "users", "tok/s", "ITL p50", "ITL p95", "TTFT p50", "TTFT p95", "rows"):
        table.add_column(column, justify="right")
    for name, by_level in results.items():
        for level, f in by_level.items():
            table.add_row(labels[name], str(level), f"{f['tokens_per_s']:.2f}", f"{f['itl_p50_ms']:.1f}",
                          f"{f['itl_p95_ms']:.1f}", f"{f['ttft_p50_ms']:.0f}", f"{f['ttft_p95_ms']:.0f}",
                          f"{f['mean_rows_when_batched']:.1f}" if "mean_rows_when_batched" in f else str(level))
    console.print(table)
    console.print("rows: sessions per batched forward on the mesh's nodes (mean over forwards of 2+ rows); "
                  "batched generate runs every session in each forward")
    one = min(levels)
    ratios: dict[str, float] = {}
    for at in sorted({16, max(levels)} & set(levels) - {one}):  # the targets are stated at 16 sessions
        mesh3, base = results["mesh3"][at], results["mesh3"][one]
        ratios[f"mesh3_vs_single_at_{at}"] = round(mesh3["tokens_per_s"] / results["single"][at]["tokens_per_s"], 3)
        ratios[f"mesh3_at_{at}_vs_mesh3_at_{one}"] = round(mesh3["tokens_per_s"] / base["tokens_per_s"], 3)
        ratios[f"mesh3_itl_p95_at_{at}_vs_at_{one}"] = round(mesh3["itl_p95_ms"] / base["itl_p95_ms"], 3)
        if "mesh3_nogather" in results:
            ratios[f"mesh3_vs_nogather_at_{at}"] = round(mesh3["tokens_per_s"]
                                                         / results["mesh3_nogather"][at]["tokens_per_s"], 3)
        if "mesh3_strict" in results:
            ratios[f"mesh3_vs_strict_at_{at}"] = round(mesh3["tokens_per_s"]
                                                       / results["mesh3_strict"][at]["tokens_per_s"], 3)
    for key, value in ratios.items():
        console.print(f"{key}: {value}")
    print(json.dumps({"tokens_per_session": tokens, "levels": levels, "results": results, "ratios": ratios}))
    return 0
