"""A paused orchestrator does not blame its nodes: liveness counts only the orchestrator's own running time."""

from __future__ import annotations

import signal
import time

import pytest

from common.proto import splitmesh_pb2 as pb
from orchestrator.registry import AwakeClock, Registry
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import STORE


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _registry(source: FakeTime) -> Registry:
    registry = Registry({"a"}, dead_after_s=3.0, clock=AwakeClock(max_gap_s=1.5, source=source))
    registry.register(pb.RegisterRequest(node_id="a", address="a:1"))
    return registry


def test_a_pause_of_the_orchestrator_does_not_count_as_node_silence() -> None:
    source = FakeTime()
    registry = _registry(source)
    for _ in range(4):  # the control loop reads the clock every half second
        source.now += 0.5
        assert registry.alive("a")
    source.now += 20.0  # SIGSTOP'd for 20 s: no report could be read
    assert registry.alive("a") and not registry.lost("a")
    assert registry.silent_for("a") == pytest.approx(2.0)
    for _ in range(3):  # awake again and the node stays silent: dead after 3 s of running time
        source.now += 0.5
        registry.alive("a")
    assert not registry.alive("a")


def test_a_silent_node_still_dies_on_time_when_the_orchestrator_runs() -> None:
    source = FakeTime()
    registry = _registry(source)
    for _ in range(7):
        source.now += 0.5
        registry.alive_nodes()
    assert not registry.alive("a") and registry.lost("a")


@pytest.mark.slow
def test_pausing_the_orchestrator_records_no_lost_node(tmp_path: pytest.TempPathFactory) -> None:
    spec = MeshSpec(nodes=2, store=STORE, workdir=tmp_path, orchestrator_port=0, threads=1)  # type: ignore[arg-type]
    with LocalMesh(spec) as mesh:
        with mesh.client() as client:
            epoch = client.status().plan.epoch
        mesh.signal("orchestrator", signal.SIGSTOP)
        time.sleep(8)  # well past the 3 s dead time, short of gRPC's keepalive (10 s + 5 s)
        mesh.signal("orchestrator", signal.SIGCONT)
        time.sleep(4)  # a few control-loop ticks and report periods
        with mesh.client() as client:
            status = client.status()
            decisions = client.history(50)
        assert status.serving and status.plan.epoch == epoch, status.reason
        assert not [d.reason for d in decisions if d.kind == "node-lost"]
