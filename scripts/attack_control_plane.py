"""Replays issue 14's control-plane attacks against live local meshes and prints the gRPC code each one got.

Two meshes: one with mutual TLS (an untrusted node's and a client's certificate against Admin) and one in
plaintext (implausible node reports, then a kill -9 of a plan node; out-of-range policy values). The last
line is JSON (attack -> code), so two checkouts can be compared:
``PYTHONPATH=$PWD .venv/bin/python scripts/attack_control_plane.py``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc

from common.certs import Identity
from common.model_import import ensure_embedded
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import TlsConfig
from common.transport import sync_channel
from splitmesh.launcher import LocalMesh, MeshSpec

STORE = Path("~/.cache/splitmesh/store").expanduser()


def code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


def set_policy(admin: pb_grpc.AdminStub, values: dict[str, str]) -> Callable[[], object]:
    if hasattr(pb, "SetPolicyRequest"):
        return lambda: admin.SetPolicy(pb.SetPolicyRequest(set=values), timeout=30)
    legacy = getattr(pb, "PolicyRequest")  # noqa: B009 - the checkout before GetPolicy/SetPolicy existed
    return lambda: admin.Policy(legacy(set=values), timeout=30)  # type: ignore[attr-defined]


def tls_attacks(root: Path, results: dict[str, str]) -> None:
    spec = MeshSpec(nodes=2, store=STORE, workdir=root / "tls", orchestrator_port=0, trusted=("node-0",),
                    boundaries=(0, 2, 28, 30), placement=("node-0", "node-1", "node-0"), tls=True)
    with LocalMesh(spec) as mesh:
        for name in ("node-1", "client"):
            channel = sync_channel(mesh.address, TlsConfig.from_dir(mesh.tls_dir, name),
                                   Identity("orchestrator", "orchestrator"))
            with channel:
                admin = pb_grpc.AdminStub(channel)
                results[f"{name} cert: Drain node-0 --undo"] = code(
                    partial(admin.Drain, pb.DrainRequest(node_id="node-0", undo=True), timeout=30))
                results[f"{name} cert: policy set privacy_hard=false"] = code(
                    set_policy(admin, {"privacy_hard": "false"}))
                results[f"{name} cert: Resplit [0,1,29,30] layers 1-29 on node-1"] = code(
                    partial(admin.Resplit, pb.ResplitRequest(boundaries=[0, 1, 29, 30],
                                                             placement=["node-0", "node-1", "node-0"]), timeout=60))
                results[f"{name} cert: Status"] = code(partial(admin.Status, pb.StatusRequest(), timeout=10))


def reports(node_id: str, capacity: pb.Capacity, count: int, every_s: float) -> Iterator[pb.NodeReport]:
    for _ in range(count):
        yield pb.NodeReport(node_id=node_id, capacity=capacity)
        time.sleep(every_s)


def plain_attacks(root: Path, results: dict[str, str]) -> None:
    spec = MeshSpec(nodes=3, store=STORE, workdir=root / "plain", orchestrator_port=0, trusted=("node-0",),
                    boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"))
    good = pb.Capacity(cpu_utilisation=0.1, memory_total_bytes=8 << 30, memory_available_bytes=4 << 30)
    with LocalMesh(spec) as mesh, grpc.insecure_channel(mesh.address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        admin = pb_grpc.AdminStub(channel)
        register = pb.RegisterRequest(node_id="node-9", address="127.0.0.1:9", capacity=good)
        results["Register with cpu_utilisation=NaN"] = code(lambda: stub.Register(pb.RegisterRequest(
            node_id="node-9", address="127.0.0.1:9", capacity=pb.Capacity(cpu_utilisation=math.nan)), timeout=10))
        stub.Register(register, timeout=10)
        bad = pb.Capacity(cpu_utilisation=0.1, memory_total_bytes=8 << 30, layer_decode_ms=-4.0)
        results["Report layer_decode_ms=-4"] = code(lambda: stub.Report(reports("node-9", bad, 1, 0), timeout=30))
        stub.Register(register, timeout=10)
        nan = pb.Capacity(cpu_utilisation=0.1, memory_total_bytes=8 << 30, layer_decode_ms=math.nan)
        ended: list[str] = []
        liar = threading.Thread(target=lambda: ended.append(code(lambda: stub.Report(reports("node-9", nan, 16, 0.5),
                                                                                     timeout=60))))
        liar.start()
        time.sleep(1.0)
        epoch = mesh.wait_serving().plan.epoch
        mesh.signal("node-1", signal.SIGKILL)
        deadline = time.monotonic() + 60
        replanned = "not re-planned in 60 s"
        while time.monotonic() < deadline:
            status = mesh.status()
            if status is not None and status.serving and status.plan.epoch > epoch:
                replanned = f"re-planned to epoch {status.plan.epoch}"
                break
            time.sleep(0.2)
        liar.join()
        results["Report layer_decode_ms=NaN (stream)"] = ended[0]
        results["kill -9 of a plan node afterwards"] = replanned
        for what, value in (("interval_s", "1e-6"), ("latency_max_ms", "nan"), ("hysteresis", "5"),
                            ("utilisation_max", "-1")):
            results[f"policy set {what}={value}"] = code(set_policy(admin, {what: value}))


def main() -> int:
    ensure_embedded(ModelStore(STORE))
    results: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="splitmesh-attack-") as tmp:
        tls_attacks(Path(tmp), results)
        plain_attacks(Path(tmp), results)
    width = max(map(len, results))
    for attack, outcome in results.items():
        print(f"{attack:<{width}}  {outcome}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
