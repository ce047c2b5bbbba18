"""A control plane that cannot die quietly.

Before: a node reporting ``layer_decode_ms = NaN`` (or a negative figure) about itself made building its
profile raise inside the control loop, which caught only PlacementError and was never awaited: the loop
stopped with nothing in the log, health stayed SERVING, and a later kill -9 of a plan node was never
re-planned. Now such figures are refused where they arrive, and a tick that raises anyway is logged,
counted and followed by the next one, with health reporting NOT_SERVING while the loop is dead or failing.
"""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2
from rich.console import Console

from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from orchestrator.adaptation import Adapter
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import FAILED_TICKS, TICK_ERRORS, Controller
from orchestrator.coordinator import Coordinator
from orchestrator.main import report_health
from orchestrator.policy import Policy
from orchestrator.report_checks import capacity_problem, link_problem, report_problem
from splitmesh.launcher import LocalMesh, MeshSpec
from splitmesh.tables import nodes_table

GOOD = pb.Capacity(cpu_utilisation=0.2, memory_total_bytes=8 << 30, memory_available_bytes=4 << 30, cpu_count=4,
                   layer_decode_ms=1.5, layer_prefill_ms_per_token=0.4)


def _capacity(**changes: float) -> pb.Capacity:
    capacity = pb.Capacity()
    capacity.CopyFrom(GOOD)
    for name, value in changes.items():
        setattr(capacity, name, value)
    return capacity


# ------------------------------------------------------------------ report checks, offline
@pytest.mark.parametrize(("field", "value"), [
    ("layer_decode_ms", math.nan), ("layer_decode_ms", -1.0), ("layer_decode_ms", math.inf),
    ("layer_decode_ms", 1e9), ("layer_prefill_ms_per_token", -0.1), ("cpu_utilisation", 1.5),
    ("cpu_utilisation", math.nan), ("memory_available_bytes", float(16 << 30)),
    ("layer_decode_row_ms", -0.5), ("layer_decode_row_ms", math.nan), ("decode_rows_mean", math.inf),
    ("decode_rows_mean", -1.0),
])
def test_impossible_capacities_are_named(field: str, value: float) -> None:
    problem = capacity_problem(_capacity(**{field: int(value) if field.startswith("memory") else value}))
    assert problem is not None and field.split("_bytes", maxsplit=1)[0] in problem


def test_plausible_reports_and_down_links_pass() -> None:
    assert capacity_problem(GOOD) is None
    report = pb.NodeReport(node_id="node-1", capacity=GOOD, token_latency_ms=80.0, tokens=4,
                           links=[pb.LinkStatus(peer_id="node-2", bandwidth_bps=1e9, rtt_ms=0.2),
                                  pb.LinkStatus(peer_id="node-3", bandwidth_bps=0.0, rtt_ms=-1.0)])  # down
    assert report_problem(report) is None
    assert link_problem(pb.LinkStatus(peer_id="node-2", bandwidth_bps=1e9, rtt_ms=-1.0)) is not None
    assert link_problem(pb.LinkStatus(peer_id="node-2", bandwidth_bps=math.nan, rtt_ms=1.0)) is not None
    assert report_problem(pb.NodeReport(node_id="n", capacity=GOOD, token_latency_ms=-3.0)) is not None
    assert report_problem(pb.NodeReport(node_id="n", capacity=GOOD, active_sessions=(1 << 32) - 1)) is not None


# ------------------------------------------------------------------ the loop survives its own failures
def test_a_failing_tick_is_logged_counted_and_the_loop_goes_on(store: ModelStore, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    config = OrchestratorConfig(state_dir=str(tmp_path), store=str(store.root))
    co = Coordinator(config)
    controller = Controller(co, Adapter(co, Policy(interval_s=0.1)))  # a tick every 0.05 s
    fail = {"on": True}
    ticks = {"n": 0}

    async def tick() -> None:
        ticks["n"] += 1
        if fail["on"]:
            raise ValueError("node profile: per-layer costs must be positive")

    controller.tick = tick  # type: ignore[method-assign]
    health_servicer = health.aio.HealthServicer()

    async def status() -> int:
        request = health_pb2.HealthCheckRequest(service="")
        reply: health_pb2.HealthCheckResponse = await health_servicer.Check(request, None)
        return int(reply.status)

    async def scenario() -> None:
        before = TICK_ERRORS._value.get()
        controller.start()
        watcher = asyncio.create_task(report_health(controller, health_servicer))
        await asyncio.sleep(0.2)
        assert ticks["n"] >= 2  # the loop went on after the first failure
        while controller.failed_in_a_row < FAILED_TICKS + 2:
            await asyncio.sleep(0.05)
        assert not controller.health()[0] and "ValueError" in controller.health()[1]
        await asyncio.sleep(0.15)
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert TICK_ERRORS._value.get() - before >= FAILED_TICKS
        fail["on"] = False  # the cause goes away: the loop recovers by itself
        await asyncio.sleep(0.3)
        assert controller.health() == (True, "")
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        assert controller._task is not None
        controller._task.cancel()  # a dead loop task
        await asyncio.sleep(0.2)
        assert "stopped" in controller.health()[1]
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        watcher.cancel()
        await controller.stop()

    try:
        asyncio.run(scenario())
    finally:
        co.state.close()
    failures = [r for r in caplog.records if "control tick failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None  # logged with its traceback


# ------------------------------------------------------------------ live: bad reports refused, loop keeps planning
@pytest.fixture(scope="module")
def mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """node-0 (trusted) holds both ends, node-1 the middle, node-2 is spare."""
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("control"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"))
    with LocalMesh(spec) as local:
        yield local


def _register(stub: pb_grpc.OrchestratorStub, node_id: str, capacity: pb.Capacity) -> grpc.StatusCode:
    try:
        stub.Register(pb.RegisterRequest(node_id=node_id, address="127.0.0.1:9", capacity=capacity), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _report(stub: pb_grpc.OrchestratorStub, node_id: str, capacity: pb.Capacity, count: int,
            every_s: float) -> grpc.StatusCode:
    """Stream ``count`` reports of ``capacity`` about ``node_id``; the status the stream ended with."""
    def reports() -> Iterator[pb.NodeReport]:
        for _ in range(count):
            yield pb.NodeReport(node_id=node_id, capacity=capacity)
            time.sleep(every_s)

    try:
        stub.Report(reports(), timeout=60)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _replanned(mesh: LocalMesh, epoch: int, timeout_s: float) -> pb.StatusReply:
    """The first serving status on an epoch above ``epoch`` (a killed node is expected to stay dead)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = mesh.status()
        if status is not None and status.serving and status.plan.epoch > epoch:
            return status
        time.sleep(0.2)
    raise AssertionError(f"not re-planned within {timeout_s:.0f} s: {status.reason if status else 'no status'}")


@pytest.mark.slow
def test_bad_reports_are_refused_and_a_lost_node_is_still_replanned(mesh: LocalMesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        assert _register(stub, "node-9", _capacity(cpu_utilisation=math.nan)) == grpc.StatusCode.INVALID_ARGUMENT
        assert _register(stub, "node-9", GOOD) == grpc.StatusCode.OK  # a node that will lie about itself
        assert _report(stub, "node-9", _capacity(layer_decode_ms=-4.0), 1, 0) == grpc.StatusCode.INVALID_ARGUMENT
        assert _register(stub, "node-9", GOOD) == grpc.StatusCode.OK
        ended: list[grpc.StatusCode] = []  # NaN about itself for 8 s, while a plan node dies
        liar = threading.Thread(target=lambda: ended.append(
            _report(stub, "node-9", _capacity(layer_decode_ms=math.nan), 16, 0.5)))
        liar.start()
        time.sleep(1.0)
        epoch = mesh.wait_serving().plan.epoch
        mesh.signal("node-1", signal.SIGKILL)
        status = _replanned(mesh, epoch, 60.0)  # main: the loop was dead, so this never happened
        liar.join()
    assert ended == [grpc.StatusCode.INVALID_ARGUMENT]
    assert all(s.node_id not in ("node-1", "node-9") for s in status.plan.segments)
    liar_state = next(n for n in status.nodes if n.node_id == "node-9")
    assert liar_state.refused_reports == 2 and "layer_decode_ms" in liar_state.refused_reason
    assert math.isfinite(liar_state.capacity.layer_decode_ms)  # its figures never reached the registry
    console = Console(width=400, record=True)
    console.print(nodes_table(status))
    assert "node-9 refused 2: report: layer_decode_ms is nan" in console.export_text()  # what `splitmesh status` shows
    with mesh.client() as client:
        assert "Paris" in client.generate_text("The capital of France is", max_new_tokens=4)
