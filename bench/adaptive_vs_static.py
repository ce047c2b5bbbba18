"""The papers' experiment on a real multi-host testbed: static split vs the adaptive loop under shaped bandwidth.

Hosts are network namespaces on a private bridge, every link shaped with tc tbf; the orchestrator and one node
agent per host run as real processes. The same request stream runs with the adaptive loop off
(``--no-adaptive``, the scenario's static split) and on (``--adaptive`` from the same split, policy from the
scenario), for every bottleneck rate of the sweep, then once along the scenario's timeline (bandwidth drops
mid-run). Prints a Table-II-style comparison (TTFT and per-token latency separately), the orchestrator's cost
model against the measurements, saves plots to --out, and ends with one JSON line of all figures. Needs root:
    sudo .venv/bin/python -m bench.adaptive_vs_static [--scenario bench/scenarios/testbed_edge_cloud.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.testbed import Scenario, Testbed, load_scenario, unavailable_reason
from bench.testbed.predict import Predictor
from bench.testbed.report import model_check, plot_sweep, plot_timeline, table_ii
from bench.testbed.timeline import EpochSampler, EventPlayer
from bench.testbed.workload import RequestResult, run_stream, summarise

log = logging.getLogger("bench.adaptive_vs_static")
console = Console(width=200)


def settle(tb: Testbed, seconds: float) -> None:
    """Let probes measure the link and the adaptive loop act before measuring (steady state, not the transient)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        tb.check_mesh()
        time.sleep(0.5)


@contextmanager
def mesh(tb: Testbed, adaptive: bool) -> Iterator[None]:
    """A fresh mesh with the scenario's policy; the adaptive one starts from the same static split."""
    sc = tb.scenario
    lo, hi = sc.requests.prompt_tokens
    shape = {"prompt_tokens": str((lo + hi) // 2), "decode_tokens": str(sc.requests.max_new_tokens)}
    # The planner optimises for the stream's request shape.
    tb.start_mesh(adaptive, policy={**shape, **sc.static_policy, **(sc.policy if adaptive else {})})
    try:
        yield
    finally:
        tb.stop_mesh()


def plan_text(tb: Testbed) -> str:
    with tb.client(10.0) as client:
        return " ".join(f"[{s.start},{s.end})@{s.node_id}" for s in client.status().plan.segments)


@dataclass
class Measured:
    """One mode's requests at one point, from one or more fresh meshes."""

    results: list[RequestResult]
    wall_s: float
    inputs: dict[str, Any]  # the cost model's inputs after the first mesh's requests
    run_means_ms: list[float]  # mean request latency of each mesh

    def add(self, other: Measured) -> None:
        self.results += other.results
        self.wall_s += other.wall_s
        self.run_means_ms += other.run_means_ms

    def summary(self, sla_ms: float) -> dict[str, Any]:
        out: dict[str, Any] = {**summarise(self.results, self.wall_s, sla_ms).as_dict(), "model_inputs": self.inputs,
                               "per_request": [r.as_row() for r in self.results],
                               "run_means_ms": [round(m, 1) for m in self.run_means_ms]}
        if len(self.run_means_ms) > 1:
            out["spread_pct"] = round(100 * (max(self.run_means_ms) - min(self.run_means_ms))
                                      / statistics.fmean(self.run_means_ms), 1)
        return out


def measure(tb: Testbed, predictor: Predictor, prompts: list[list[int]], warm: list[list[int]],
            settle_s: float) -> Measured:
    sc = tb.scenario
    with tb.client() as client:
        if warm:
            run_stream(client, warm, sc.requests.max_new_tokens)
        settle(tb, settle_s)
        t0 = time.monotonic()
        results = run_stream(client, prompts, sc.requests.max_new_tokens, interarrival_s=sc.requests.interarrival_s,
                             predictor=predictor)
        wall = time.monotonic() - t0
        inputs = predictor.inputs(predictor.snapshot(client))
    tb.check_mesh()
    ok = [r.total_s * 1e3 for r in results if r.ok]
    return Measured(results, wall, inputs, [statistics.fmean(ok) if ok else math.nan])


def sweep(tb: Testbed, predictor: Predictor, prompts: list[list[int]], warm: list[list[int]], settle_s: float,
          progress: Progress, bracket: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """Per bottleneck rate, a fresh static mesh, a fresh adaptive one (which starts from the static split) and,
    with ``bracket``, a second static mesh after it.

    The runs of a point go back to back, and the static ones bracket the adaptive one: drift of a shared box
    over the few minutes of a point then cancels in the static mean, and the two static means' spread is the
    noise any difference at that point must beat.
    """
    sc = tb.scenario
    modes = ("static", "adaptive", "static") if bracket else ("static", "adaptive")
    task = progress.add_task("sweep", total=len(modes) * len(sc.sweep_mbps))
    rows: list[dict[str, Any]] = [{"mbps": m} for m in sc.sweep_mbps]
    tokens: list[list[list[int]]] = []
    for row in rows:
        tb.set_rate(sc.bottleneck, row["mbps"])
        measured: dict[str, Measured] = {}
        for mode in modes:
            progress.update(task, description=f"{mode} @ {row['mbps']:g} Mbit/s")
            with mesh(tb, adaptive=mode == "adaptive"):
                run = measure(tb, predictor, prompts, warm, settle_s)
                tokens.append([r.tokens for r in run.results])
                if mode in measured:
                    measured[mode].add(run)
                else:
                    measured[mode] = run
                if mode == "adaptive":
                    row["adaptive_plan"] = plan_text(tb)
                    with tb.client(10.0) as client:
                        row["adaptive_decisions"] = [f"{d.kind}: {d.reason}" for d in client.history(20)
                                                     if d.kind in ("migrate", "resplit")]
            progress.advance(task)
        for mode, run in measured.items():
            row[mode] = run.summary(sc.sla_request_ms)
    tb.set_rate(sc.bottleneck, sc.host(sc.bottleneck).link_mbps)
    identical = all(t == tokens[0] for t in tokens)
    return rows, identical


def timeline(tb: Testbed, predictor: Predictor, prompts: list[list[int]], warm: list[list[int]], settle_s: float,
             progress: Progress, bracket: bool = True) -> dict[str, Any]:
    """The scenario's timeline once static, once adaptive and, with ``bracket``, static again (as in the sweep)."""
    sc = tb.scenario
    start = sc.timeline_start_mbps or sc.host(sc.bottleneck).link_mbps
    out: dict[str, Any] = {"start_mbps": start, "duration_s": sc.timeline_duration_s, "runs": {}}
    modes = ("static", "adaptive", STATIC_AFTER) if bracket else ("static", "adaptive")
    task = progress.add_task("timeline", total=len(modes))
    for mode in modes:
        progress.update(task, description=f"timeline: {mode}")
        tb.set_rate(sc.bottleneck, start)
        with mesh(tb, adaptive=mode == "adaptive"), tb.client() as client:
            if warm:
                run_stream(client, warm, sc.requests.max_new_tokens)
            settle(tb, settle_s)
            sampler = EpochSampler(tb.orchestrator_address)
            player = EventPlayer(tb, sc.events)
            sampler.start()
            player.start()
            t0 = time.monotonic()
            try:
                results = run_stream(client, prompts, sc.requests.max_new_tokens,
                                     interarrival_s=sc.requests.interarrival_s, predictor=predictor,
                                     until_s=sc.timeline_duration_s)
            finally:
                player.stop()
                sampler.stop()
            if player.error is not None:
                raise RuntimeError(f"timeline event failed: {player.error}")
            wall = time.monotonic() - t0
            decisions = [{"kind": d.kind, "triggers": d.triggers, "reason": d.reason,
                          "epoch_after": d.epoch_after} for d in reversed(client.history(50))
                         if d.kind in ("migrate", "resplit", "infeasible")]
        for host in sc.hosts:  # undo the timeline for the next run
            tb.set_rate(host.name, host.link_mbps)
            tb.set_hog(host.name, host.hog)
        out["events"] = player.applied
        out["runs"][mode] = {
            "summary": summarise(results, wall, sc.sla_request_ms).as_dict(),
            "requests": [{"start_s": round(r.started_s, 2), "end_s": round(r.started_s + r.total_s, 2),
                          "ttft_ms": round(r.ttft_s * 1e3, 1), "total_ms": round(r.total_s * 1e3, 1),
                          "per_token_ms": round(r.per_token_s * 1e3, 1), "epochs": list(r.epochs),
                          "error": r.error} for r in results],
            "epochs": [(round(t, 2), e) for t, e, _ in sampler.samples],
            "plans": sorted({(e, p) for _, e, p in sampler.samples}),
            "decisions": decisions,
        }
        progress.advance(task)
    return out


STATIC_AFTER = "static (after)"
PHASE_LAG_S = 15.0  # requests starting this long after the first event count as "after" (detection + switch)


def phases(runs: dict[str, dict[str, Any]], event_s: float) -> dict[str, dict[str, float]]:
    """Mean request latency per run before the first event (ended before it) and after it (started
    ``PHASE_LAG_S`` later), and adaptive over the static runs' mean in both phases: the ratio before the event
    is the box's drift between the runs (the plans are the same), the one after is the adaptive loop's effect."""
    out: dict[str, dict[str, float]] = {}
    for mode, run in runs.items():
        ok = [r for r in run["requests"] if not r["error"]]
        before = [r["total_ms"] for r in ok if r["end_s"] < event_s]
        after = [r["total_ms"] for r in ok if r["start_s"] >= event_s + PHASE_LAG_S]
        out[mode] = {"before_ms": statistics.fmean(before) if before else math.nan,
                     "after_ms": statistics.fmean(after) if after else math.nan}
    statics = [v for k, v in out.items() if k != "adaptive"]
    if "adaptive" in out and statics:
        for phase in ("before_ms", "after_ms"):
            ref = statistics.fmean(v[phase] for v in statics)
            out.setdefault("adaptive / static", {})[phase] = out["adaptive"][phase] / ref if ref else math.nan
    return out


def finite(value: Any) -> Any:
    """NaN/inf (no measurement, failed request) become null, so the JSON line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def explain(sc: Scenario, predictor: Predictor, prompt_tokens: float) -> None:
    per_token = predictor.bytes_per_token()
    boundary = per_token * prompt_tokens
    crossings = len(sc.placement) - 1 + (sc.placement[-1] != sc.placement[0]) if sc.placement else 0
    console.print(f"[bold]Why bandwidth matters here[/]: hidden size {predictor.model.hidden_size} x "
                  f"{predictor.model.act_bytes} B = {per_token} B per token per boundary; a {prompt_tokens:.0f}-token "
                  f"prefill sends {boundary / 1e6:.2f} MB across each of the static plan's {crossings} boundaries "
                  f"(each decode step {per_token} B). Transfer time of one prefill boundary: "
                  + ", ".join(f"{m:g} Mbit/s -> {boundary * 8 / (m * 1e6):.2f} s" for m in sc.sweep_mbps))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="bench/scenarios/testbed_edge_cloud.json")
    ap.add_argument("--out", default="bench/out/")
    ap.add_argument("--sweep", default="", help="override the scenario's bottleneck rates, e.g. 20,200")
    ap.add_argument("--requests", type=int, default=0, help="override the measured requests per point")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="override the prompt length")
    ap.add_argument("--max-new-tokens", type=int, default=0)
    ap.add_argument("--timeline-s", type=float, default=0.0, help="override the timeline duration")
    ap.add_argument("--settle-s", type=float, default=0.0, help="wait after warm-up (default: 3 probe periods + 2 s)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-timeline", action="store_true")
    ap.add_argument("--no-bracket", action="store_true",
                    help="one static mesh per point (and timeline), not one before and one after the adaptive one")
    ap.add_argument("--workdir", default="", help="logs and state (default: a fresh /tmp/smtb-* folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(message)s", stream=sys.stderr)
    reason = unavailable_reason()
    if reason:
        print(f"cannot build the testbed: {reason}", file=sys.stderr)
        return 2
    sc = load_scenario(args.scenario)
    rq = sc.requests
    if args.requests:
        rq = replace(rq, count=args.requests)
    if args.prompt_tokens:
        rq = replace(rq, prompt_tokens=(args.prompt_tokens, args.prompt_tokens))
    if args.max_new_tokens:
        rq = replace(rq, max_new_tokens=args.max_new_tokens)
    sc = replace(sc, requests=rq, sweep_mbps=tuple(float(x) for x in args.sweep.split(",")) if args.sweep
                 else sc.sweep_mbps, timeline_duration_s=args.timeline_s or sc.timeline_duration_s)
    settle_s = args.settle_s or 3 * sc.probe_interval_s + 2.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else None

    with Testbed(sc, workdir) as tb:
        predictor = Predictor(tb.store, sc.model)
        prompts = rq.prompts(predictor.vocab_size)
        warm = rq.prompts(predictor.vocab_size, rq.warmup)
        mean_prompt = sum(map(len, prompts)) / len(prompts)
        console.print(f"[bold]Scenario[/] {args.scenario}: {sc.description}")
        console.print("hosts: " + ", ".join(f"{h.name} ({'trusted' if h.trusted else 'untrusted'}, cpus "
                                             f"{h.cpus or 'any'}, {h.link_mbps:g} Mbit/s{', CPU hog' if h.hog else ''})"
                                             for h in sc.hosts) + f"; addresses {tb.network.addresses}")
        console.print(f"static split {list(sc.boundaries)} on {list(sc.placement)}; bottleneck = {sc.bottleneck}'s "
                      f"link (tbf both directions); adaptive policy {sc.policy}; both runs {sc.static_policy}")
        console.print(f"requests: {rq.count} measured per point after {rq.warmup} warm-up + {settle_s:.0f} s settle, "
                      f"prompts of {rq.prompt_tokens[0]}-{rq.prompt_tokens[1]} random token ids, {rq.max_new_tokens} "
                      f"greedy tokens each (EOS ignored), "
                      + ("sequential" if rq.interarrival_s <= 0 else f"one every {rq.interarrival_s} s"))
        explain(sc, predictor, mean_prompt)
        console.print("[yellow]Noise[/]: the box has 2 cores shared with other users' jobs; nodes are pinned "
                      "(taskset) but absolute figures move run to run. Compare columns within one run.\n")
        figures: dict[str, Any] = {"bench": "adaptive_vs_static", "scenario": args.scenario,
                                   "requests_per_point": rq.count, "prompt_tokens": list(rq.prompt_tokens),
                                   "max_new_tokens": rq.max_new_tokens, "sla_request_ms": sc.sla_request_ms,
                                   "bytes_per_token_boundary": predictor.bytes_per_token()}
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=Console(stderr=True)) as progress:
            if not args.skip_sweep:
                rows, identical = sweep(tb, predictor, prompts, warm, settle_s, progress, bracket=not args.no_bracket)
                figures["sweep"] = rows
                figures["greedy_tokens_identical"] = identical
            if not args.skip_timeline:
                figures["timeline"] = timeline(tb, predictor, prompts, warm, settle_s, progress,
                                              bracket=not args.no_bracket)
        figures["logs"] = str(tb.procs.logdir)

    if "sweep" in figures:
        table_ii(console, figures["sweep"], sc.sla_request_ms)
        console.print("greedy tokens identical in every run and mode: "
                      + ("yes" if figures["greedy_tokens_identical"] else "[red]NO[/]"))
        for r in figures["sweep"]:
            for d in r["adaptive_decisions"]:
                console.print(f"  adaptive @ {r['mbps']:g} Mbit/s: {d}")
        model_check(console, figures["sweep"])
        figures["plot_sweep"] = str(plot_sweep(figures["sweep"], out))
        console.print(f"plot: {figures['plot_sweep']}")
    if "timeline" in figures:
        tl = figures["timeline"]
        console.print(f"\n[bold]Timeline[/] ({tl['duration_s']:g} s from {tl['start_mbps']:g} Mbit/s): "
                      + "; ".join(f"t={t:.0f}s {text.split(': ', 1)[-1]}" for t, text in tl["events"]))
        for mode, run in tl["runs"].items():
            s = run["summary"]
            console.print(f"  {mode:<8} {s['requests']} requests, mean {s['request_ms']:.0f} ms (TTFT "
                          f"{s['ttft_ms']:.0f} ms, {s['per_token_ms']:.1f} ms/token), {s['tokens_per_s']:.2f} tok/s, "
                          f"SLA {100 * s['sla']:.0f}%, failed {s['failed']}; plans: "
                          + " -> ".join(f"e{e} {p}" for e, p in run["plans"]))
            for d in run["decisions"]:
                console.print(f"           {d['kind']} -> epoch {d['epoch_after']}: {d['reason']}")
        if tl["events"]:
            tl["phases"] = phases(tl["runs"], tl["events"][0][0])
            console.print(f"  mean request ms ended before the first event / started {PHASE_LAG_S:.0f} s after it: "
                          + "; ".join(f"{mode} {v['before_ms']:.0f} / {v['after_ms']:.0f}"
                                      for mode, v in tl["phases"].items() if mode != "adaptive / static"))
            ratio = tl["phases"].get("adaptive / static")
            if ratio:
                console.print(f"  adaptive / static: before {ratio['before_ms']:.2f} (same plan: the box's drift "
                              f"between the runs), after {ratio['after_ms']:.2f}")
        figures["plot_timeline"] = str(plot_timeline(tl["runs"], tl["events"], out))
        console.print(f"plot: {figures['plot_timeline']}")
    if "sweep" in figures:
        per_request = {f"{mode} @ {r['mbps']:g} Mbit/s": r[mode].pop("per_request") for r in figures["sweep"]
                       for mode in ("static", "adaptive")}
        figures["per_request"] = str(out / "requests.json")
        (out / "requests.json").write_text(json.dumps(finite(per_request), indent=1, default=str))
        console.print(f"per-request figures and cost-model inputs: {figures['per_request']}")
    print(json.dumps(finite(figures), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
