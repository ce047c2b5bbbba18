"""While a trigger stays fired, the adaptive loop's identical "keep" decisions are recorded once a minute, not once a
second, and the history can be filtered by kind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from orchestrator import controller as control
from orchestrator.adaptation import Adapter
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.coordinator import Coordinator
from orchestrator.metrics import MeshCollector
from orchestrator.planning import Plan
from orchestrator.policy import Policy
from orchestrator.servicer import AdminServicer
from tests.conftest import STORE


def _busy_single_node(tmp_path: Path) -> Controller:
    """One trusted node at 99% CPU hosting the whole model: the utilisation trigger fires and nothing is better."""
    co = Coordinator(OrchestratorConfig(state_dir=str(tmp_path), store=str(STORE), trusted_nodes=["node-0"]))
    co.registry.register(pb.RegisterRequest(node_id="node-0", address="127.0.0.1:1", capacity=pb.Capacity(
        cpu_utilisation=0.99, memory_available_bytes=16 << 30, layer_decode_ms=1.0)))
    co.view = PlanView.parse(co.build_plan(Plan.of([(Span(0, co.model.num_layers), "node-0")]), 1))
    return Controller(co, Adapter(co, Policy()))


def test_a_persisting_trigger_is_recorded_once_then_summarised(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    controller = _busy_single_node(tmp_path)
    decisions = []
    for _ in range(5):
        asyncio.run(controller.decide())
        decisions.append(controller.adapter.last)
    assert all(d is not None and d.kind == "keep" and d.triggers for d in decisions)
    history = controller.co.state.decisions(50)
    assert [d.kind for d in history] == ["keep"]  # five decisions, one row
    monkeypatch.setattr(control, "REPEAT_RECORD_S", 0.0)  # a minute later
    asyncio.run(controller.decide())
    history = controller.co.state.decisions(50)
    assert len(history) == 2 and history[-1].reason.endswith("(and 4 times since the last record)")
    controller.record("operator", "drain node-9", None, 1, 2)
    assert [d.kind for d in controller.co.state.decisions(50, {"operator"})] == ["operator"]
    assert [d.kind for d in controller.co.state.decisions(1, {"keep"})] == ["keep"]
    asyncio.run(controller.co.close())


def test_no_latency_measured_is_absent_not_zero(tmp_path: Path) -> None:
    controller = _busy_single_node(tmp_path)
    adapter = controller.adapter
    adapter.set_drained("node-0", True)
    servicer = AdminServicer(controller.co, controller)
    status = asyncio.run(servicer.Status(pb.StatusRequest(), None))
    assert not status.HasField("ewma_latency_ms")  # it read 0.0: perfect latency
    assert [n.drained for n in status.nodes] == [True]
    collected = {m.name: m.samples for m in MeshCollector(controller.co, controller).collect()}
    assert collected["splitmesh_latency_ewma_ms"] == []
    adapter.observe_latency(42.0)
    status = asyncio.run(servicer.Status(pb.StatusRequest(), None))
    assert status.HasField("ewma_latency_ms") and status.ewma_latency_ms == 42.0
    collected = {m.name: m.samples for m in MeshCollector(controller.co, controller).collect()}
    assert [s.value for s in collected["splitmesh_latency_ewma_ms"]] == [42.0]
    asyncio.run(controller.co.close())


def test_adjacent_segments_on_one_node_are_priced(tmp_path: Path) -> None:
    adapter = _busy_single_node(tmp_path).adapter
    one = adapter.predicted_ms(Plan.of([(Span(0, 30), "node-0")]))
    two = adapter.predicted_ms(Plan.of([(Span(0, 10), "node-0"), (Span(10, 30), "node-0")]))
    assert 0 < two == pytest.approx(one)  # it was inf: the hop from node-0 to itself has no link
    asyncio.run(adapter.co.close())
