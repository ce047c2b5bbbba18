"""Soak: many concurrent streaming sessions against a local mesh while faults keep coming.

A 4-node loopback mesh (node-0 and node-3 trusted, node-1 and node-2 in the middle) serves
``--sessions`` client threads that restart a greedy generation as soon as one ends, for ``--duration``
seconds. Every ``--fault-every`` seconds the plan is put back on all four nodes and one middle node gets
the next fault in turn: kill -9 then restart, SIGSTOP then SIGCONT, or a cut of its data link (a TCP
proxy in front of it). Checks: no request fails, and every completed generation has exactly the tokens
of a fault-free run of its prompt. The resident memory of the orchestrator and of every node is sampled
every ``--sample-every`` seconds, with what each node says it holds (``splitmesh_agent_weight_bytes`` of
its loaded segments and ``splitmesh_agent_kv_cache_bytes`` of its open sessions); growth is measured over
each process's own lifetime (a restarted node starts again from its new process). Which layers a node
hosts changes with every fault (the survivors take a dead node's layers), so its raw RSS floor compares
different plans. Memory counts as stable when no process's floor of what it holds beyond those weights
and caches (its lowest, between the peaks of replays and plan changes) rises from the middle to the last
third of its life: a leak is what stays behind when the plan and its sessions are accounted for.

    .venv/bin/python bench/soak.py                    # 16 sessions, 300 s, a fault every 30 s
    .venv/bin/python bench/soak.py --duration 60 --fault-every 15
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.faults import FAULT_KINDS, heal, inject, put_proxies, wait_all_alive, wait_links_up
from bench.tcp_proxy import TcpProxy
from splitmesh import Client
from splitmesh.client import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec, free_port

PROMPTS = [
    "Explain how a bicycle works.",
    "Name three rivers in Europe.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is a prime number?",
    "Give two tips for learning to cook.",
    "Describe a cat in one sentence.",
    "What does a compiler do?",
]
BOUNDARIES = (0, 8, 15, 23, 30)
PLACEMENT = ("node-0", "node-1", "node-2", "node-3")
MIDDLE = ("node-1", "node-2")


@dataclass
class Tally:
    """What the session threads saw; one lock guards it all."""

    completed: int = 0
    failed: int = 0
    mismatched: int = 0
    tokens: int = 0
    longest_gaps: list[float] = field(default_factory=list)  # per completed generation: its longest token gap
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class MemorySample:
    at: float
    pid: int
    rss: int
    held: int | None = None  # weights of loaded segments, KV caches and the weight reserve, as the node reports them
    under_load: bool = True  # False: the sample right after every session ended (before a node's next trim)

    @property
    def beyond_held(self) -> int | None:
        return None if self.held is None else self.rss - self.held


HELD_METRICS = ("splitmesh_agent_weight_bytes", "splitmesh_agent_kv_cache_bytes",
                "splitmesh_agent_weight_reserve_bytes")


def node_held_bytes(port: int) -> int | None:
    """Weights, KV-cache and weight-reserve bytes a node reports on its metrics port (None when it does not
    answer: a node stopped or restarting)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    if not all(name in values for name in HELD_METRICS):
        return None
    return int(sum(values[name] for name in HELD_METRICS))


def session_loop(mesh: LocalMesh, worker: int, tokens: int, expected: dict[str, list[int]], stop: threading.Event,
                 tally: Tally) -> None:
    with Client(mesh.address, timeout_s=180.0) as client:
        for turn in itertools.count():
            if stop.is_set():
                return
            prompt = PROMPTS[(worker + turn) % len(PROMPTS)]
            ids, arrivals = [], [time.perf_counter()]
            try:
                for event in client.generate([{"role": "user", "content": prompt}], max_new_tokens=tokens,
                                             ignore_eos=True):
                    ids.append(event.token_id)
                    arrivals.append(time.perf_counter())
            except SplitmeshError as exc:
                with tally.lock:
                    tally.failed += 1
                    tally.errors[f"{exc.code}: {exc.message[:120]}"] += 1
                continue
            with tally.lock:
                tally.completed += 1
                tally.tokens += len(ids)
                tally.mismatched += ids != expected[prompt]
                tally.longest_gaps.append(max(b - a for a, b in itertools.pairwise(arrivals[1:])) if len(ids) > 1
                                          else 0.0)


def sample_memory(mesh: LocalMesh, samples: dict[str, list[MemorySample]], under_load: bool = True) -> None:
    for name, proc in mesh.processes.items():
        if proc.poll() is not None:
            continue
        port = mesh.node_metrics_ports.get(name, 0)
        try:
            before = psutil.Process(proc.pid).memory_info().rss
            held = node_held_bytes(port) if port else None
            after = psutil.Process(proc.pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
        # A reading taken while the node loaded or freed a segment would pair one plan's RSS with another's.
        steady = held is not None and abs(after - before) < 16 << 20
        samples.setdefault(name, []).append(MemorySample(time.monotonic(), proc.pid, after,
                                                         held if steady else None, under_load))


def ensure_base_plan(mesh: LocalMesh) -> None:
    """Every node back and every link up, then the plan on all four nodes (a live re-split if it moved)."""
    wait_all_alive(mesh, 120)
    wait_links_up(mesh, 60)
    with mesh.client() as client:
        status = client.status()
        chain = [(s.start, s.end, s.node_id) for s in status.plan.segments]
        if chain != [(a, b, n) for a, b, n in zip(BOUNDARIES, BOUNDARIES[1:], PLACEMENT, strict=False)]:
            for attempt in itertools.count(1):
                try:
                    client.resplit(BOUNDARIES, PLACEMENT)
                    break
                except SplitmeshError:
                    if attempt == 5:
                        raise
                    time.sleep(1.0)
    mesh.wait_serving(60)


def fault_loop(mesh: LocalMesh, proxies: dict[str, TcpProxy], kinds: list[str], every_s: float, hold_s: float,
               started: float, stop: threading.Event, log: list[tuple[float, str, str]],
               broken: list[BaseException]) -> None:
    """At started + k*every_s, the next kind on the next middle node; each fault is healed after hold_s.
    A fault that cannot be injected or healed (a node that does not come back) stops the loop and is reported."""
    try:
        _faults(mesh, proxies, kinds, every_s, hold_s, started, stop, log)
    except (TimeoutError, RuntimeError, SplitmeshError) as exc:
        broken.append(exc)


def _faults(mesh: LocalMesh, proxies: dict[str, TcpProxy], kinds: list[str], every_s: float, hold_s: float,
            started: float, stop: threading.Event, log: list[tuple[float, str, str]]) -> None:
    for k in itertools.count(1):
        if stop.wait(max(0.0, started + k * every_s - time.monotonic())):
            return
        kind, victim = kinds[(k - 1) % len(kinds)], MIDDLE[(k - 1) % len(MIDDLE)]
        ensure_base_plan(mesh)
        if stop.is_set():
            return
        log.append((time.monotonic() - started, kind, victim))
        inject(mesh, proxies, kind, victim)
        if kind != "kill":
            time.sleep(hold_s)
        heal(mesh, proxies, kind, victim)


STABLE_TOLERANCE = 1.05  # the last third's floor may sit this much (and 20 MB) above the middle third's


Figure = float | list[float]  # a value of the closing JSON line
MIN_JUDGED_SAMPLES = 9  # a process judged on fewer (a node restarted late in the run) is reported, not judged


def judged_samples(rows: list[MemorySample]) -> list[MemorySample]:
    """The samples a process is judged on: under load and, for a node, those with its report, from when it
    first hosts. (The sample after the load ended is reported on its own: it sees memory the sessions held
    and gave back, which no sample under load can.)"""
    rows = [r for r in rows if r.under_load]
    if any(r.held is not None for r in rows):
        hosting = next((i for i, r in enumerate(rows) if r.held), len(rows))
        return [r for r in rows[hosting:] if r.held is not None]
    return rows


def floor_mb(part: list[MemorySample]) -> float:
    """The lowest memory of these samples beyond what the node holds (RSS where it reports nothing)."""
    net = [r.beyond_held for r in part if r.beyond_held is not None]
    return min(net if net else [r.rss for r in part]) / 1e6


def settled_floors(rows: list[MemorySample]) -> tuple[float, float, bool] | None:
    """Lowest memory (MB) in the middle and in the last third of one process's samples, and whether it is
    stable; None when the process served too briefly to tell.

    Replays after a fault and plan changes load segments and raise memory for a while (the peaks); a leak
    is what stays behind, so it lifts the floor between faults. A node's floor is of what it holds beyond
    the weights and KV caches it reports (the orchestrator, which reports none, of its RSS), counted from
    the first sample in which it hosted a segment: a restarted node idles until a plan takes it back. The
    first third of that is left out: it holds the node's warm-up (its first loads and sessions).
    """
    rows = judged_samples(rows)
    if len(rows) < MIN_JUDGED_SAMPLES:
        return None
    third = len(rows) // 3
    middle = floor_mb(rows[third:2 * third])
    last = floor_mb(rows[2 * third:])
    return middle, last, last <= middle * STABLE_TOLERANCE + 20.0


def floor_trend(rows: list[MemorySample], parts: int = 6) -> list[float]:
    """The floor in each of ``parts`` equal stretches of the judged samples: a leak climbs, noise wanders."""
    rows = judged_samples(rows)
    size = len(rows) // parts
    return [round(floor_mb(rows[i * size:(i + 1) * size]), 1) for i in range(parts)] if size else []


def memory_table(samples: dict[str, list[MemorySample]]) -> tuple[Table, dict[str, Figure], bool]:
    table = Table(title="resident memory (MB)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption_justify="left")  # fits 80 columns
    table.add_column("process", justify="left", no_wrap=True)
    for column in ("n", "restarts", "start", "end", "max", "growth", "beyond held"):
        table.add_column(column, justify="right", no_wrap=True)
    figures: dict[str, Figure] = {}
    stable_all, judged = True, 0
    trends: dict[str, str] = {}
    for name, rows in sorted(samples.items()):
        last = rows[-1]
        own = [r for r in rows if r.pid == last.pid]  # the process alive at the end, since it started
        restarts = len({r.pid for r in rows}) - 1
        start, end, peak = rows[0].rss / 1e6, last.rss / 1e6, max(r.rss for r in rows) / 1e6
        key = name.replace("-", "_")
        figures.update({f"{key}_rss_start_mb": round(start, 1), f"{key}_rss_end_mb": round(end, 1),
                        f"{key}_rss_max_mb": round(peak, 1), f"{key}_restarts": restarts})
        if restarts:  # a restarted node's first sample may predate its weights: no growth figure
            growth_text = "restarted"
        else:
            growth = (last.rss - own[0].rss) / 1e6
            figures[f"{key}_rss_growth_mb"] = round(growth, 1)
            growth_text = f"{growth:+.0f}/{own[-1].at - own[0].at:.0f}s"
        floors = settled_floors(own)
        figures[f"{key}_memory_judged"] = int(floors is not None)
        if floors is None:
            table.add_row(name, str(len(rows)), str(restarts), f"{start:.0f}", f"{end:.0f}", f"{peak:.0f}",
                          growth_text, "too short")
            continue
        middle, late, stable = floors
        trend = floor_trend(own)
        figures[f"{key}_floor_trend_mb"] = trend
        trends[name] = " ".join(f"{v:.0f}" for v in trend)
        if not last.under_load and last.beyond_held is not None:
            figures[f"{key}_after_load_beyond_held_mb"] = round(last.beyond_held / 1e6, 1)
            trends[name] += f", after {last.beyond_held / 1e6:.0f}"
        judged += 1
        stable_all &= stable
        figures.update({f"{key}_middle_floor_mb": round(middle, 1), f"{key}_last_floor_mb": round(late, 1),
                        f"{key}_memory_stable": int(stable)})
        table.add_row(name, str(len(rows)), str(restarts), f"{start:.0f}", f"{end:.0f}", f"{peak:.0f}", growth_text,
                      f"{middle:.0f} | {late:.0f} " + ("flat" if stable else "[red]rises[/red]"))
    if trends:
        table.caption = ("n: samples; growth: MB over the seconds of its life. beyond held: the floor of RSS "
                         "beyond the weights and KV caches a node reports, in the middle | last third of its "
                         "judged life; by sixth under load, then after the load (MB):\n")
        table.caption += "\n".join(f"  {name}: {text}" for name, text in trends.items())
    return table, figures, stable_all and judged > 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of load")
    parser.add_argument("--sessions", type=int, default=16, help="concurrent streaming sessions")
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens per generation")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help=f"rotation of: {', '.join(FAULT_KINDS)}")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds a node stays stopped or a link cut")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per node")
    args = parser.parse_args()
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    console = Console()
    spec = MeshSpec(nodes=4, store=Path("~/.cache/splitmesh/store"), workdir=Path(tempfile.mkdtemp(prefix="soak-")),
                    orchestrator_port=0, trusted=("node-0", "node-3"), boundaries=BOUNDARIES, placement=PLACEMENT,
                    threads=args.threads, metrics_port=free_port())  # nodes report what they hold
    mesh = LocalMesh(spec)
    proxies = put_proxies(mesh, MIDDLE) if "link-cut" in kinds else {}
    tally, samples = Tally(), dict[str, list[MemorySample]]()
    faults: list[tuple[float, str, str]] = []
    broken: list[BaseException] = []
    stop = threading.Event()
    try:
        with mesh:
            console.print(f"mesh up (logs in {mesh.workdir}); fault-free outputs of {len(PROMPTS)} prompts ...")
            with mesh.client() as client:
                expected = {p: [e.token_id for e in client.generate([{"role": "user", "content": p}],
                                                                    max_new_tokens=args.tokens, ignore_eos=True)]
                            for p in PROMPTS}
            started = time.monotonic()
            workers = [threading.Thread(target=session_loop, args=(mesh, i, args.tokens, expected, stop, tally),
                                        name=f"session-{i}") for i in range(args.sessions)]
            chaos = threading.Thread(target=fault_loop, args=(mesh, proxies, kinds, args.fault_every, args.hold,
                                                              started, stop, faults, broken),
                                     name="faults") if kinds else None
            for thread in [*workers, *([chaos] if chaos else [])]:
                thread.start()
            next_sample = started
            columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("soak", total=args.duration)
                while (elapsed := time.monotonic() - started) < args.duration:
                    if time.monotonic() >= next_sample:
                        sample_memory(mesh, samples)
                        next_sample += args.sample_every
                    with tally.lock:
                        text = (f"soak: {tally.completed} done, {tally.failed} failed, {tally.mismatched} differ, "
                                f"{len(faults)} faults")
                    progress.update(task, completed=elapsed, description=text)
                    time.sleep(0.5)
                progress.update(task, completed=args.duration, description="draining in-flight generations")
                stop.set()
                for thread in workers:
                    thread.join()
                if chaos is not None:
                    chaos.join()
            sample_memory(mesh, samples, under_load=False)
            wall = time.monotonic() - started
    finally:
        stop.set()
        for proxy in proxies.values():
            proxy.close()
    gaps = sorted(tally.longest_gaps) or [0.0]
    summary = Table(title=f"soak: {args.sessions} sessions, {args.duration:.0f} s, 4-node loopback mesh (SmolLM2-135M)")
    for column in ("figure", "value"):
        summary.add_column(column, justify="right")
    fault_counts = Counter(kind for _, kind, _ in faults)
    rows = [("generations completed", str(tally.completed)), ("failed requests", str(tally.failed)),
            ("tokens differing from fault-free", str(tally.mismatched)), ("tokens generated", str(tally.tokens)),
            ("tokens/s (all sessions)", f"{tally.tokens / wall:.1f}"),
            ("faults", ", ".join(f"{k} x{n}" for k, n in fault_counts.items()) or "none"),
            ("longest token gap per generation p50 / p95 / max s",
             f"{statistics.median(gaps):.2f} / {gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))]:.2f} / {gaps[-1]:.2f}")]
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    for at, kind, victim in faults:
        console.print(f"  t={at:6.1f}s  {kind:8s} {victim}")
    for error, count in tally.errors.most_common():
        console.print(f"  [red]{count} x {error}[/red]")
    for exc in broken:
        console.print(f"  [red]fault injection stopped: {exc!r}[/red]")
    table, memory, stable = memory_table(samples)
    console.print(table)
    ok = tally.failed == 0 and tally.mismatched == 0 and tally.completed > 0 and not broken and stable
    console.print("[green]PASS[/green]: no failed request, every output identical, memory stable" if ok
                  else "[red]FAIL[/red]" + ("" if stable else ": a process's memory floor kept rising"))
    figures: dict[str, Figure] = {
        "duration_s": round(wall, 1), "sessions": args.sessions, "completed": tally.completed, "failed": tally.failed,
        "mismatched": tally.mismatched, "tokens": tally.tokens, "tokens_per_s": round(tally.tokens / wall, 2),
        **{f"faults_{k.replace('-', '_')}": n for k, n in fault_counts.items()},
        "gap_p50_s": round(statistics.median(gaps), 3),
        "gap_p95_s": round(gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))], 3), "gap_max_s": round(gaps[-1], 3),
        **memory}
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
