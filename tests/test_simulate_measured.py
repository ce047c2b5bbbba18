"""`bench/simulate.py --measured` puts the cost model and an offline decision next to a testbed run's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.testbed.offline import check_run
from common.model_store import ModelStore

SCENARIO = "bench/scenarios/testbed_edge_cloud.json"
ROOT = Path(__file__).resolve().parents[1]


def _inputs(cloud_mbps: float) -> dict[str, Any]:
    node = {"decode_ms_per_layer": 1.5, "prefill_ms_per_layer_token": 0.105, "utilisation": 0.0}
    links = {}
    for a in ("edge", "mec", "cloud"):
        for b in ("edge", "mec", "cloud"):
            if a != b:
                mbps = cloud_mbps if "cloud" in (a, b) and "mec" not in (a, b) else 1000.0
                links[f"{a}->{b}"] = {"mbps": mbps, "rtt_ms": 0.5}
    return {"epoch": 1, "nodes": {n: dict(node) for n in ("edge", "mec", "cloud")}, "links": links}


def _figures(tmp_path: Path) -> Path:
    rows = [{"mbps": mbps, "static": {"request_ms": static_ms, "model_inputs": _inputs(mbps)},
             "adaptive": {"request_ms": adaptive_ms}, "adaptive_plan": plan}
            for mbps, static_ms, adaptive_ms, plan in (
                (20.0, 8700.0, 5800.0, "[0,2)@edge [2,28)@mec [28,30)@edge"),
                (200.0, 5500.0, 5400.0, "[0,2)@edge [2,28)@cloud [28,30)@edge"))]
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({"scenario": str(ROOT / SCENARIO), "prompt_tokens": [1500, 1500],
                                "max_new_tokens": 16, "sweep": rows}))
    return path


def test_the_offline_decision_leaves_the_throttled_link_and_costs_its_transfers(store: ModelStore,
                                                                                tmp_path: Path) -> None:
    _, (slow, fast) = check_run(_figures(tmp_path), store.root)
    assert "cloud" not in slow.simulated_plan and slow.simulated_decision.startswith(("migrate", "resplit"))
    assert fast.simulated_plan == fast.measured_plan and fast.simulated_decision.startswith("keep")
    # the static split sends the 1500-token prefill (576 x 4 B per token) across both cloud boundaries
    prefill_bytes = 1500 * 576 * 4
    transfer_gap_ms = 2 * prefill_bytes * 8 * (1 / 20e6 - 1 / 200e6) * 1e3
    assert slow.static_simulated_ms - fast.static_simulated_ms == pytest.approx(transfer_gap_ms, rel=0.05)
    assert slow.adaptive_simulated_ms < slow.static_simulated_ms


def test_the_command_prints_the_table_and_one_json_line(store: ModelStore, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.simulate", "--measured", str(_figures(tmp_path)),
                          "--store", str(store.root)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "simulated vs measured" in out.stdout
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert [p["mbps"] for p in last["points"]] == [20.0, 200.0]


def test_a_run_without_a_sweep_is_refused_by_name(store: ModelStore, tmp_path: Path) -> None:
    path = tmp_path / "figures.json"
    path.write_text(json.dumps({"scenario": SCENARIO, "prompt_tokens": [10, 10], "max_new_tokens": 4}))
    with pytest.raises(ValueError, match="no sweep"):
        check_run(path, store.root)
