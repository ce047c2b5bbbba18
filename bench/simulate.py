"""Static split vs the adaptive DecisionEngine on a scenario file (bench/scenarios/*.json).

Every figure is computed here from the scenario's stated hardware and network assumptions; the
"measured" latency of a request is the cost model's prediction on the true cluster state at that moment.
Prints the assumptions, a Table-II-style comparison per backhaul bandwidth, the decisions of the timeline
scenario, saves a latency-vs-bandwidth PNG under --out, and ends with one JSON line of all figures. Run:
    python -m bench.simulate [--scenario bench/scenarios/papers.json] [--out bench/out/]
With ``--measured FIGURES`` it runs a recorded testbed experiment instead (bench.testbed.offline): the cost
model and the decision engine on the inputs the live mesh measured, next to the measured latencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.spans import even_boundaries, spans_from_boundaries
from orchestrator.planning import (
    ClusterState,
    CostWeights,
    DecisionConfig,
    DecisionEngine,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    Plan,
    Problem,
    Workload,
    evaluate_plan,
)

log = logging.getLogger("bench.simulate")


@dataclass(frozen=True)
class Request:
    """One generation request of the stream."""

    at: float  # arrival time, s
    prompt: int  # prompt tokens
    decode: int  # generated tokens


def derive_nodes(sc: dict[str, Any], model: ModelProfile) -> tuple[list[NodeProfile], list[str]]:
    """Per-layer costs from peak throughput x efficiency: decode reads every weight once per token (memory
    bound), prefill does 2 FLOPs per weight per token (compute bound)."""
    eff = float(sc["efficiency"])
    params_per_layer = model.layer_bytes / sc["model"]["dtype_bytes"]
    notes = [f"efficiency {eff:.0%} of peak for both memory bandwidth and FLOPs"]
    nodes = []
    for n in sc["nodes"]:
        hw = sc["hardware"][n["hw"]]
        decode = model.layer_bytes / (hw["mem_bw_gbps"] * 1e9 * eff)
        prefill = 2 * params_per_layer / (hw["dense_tflops"] * 1e12 * eff)
        memory = int((hw["memory_gb"] - hw["runtime_reserve_gb"]) * 1e9)
        nodes.append(NodeProfile(n["id"], bool(n["trusted"]), memory, decode, prefill, float(n["utilisation"]), True))
        notes.append(f"{n['id']}: {n['hw']} ({hw['dense_tflops']:g} TFLOP/s, {hw['mem_bw_gbps']:g} GB/s, "
                     f"{hw['memory_gb']:g} GB - {hw['runtime_reserve_gb']:g} GB reserve), trusted={n['trusted']}, "
                     f"background utilisation {n['utilisation']:.0%} -> decode {decode * 1e3:.3f} ms/layer, "
                     f"prefill {prefill * 1e6:.2f} us/layer/token")
    return nodes, notes


def links_for(nodes: list[NodeProfile], mbps: float, net: dict[str, Any]) -> dict[tuple[str, str], LinkProfile]:
    out = {}
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            cloud = not (a.trusted and b.trusted)
            rtt = (net["mec_cloud_rtt_ms"] if cloud else net["mec_mec_rtt_ms"]) / 1e3
            out[(a.node_id, b.node_id)] = LinkProfile(mbps * 1e6, rtt)
    return out


def requests(spec: dict[str, Any], duration: float | None = None) -> list[Request]:
    rng = random.Random(spec["seed"])
    count = spec["count"] if duration is None else int(duration / spec["interarrival_s"])
    lo_p, hi_p = spec["prompt_tokens"]
    lo_d, hi_d = spec["decode_tokens"]
    return [Request(i * spec["interarrival_s"], rng.randint(lo_p, hi_p), rng.randint(lo_d, hi_d)) for i in range(count)]


def decision_config(d: dict[str, Any]) -> DecisionConfig:
    return DecisionConfig(latency_max_ms=d["latency_max_ms"], utilisation_max=d["utilisation_max"],
                          bandwidth_min_bps=d["bandwidth_min_mbps"] * 1e6, cooldown_s=d["cooldown_s"],
                          hysteresis=d["hysteresis"], ewma_alpha=d["ewma_alpha"], weights=CostWeights(**d["weights"]))


def request_latency(cluster: ClusterState, model: ModelProfile, plan: Plan | None, req: Request, kv: int) -> float:
    """Seconds for one request on ``plan``; inf when the plan lost a node or link."""
    if plan is None:
        return math.inf
    return evaluate_plan(Problem(cluster, model, Workload(req.prompt, req.decode, kv)), plan).request_s


@dataclass
class Run:
    """Latencies of one policy over one request stream."""

    latencies: list[float]  # seconds per request (inf = failed)
    tokens: list[int]  # generated tokens per request

    def mean_ms(self) -> float:
        ok = [x for x in self.latencies if math.isfinite(x)]
        return 1e3 * sum(ok) / len(ok) if ok else math.inf

    def per_token_ms(self) -> float:
        pairs = [(x, t) for x, t in zip(self.latencies, self.tokens, strict=True) if math.isfinite(x)]
        return 1e3 * sum(x for x, _ in pairs) / sum(t for _, t in pairs) if pairs else math.inf

    def failed(self) -> int:
        return sum(1 for x in self.latencies if not math.isfinite(x))


def simulate(states: list[tuple[float, ClusterState]], model: ModelProfile, reqs: list[Request], kv: int,
             engine: DecisionEngine | None, static: Plan, monitor_s: float,
             plan_workload: Workload) -> tuple[Run, list[dict[str, Any]]]:
    """Walk time forward: monitor every ``monitor_s`` (adaptive only), serve requests on the current plan."""
    plan: Plan | None = None if engine is not None else static
    decisions: list[dict[str, Any]] = []
    run = Run([], [])
    next_check = 0.0

    def state_at(t: float) -> ClusterState:
        return [c for at, c in states if at <= t][-1]

    for req in reqs:
        while engine is not None and next_check <= req.at:
            d = engine.decide(next_check, state_at(next_check), model, plan_workload, plan)
            if d.plan is not None:
                plan = d.plan
            if d.kind != "keep" or d.triggers:
                decisions.append({"t": next_check, "kind": d.kind, "plan": str(d.plan) if d.plan else None,
                                  "triggers": [str(t) for t in d.triggers], "reason": d.reason,
                                  "old_phi": d.old_cost.phi if d.old_cost else None,
                                  "new_phi": d.new_cost.phi if d.new_cost else None,
                                  "new_step_ms": d.new_cost.decode_step_ms if d.new_cost else None})
            next_check += monitor_s
        cluster = state_at(req.at)
        lat = request_latency(cluster, model, plan, req, kv)
        if engine is not None and math.isfinite(lat):
            engine.observe_latency(1e3 * lat / req.decode)
        run.latencies.append(lat)
        run.tokens.append(req.decode)
    return run, decisions


def timeline_states(sc: dict[str, Any], nodes: list[NodeProfile]) -> list[tuple[float, ClusterState]]:
    tl = sc["timeline"]
    current = {n.node_id: n for n in nodes}
    mbps = float(tl["start_backhaul_mbps"])
    states = []
    for ev in [{"t": 0.0}, *tl["events"]]:
        mbps = float(ev.get("backhaul_mbps", mbps))
        for node_id, u in ev.get("utilisation", {}).items():
            current[node_id] = replace(current[node_id], utilisation=float(u))
        if "remove" in ev:
            current.pop(ev["remove"])
        ns = list(current.values())
        states.append((float(ev["t"]), ClusterState(tuple(ns), links_for(ns, mbps, sc["network"]))))
    return states


def save_plot(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    path = out / "latency_vs_bandwidth.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    bws = [r["backhaul_mbps"] for r in rows]
    ax.plot(bws, [r["static_ms"] for r in rows], "o-", label="static even 3-way split (MEC)")
    ax.plot(bws, [r["adaptive_ms"] for r in rows], "s-", label="adaptive (DecisionEngine)")
    ax.set_xscale("log")
    ax.set_xticks(bws, [str(b) for b in bws])
    ax.set_xlabel("backhaul bandwidth (Mbit/s)")
    ax.set_ylabel("mean request latency (ms)")
    ax.set_title("Llama-3-8B fp16, 3x MEC A100-40GB + cloud (simulated)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenario", default="bench/scenarios/papers.json")
    ap.add_argument("--out", default="bench/out/")
    ap.add_argument("--measured", type=Path, default=None,
                    help="figures.json of a bench.adaptive_vs_static run: simulate its scenario on its measured inputs")
    ap.add_argument("--store", type=Path, default=Path("~/.cache/splitmesh/store"),
                    help="model store holding the testbed scenario's model (with --measured)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if args.measured is not None:
        from bench.testbed import offline

        offline.main(args.measured, args.store)
        return
    sc = json.loads(Path(args.scenario).read_text())
    model = ModelProfile.from_config_dict(sc["model"]["config"], sc["model"]["dtype_bytes"])
    nodes, notes = derive_nodes(sc, model)
    kv = int(sc["workload"]["kv_budget_tokens"])
    reqs = requests(sc["requests"])
    mean_prompt = round(sum(r.prompt for r in reqs) / len(reqs))
    plan_workload = Workload(mean_prompt, round(sum(r.decode for r in reqs) / len(reqs)), kv)
    dcfg = sc["decision"]
    spans = spans_from_boundaries(even_boundaries(model.num_layers, len(sc["static_nodes"])))
    static = Plan.of(list(zip(spans, sc["static_nodes"], strict=True)))

    print("Assumptions (all figures below are computed from these):")
    print(f"  model: Llama-3-8B shapes, fp16: {model.num_layers} layers x {model.layer_bytes / 1e6:.1f} MB, embed "
          f"{model.embed_bytes / 1e6:.0f} MB, head {model.head_bytes / 1e6:.0f} MB, "
          f"KV {model.kv_bytes_per_token_layer} B/token/layer, KV budget {kv} tokens per hosted layer")
    for n in notes:
        print("  " + n)
    print(f"  network: every link carries the backhaul bandwidth; rtt {sc['network']['mec_mec_rtt_ms']} ms MEC-MEC, "
          f"{sc['network']['mec_cloud_rtt_ms']} ms to/from the cloud; a one-way message is charged one rtt")
    rq = sc["requests"]
    print(f"  requests: {len(reqs)} every {rq['interarrival_s']} s, prompt U{rq['prompt_tokens']}, "
          f"decode U{rq['decode_tokens']} tokens (seed {rq['seed']}); planner workload = means "
          f"{plan_workload.prompt_tokens}/{plan_workload.decode_tokens}")
    print(f"  static split: {static}; adaptive starts with no plan and monitors every {dcfg['monitor_interval_s']} s")
    print("  latency of a request = cost-model prediction on the true cluster state (no queueing, no noise)")
    print()

    rows = []
    for mbps in sc["backhaul_mbps"]:
        cluster = ClusterState(tuple(nodes), links_for(nodes, mbps, sc["network"]))
        states = [(0.0, cluster)]
        st, _ = simulate(states, model, reqs, kv, None, static, dcfg["monitor_interval_s"], plan_workload)
        eng = DecisionEngine(decision_config(dcfg))
        ad, decs = simulate(states, model, reqs, kv, eng, static, dcfg["monitor_interval_s"], plan_workload)
        final = [d["plan"] for d in decs if d["plan"]]
        rows.append({"backhaul_mbps": mbps, "static_ms": st.mean_ms(), "adaptive_ms": ad.mean_ms(),
                     "delta_pct": 100 * (ad.mean_ms() - st.mean_ms()) / st.mean_ms(),
                     "static_ms_per_token": st.per_token_ms(), "adaptive_ms_per_token": ad.per_token_ms(),
                     "adaptive_plan": final[-1] if final else str(static), "reconfigurations": len(final)})
    print("Table II form: mean end-to-end request latency (prefill + decode), static vs adaptive")
    print(f"{'backhaul':>9} | {'static ms':>10} | {'adaptive ms':>11} | {'delta %':>8} | {'static ms/tok':>13} | "
          f"{'adapt. ms/tok':>13} | adaptive plan")
    for r in rows:
        print(f"{r['backhaul_mbps']:>4} Mb/s | {r['static_ms']:>10.1f} | {r['adaptive_ms']:>11.1f} | "
              f"{r['delta_pct']:>+7.1f}% | {r['static_ms_per_token']:>13.2f} | {r['adaptive_ms_per_token']:>13.2f} | "
              f"{r['adaptive_plan']}")
    png = save_plot(rows, Path(args.out))
    print(f"\nplot: {png}\n")

    tl = sc["timeline"]
    states = timeline_states(sc, nodes)
    treqs = requests(sc["requests"], duration=float(tl["duration_s"]))
    st, _ = simulate(states, model, treqs, kv, None, static, dcfg["monitor_interval_s"], plan_workload)
    eng = DecisionEngine(decision_config(dcfg))
    ad, decs = simulate(states, model, treqs, kv, eng, static, dcfg["monitor_interval_s"], plan_workload)
    print(f"Timeline ({tl['duration_s']} s, events: {json.dumps(tl['events'])})")
    print("decisions with a trigger or a change:")
    previous = ""
    for d in decs:
        repeat = d["kind"] == "keep" and d["reason"].split(":", 1)[0] == previous.split(":", 1)[0]
        previous = d["reason"]
        if repeat:
            continue  # one line per run of identical keeps is enough
        cost = (f" phi {d['old_phi']:.3f}->{d['new_phi']:.3f}" if d["old_phi"] is not None and d["new_phi"] is not None
                else "")
        print(f"  t={d['t']:>5.0f}s {d['kind']:<10} triggers=[{', '.join(d['triggers'])}]{cost}  {d['reason']}")
    timeline = {"static_ms": st.mean_ms(), "adaptive_ms": ad.mean_ms(), "static_failed": st.failed(),
                "adaptive_failed": ad.failed(), "requests": len(treqs),
                "changes": sum(1 for d in decs if d["kind"] in ("migrate", "resplit"))}
    print(f"timeline mean request latency: static {timeline['static_ms']:.1f} ms ({timeline['static_failed']} of "
          f"{len(treqs)} requests failed after a node loss), adaptive {timeline['adaptive_ms']:.1f} ms "
          f"({timeline['adaptive_failed']} failed), {timeline['changes']} reconfigurations")
    print(json.dumps({"bench": "simulate", "scenario": args.scenario, "table": rows, "timeline": timeline,
                      "timeline_decisions": decs, "plot": str(png)}))


if __name__ == "__main__":
    main()
