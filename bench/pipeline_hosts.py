"""Two boxes against one: a 2-host pipeline on the namespace testbed vs one process on the same two cores.

Hosts are network namespaces (bench.testbed) on a private bridge, each link tbf-shaped (``--link-mbps``, both
ways); the orchestrator has its own namespace. Configurations, all in one run on the same model and prompts:
(a) one process: transformers' batched greedy ``generate`` with 2 torch threads, pinned to both cores;
(b) pipeline: host ``a`` (core 0, 1 thread) runs layers [0,15) and is the head, host ``b`` (core 1, 1 thread)
    runs [15,30) and samples; both are trusted (the last segment holds lm_head and the sampler);
(c) one host ``solo`` (cores 0-1, 2 threads) runs the whole model as a 1-segment mesh (``--no-solo`` skips it).
By default a node batches up to 32 sessions' decode rows, so 16 sessions cross the pipeline as one batch and the
hosts take turns; ``--pipeline-batch-rows 8`` caps (b)'s batches so two of them can keep both hosts busy.
Each mesh session is its own SDK client (bench.concurrency_runs.mesh_run) in this process, unpinned: on a
2-core box the clients share the nodes' cores. A mesh runs its rounds with (a) interleaved, one level at a
time; then the next mesh starts. Prints per-configuration medians with the range over rounds, the ratio
pipeline / one process at 16 sessions (per round, paired with (a) of the same round), then one JSON line.

    PYTHONPATH=$PWD .venv/bin/python bench/pipeline_hosts.py --rounds 3 --tokens 32     # needs root
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node_agent.openmp import bound_spinning

bound_spinning(1000)

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.concurrency_runs import TOPICS, Run, mesh_run, single_process  # noqa: E402
from bench.embedded import embedded_model  # noqa: E402
from bench.testbed import HostSpec, Scenario, Testbed, unavailable_reason  # noqa: E402
from common.chat import chat_token_ids  # noqa: E402

LABELS = {"single": "(a) 1 process", "pipeline": "(b) 2 hosts", "solo": "(c) 1 host"}
STATIC_POLICY = {"utilisation_max": "1.0", "latency_max_ms": "100000"}  # the static split is taken as given
MESHES = {"pipeline": ((0, 15, 30), ("a", "b")), "solo": ((0, 30), ("solo",))}


def scenario(cores: tuple[int, int], link_mbps: float) -> Scenario:
    first, second = (str(c) for c in cores)
    hosts = (HostSpec("a", True, first, link_mbps=link_mbps, threads=1),
             HostSpec("b", True, second, link_mbps=link_mbps, threads=1),
             HostSpec("solo", True, f"{first},{second}", link_mbps=link_mbps, threads=2))
    return Scenario(description="2-host pipeline vs one process on the same cores", hosts=hosts, bottleneck="b",
                    static_policy=STATIC_POLICY, link_latency_ms=200.0, probe_interval_s=30.0)


def summary(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median of every figure over the rounds, plus the tokens/s range."""
    out = {key: round(statistics.median(r[key] for r in rounds), 2) for key in rounds[0]}
    out["tokens_per_s_min"] = min(r["tokens_per_s"] for r in rounds)
    out["tokens_per_s_max"] = max(r["tokens_per_s"] for r in rounds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,16", help="concurrency levels, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per session")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mesh (each level once per round)")
    parser.add_argument("--link-mbps", type=float, default=1000.0, help="tbf rate of every host link, both ways")
    parser.add_argument("--pipeline-batch-rows", type=int, default=0,
                        help="max_batch_rows of the pipeline's nodes (0 = the node default), e.g. 8: 16 sessions "
                             "then travel as two batches that can occupy both hosts at once")
    parser.add_argument("--no-solo", action="store_true", help="skip (c), the 1-host mesh on both cores")
    parser.add_argument("--store", default="~/.cache/splitmesh/store")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"cannot build a testbed here: {reason}", file=sys.stderr)
        return 2
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        print(f"needs two cores, this process may use {available}", file=sys.stderr)
        return 2
    cores = (available[0], available[1])
    levels = [int(s) for s in args.sessions.split(",")]
    console = Console(width=80)

    embedded = embedded_model(args.store)
    tokenizer, reference = embedded.tokenizer, embedded.reference
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]}."}])
               for i in range(max(levels))]
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    def single(ps: list[list[int]]) -> Run:
        """(a) in this process, on the two cores only and with two threads, restored afterwards."""
        mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, set(cores))
        torch.set_num_threads(2)
        try:
            return single_process(reference, ps, args.tokens, pad_id)
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, mask)

    meshes = [name for name in MESHES if not (args.no_solo and name == "solo")]
    results: dict[str, dict[int, list[dict[str, float]]]] = {n: {lv: [] for lv in levels}
                                                              for n in ("single", *meshes)}
    started = time.monotonic()
    with Testbed(scenario(cores, args.link_mbps), store=embedded.store.root) as tb:
        for name in meshes:
            boundaries, placement = MESHES[name]
            with console.status(f"starting mesh {name} on {', '.join(placement)}"):
                rows = args.pipeline_batch_rows if name == "pipeline" else 0
                tb.start_mesh(False, policy=STATIC_POLICY, boundaries=boundaries, placement=placement,
                              hosts=placement, node_args=("--max-batch-rows", str(rows)) if rows else ())
            runs: dict[str, Callable[[list[list[int]]], Run]] = {
                "single": single, name: lambda ps: mesh_run(tb.orchestrator_address, ps, args.tokens)}
            for run in runs.values():
                run(prompts[:2])  # warm-up: channels, first-call allocations, the nodes' first forwards
            for round_no in range(args.rounds):
                for level in levels:
                    for config, run in runs.items():
                        with console.status(f"{name} round {round_no + 1}: {config}, {level} sessions"):
                            results[config][level].append(run(prompts[:level]).figures())
                        tb.check_mesh()
            tb.stop_mesh()
    elapsed = time.monotonic() - started

    table = Table(title=f"{args.tokens} tokens/session, SmolLM2-135M {embedded.model.manifest.compute_dtype}, "
                        f"cores {cores[0]},{cores[1]}, ms", width=80)
    for column in ("config", "users", "n", "tok/s", "range", "ITL p50", "ITL p95", "TTFT p50"):
        table.add_column(column, justify="right")
    summaries: dict[str, dict[int, dict[str, float]]] = {}
    for config, by_level in results.items():
        summaries[config] = {}
        for level, rounds in by_level.items():
            s = summaries[config][level] = summary(rounds)
            table.add_row(LABELS[config], str(level), str(len(rounds)), f"{s['tokens_per_s']:.1f}",
                          f"{s['tokens_per_s_min']:.1f}-{s['tokens_per_s_max']:.1f}", f"{s['itl_p50_ms']:.1f}",
                          f"{s['itl_p95_ms']:.1f}", f"{s['ttft_p50_ms']:.0f}")
    console.print(table)
    console.print(f"medians over rounds; range = min-max tok/s; links tbf {args.link_mbps:g} Mbit/s; "
                  f"(a) runs {len(meshes)}x per round set, once beside each mesh", soft_wrap=False)
    ratios: dict[str, float | list[float]] = {}
    for level in levels:
        single_rounds = results["single"][level][:args.rounds]  # the rounds run beside the pipeline
        paired = [round(p["tokens_per_s"] / s["tokens_per_s"], 3)
                  for p, s in zip(results["pipeline"][level], single_rounds, strict=True)]
        ratios[f"pipeline_vs_single_at_{level}"] = round(statistics.median(paired), 3)
        ratios[f"pipeline_vs_single_at_{level}_rounds"] = paired
        if "solo" in results:
            ratios[f"pipeline_vs_solo_at_{level}"] = round(summaries["pipeline"][level]["tokens_per_s"]
                                                           / summaries["solo"][level]["tokens_per_s"], 3)
    for key, value in ratios.items():
        console.print(f"{key}: {value}")
    print(json.dumps({"tokens_per_session": args.tokens, "levels": levels, "rounds": args.rounds,
                      "pipeline_batch_rows": args.pipeline_batch_rows,
                      "link_mbps": args.link_mbps, "cores": list(cores), "elapsed_s": round(elapsed, 1),
                      "results": results, "summary": summaries, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
