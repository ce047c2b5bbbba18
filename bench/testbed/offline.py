"""bench/simulate.py on a testbed run: the decision engine and cost model fed what the live mesh measured.

For every bandwidth point of a recorded ``bench.adaptive_vs_static`` run, the static run's reports (per-layer
compute of every node, links as probed) become a ClusterState. The static split is costed on it, and a fresh
DecisionEngine with the run's policy decides, offline, what to do; its plan is costed on the same state. The
table puts the simulated static and adaptive latency and plan next to what the testbed measured and the live
loop installed, so the cost model and the decision are both checked against reality. Run:
    python -m bench.simulate --measured bench/results/<run>/figures.json
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.model_store import ModelStore
from common.spans import spans_from_boundaries
from orchestrator.environment import model_profile
from orchestrator.planning import (
    ClusterState,
    DecisionEngine,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    Plan,
    Problem,
    evaluate_plan,
)
from orchestrator.policy import Policy, apply_policy

from .scenario import Scenario, load_scenario

UNRECORDED_MEMORY_BYTES = 1 << 40  # runs before memory was recorded: a 135M-parameter model fits every host


@dataclass(frozen=True)
class PointCheck:
    """One bandwidth point: measured on the testbed vs simulated from its static run's inputs (ms)."""

    mbps: float
    static_measured_ms: float
    static_simulated_ms: float
    adaptive_measured_ms: float
    adaptive_simulated_ms: float
    measured_plan: str
    simulated_plan: str
    simulated_decision: str

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 1) if isinstance(v, float) and math.isfinite(v) else v) for k, v in self.__dict__.items()}


def cluster_from_inputs(inputs: dict[str, Any], scenario: Scenario) -> ClusterState:
    """The ClusterState the recorded ``model_inputs`` describe (trust from the scenario, as the orchestrator's)."""
    trusted = set(scenario.trusted)
    nodes = tuple(NodeProfile(node_id=name, trusted=name in trusted,
                              memory_bytes=int(v.get("memory_mb", UNRECORDED_MEMORY_BYTES / 2**20) * 2**20),
                              decode_s_per_layer=v["decode_ms_per_layer"] / 1e3,
                              prefill_s_per_layer_token=v["prefill_ms_per_layer_token"] / 1e3,
                              utilisation=min(1.0, max(0.0, v["utilisation"])))
                  for name, v in sorted(inputs["nodes"].items()))
    links = {}
    for key, v in inputs["links"].items():
        src, dst = key.split("->")
        links[(src, dst)] = LinkProfile(v["mbps"] * 1e6, v["rtt_ms"] / 1e3)
    return ClusterState(nodes, links)


def run_policy(scenario: Scenario, prompt_tokens: int, decode_tokens: int) -> Policy:
    """The adaptive run's policy, as ``bench.adaptive_vs_static`` sets it on the live orchestrator."""
    shape = {"prompt_tokens": str(prompt_tokens), "decode_tokens": str(decode_tokens)}
    return apply_policy(Policy(), {**shape, **scenario.static_policy, **scenario.policy})


def check_point(row: dict[str, Any], scenario: Scenario, model: ModelProfile, policy: Policy) -> PointCheck:
    static = Plan.of(list(zip(spans_from_boundaries(scenario.boundaries), scenario.placement, strict=True)))
    cluster = cluster_from_inputs(row["static"]["model_inputs"], scenario)
    workload = policy.workload()
    problem = Problem(cluster, model, workload, policy.decision.weights, policy.decision.privacy)
    static_cost = evaluate_plan(problem, static)
    decision = DecisionEngine(policy.decision).decide(0.0, cluster, model, workload, static)
    chosen = decision.plan if decision.plan is not None else static
    chosen_cost = evaluate_plan(problem, chosen)
    return PointCheck(mbps=float(row["mbps"]), static_measured_ms=row["static"]["request_ms"],
                      static_simulated_ms=static_cost.request_s * 1e3,
                      adaptive_measured_ms=row["adaptive"]["request_ms"],
                      adaptive_simulated_ms=chosen_cost.request_s * 1e3, measured_plan=row["adaptive_plan"],
                      simulated_plan=str(chosen), simulated_decision=f"{decision.kind}: {decision.reason}")


def check_run(figures_path: Path, store: Path) -> tuple[Scenario, list[PointCheck]]:
    figures = json.loads(figures_path.read_text())
    if "sweep" not in figures:
        raise ValueError(f"{figures_path}: no sweep recorded (a run with --skip-sweep)")
    scenario = load_scenario(figures["scenario"])
    model = model_profile(ModelStore(store.expanduser()).open(scenario.model))
    lo, hi = figures["prompt_tokens"]
    policy = run_policy(scenario, (lo + hi) // 2, int(figures["max_new_tokens"]))
    return scenario, [check_point(row, scenario, model, policy) for row in figures["sweep"]]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and math.isfinite(a) and math.isfinite(b) else "-"


def print_checks(console: Console, figures_path: Path, checks: list[PointCheck]) -> None:
    t = Table(title=f"bench/simulate.py on the measured inputs of {figures_path}: simulated vs measured (ms)")
    for col in ("bottleneck Mbit/s", "static meas.", "static sim.", "ratio", "adaptive meas.", "adaptive sim.",
                "ratio", "adapt./static meas.", "adapt./static sim.", "live plan", "simulated plan"):
        t.add_column(col, justify="left" if "plan" in col else "right")
    for c in checks:
        t.add_row(f"{c.mbps:g}", f"{c.static_measured_ms:.0f}", f"{c.static_simulated_ms:.0f}",
                  _ratio(c.static_simulated_ms, c.static_measured_ms), f"{c.adaptive_measured_ms:.0f}",
                  f"{c.adaptive_simulated_ms:.0f}", _ratio(c.adaptive_simulated_ms, c.adaptive_measured_ms),
                  _ratio(c.adaptive_measured_ms, c.static_measured_ms),
                  _ratio(c.adaptive_simulated_ms, c.static_simulated_ms), c.measured_plan, c.simulated_plan)
    console.print(t)
    errors = [abs(sim / meas - 1) for c in checks for sim, meas in
              ((c.static_simulated_ms, c.static_measured_ms), (c.adaptive_simulated_ms, c.adaptive_measured_ms))
              if meas and math.isfinite(sim)]
    same = sum(1 for c in checks if c.simulated_plan == c.measured_plan)
    if errors:
        console.print(f"simulated within 25% of measured: {sum(e <= 0.25 for e in errors)} of {len(errors)} "
                      f"(median error {100 * statistics.median(errors):.0f}%); the offline decision picked the live "
                      f"plan at {same} of {len(checks)} points")


def main(figures_path: Path, store: Path) -> None:
    console = Console(width=200)
    scenario, checks = check_run(figures_path, store)
    console.print(f"Scenario {figures_path}: {scenario.description}")
    console.print("Inputs per point: the static run's last capacity and link reports (what the live loop saw "
                  "before it acted); policy and request shape as the testbed run set them.")
    print_checks(console, figures_path, checks)
    print(json.dumps({"bench": "simulate", "measured": str(figures_path), "points": [c.as_dict() for c in checks]}))
