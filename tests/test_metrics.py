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
