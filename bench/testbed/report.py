"""Tables (rich) and plots (matplotlib Agg) of the adaptive-vs-static experiment."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _f(value: float, digits: int = 0) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%" if math.isfinite(value) else "-"


def table_ii(console: Console, rows: list[dict[str, Any]], sla_ms: float) -> None:
    """The papers' Table II form, with TTFT and per-token latency split out.

    "static spread" is the difference between the static meshes run before and after the adaptive one, in %
    of their mean: a delta smaller than it is noise of the box, not a difference of the plans.
    """
    t = Table(title=f"Table II form: static vs adaptive on the testbed (SLA: request under {sla_ms:.0f} ms)",
              caption="static = mean of the static meshes run before and after the adaptive one; static spread = "
                      "their difference, the box's noise at that point")
    for col in ("bottleneck Mbit/s", "static ms", "adaptive ms", "delta", "static spread", "static TTFT", "adapt. TTFT",
                "static ms/tok", "adapt. ms/tok", "throughput ratio", "SLA static", "SLA adapt.", "adaptive plan"):
        t.add_column(col, justify="left" if col == "adaptive plan" else "right")
    for r in rows:
        s, a = r["static"], r["adaptive"]
        delta = (a["request_ms"] - s["request_ms"]) / s["request_ms"] if s["request_ms"] else math.nan
        ratio = a["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else math.nan
        spread = f"{s['spread_pct']:.1f}%" if "spread_pct" in s else "-"
        t.add_row(_f(r["mbps"]), _f(s["request_ms"]), _f(a["request_ms"]), f"{100 * delta:+.1f}%", spread,
                  _f(s["ttft_ms"]), _f(a["ttft_ms"]), _f(s["per_token_ms"], 1), _f(a["per_token_ms"], 1),
                  f"{ratio:.2f}x", _pct(s["sla"]), _pct(a["sla"]), r["adaptive_plan"])
    console.print(t)


def model_check(console: Console, rows: list[dict[str, Any]]) -> None:
    """Predicted (orchestrator cost model on the live reports) vs measured, per run."""
    t = Table(title="Cost model check: predicted vs measured (means over the measured requests)")
    for col in ("run", "TTFT meas.", "TTFT pred.", "ratio", "ms/tok meas.", "ms/tok pred.", "ratio"):
        t.add_column(col, justify="right")
    for r in rows:
        for mode in ("static", "adaptive"):
            m = r[mode]
            t.add_row(f"{mode} @ {r['mbps']:g} Mbit/s", _f(m["ttft_ms"]), _f(m["predicted_ttft_ms"]),
                      _f(m["predicted_ttft_ms"] / m["ttft_ms"], 2) if m["ttft_ms"] else "-",
                      _f(m["per_token_ms"], 1), _f(m["predicted_per_token_ms"], 1),
                      _f(m["predicted_per_token_ms"] / m["per_token_ms"], 2) if m["per_token_ms"] else "-")
    console.print(t)
    for r in rows:
        for mode in ("static", "adaptive"):
            inputs = r[mode].get("model_inputs")
            if inputs:
                console.print(f"  inputs, {mode} @ {r['mbps']:g} Mbit/s (epoch {inputs['epoch']}): "
                              + "; ".join(f"{n} {v['decode_ms_per_layer']} ms/layer decode, "
                                          f"{v['prefill_ms_per_layer_token']} ms/layer-token prefill, "
                                          f"util {v['utilisation']}" for n, v in inputs["nodes"].items())
                              + "; links " + ", ".join(f"{k} {v['mbps']} Mbit/s {v['rtt_ms']} ms"
                                                       for k, v in inputs["links"].items()))


def plot_sweep(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "testbed_latency_vs_bandwidth.png"
    bws = [r["mbps"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("request_ms", "ttft_ms", "per_token_ms"),
                              ("mean request latency (ms)", "time to first token (ms)", "per-token latency (ms)"),
                              strict=True):
        ax.plot(bws, [r["static"][key] for r in rows], "o-", label="static")
        ax.plot(bws, [r["adaptive"][key] for r in rows], "s-", label="adaptive")
        pred = f"predicted_{key}"
        ax.plot(bws, [r["static"][pred] for r in rows], "o:", alpha=0.5, label="static, cost model")
        ax.plot(bws, [r["adaptive"][pred] for r in rows], "s:", alpha=0.5, label="adaptive, cost model")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(bws, [f"{b:g}" for b in bws])
        ax.set_ylim(bottom=0)  # linear from zero: differences read as what they are
        ax.set_xlabel("bottleneck link (Mbit/s)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("splitmesh on the namespace testbed (measured; dotted = orchestrator cost model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(runs: dict[str, dict[str, Any]], events: list[tuple[float, str]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "testbed_timeline.png"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    for (mode, run), marker in zip(runs.items(), ("o", "s", "^"), strict=False):
        reqs = [r for r in run["requests"] if not r["error"]]
        top.plot([r["end_s"] for r in reqs], [r["total_ms"] for r in reqs], marker + "-", label=f"{mode}: request")
        top.plot([r["end_s"] for r in reqs], [r["ttft_ms"] for r in reqs], marker + ":", alpha=0.6,
                 label=f"{mode}: TTFT")
        samples = run["epochs"]
        bottom.step([s[0] for s in samples], [s[1] for s in samples], where="post", label=mode)
    for t, text in events:
        for ax in (top, bottom):
            ax.axvline(t, color="grey", linestyle="--", alpha=0.6)
        top.annotate(text.split(": ", 1)[-1], (t, top.get_ylim()[1]), fontsize=7, rotation=90, va="top")
    top.set_ylabel("latency (ms), at request end")
    top.legend(fontsize=7)
    top.grid(True, alpha=0.3)
    bottom.set_ylabel("plan epoch")
    bottom.set_xlabel("seconds into the run")
    bottom.legend(fontsize=7)
    bottom.grid(True, alpha=0.3)
    fig.suptitle("bandwidth drop mid-run: latency and plan epoch over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
