"""The orchestrator's Prometheus endpoint reflects the live plan, nodes and decisions."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitmesh import Client
from splitmesh.launcher import LocalMesh

pytestmark = pytest.mark.slow


def test_metrics_follow_the_plan(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        reply = client.resplit([0, 15, 30], ["node-0", "node-4"])
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.spec.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("splitmesh_plan_epoch", ())] == reply.plan.epoch
    assert samples[("splitmesh_plan_segment_layers", (("node", "node-4"), ("segment", "1")))] == 15
    alive = {labels[0][1]: v for (name, labels), v in samples.items() if name == "splitmesh_node_alive"}
    assert alive == {f"node-{i}": 1.0 for i in range(5)}
    assert samples[("splitmesh_decisions_total", (("kind", "operator"),))] >= 1


def test_node_agents_export_their_own_metrics(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        client.resplit([0, 15, 30], ["node-0", "node-4"])
        tokens = len(list(client.generate("Hello there", max_new_tokens=5, ignore_eos=True)))
    def scrape(node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{mesh.node_metrics_ports[node]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}
    head, tail = scrape("node-0"), scrape("node-4")
    assert head[("splitmesh_agent_tokens_total", ())] >= tokens
    assert head[("splitmesh_agent_activation_bytes_total", (("peer", "node-4"),))] > 0
    assert head[("splitmesh_agent_loaded_layers", ())] == 15
    assert tail[("splitmesh_agent_loaded_layers", ())] == 15
    # fp32 SmolLM2-135M: a decoder layer holds 3,540,096 values, the token table 49,152 x 576, the final norm 576;
    # the tail's tied head reads its own copy of the table.
    layer, table, norm = 4 * 3_540_096, 4 * 49_152 * 576, 4 * 576
    assert head[("splitmesh_agent_weight_bytes", ())] == table + 15 * layer
    assert tail[("splitmesh_agent_weight_bytes", ())] == table + 15 * layer + norm
    assert tail[("splitmesh_agent_segment_compute_seconds_count", (("segment", "15-30"),))] >= tokens
    # One prefill and tokens-1 decode steps crossed node-0 -> node-4, each with the hop's own overhead observed.
    decode = (("kind", "decode"), ("peer", "node-4"))
    assert head[("splitmesh_agent_hop_overhead_seconds_count", decode)] >= tokens - 1
    overhead = head[("splitmesh_agent_hop_overhead_seconds_sum", decode)]
    waited = head[("splitmesh_agent_hop_seconds_total", (("peer", "node-4"),))]
    assert 0 < overhead < waited  # the tail's compute is taken out of the wait
    assert head[("splitmesh_agent_active_sessions", ())] == 0 and head[("splitmesh_agent_kv_cache_bytes", ())] == 0
