"""1,000 hypothesis-generated malformed requests per RPC of the Orchestrator, Admin and ModelFiles services
against one live orchestrator: only each RPC's documented codes come back, and the process stays up, healthy
and answering.

Requests are sent as bytes, so besides well-typed nonsense (NaN figures, unknown nodes, bad boundaries, policy
values out of range) an RPC also gets the serialized bytes of other messages that parse as its request type
(fields it does not know, type confusion). Bytes that do not parse at all are the request-decoding
interceptor's to refuse and are not generated here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from orchestrator.policy import Policy
from splitmesh.launcher import LocalMesh, MeshSpec

EXAMPLES = 1000
C = grpc.StatusCode
# Each RPC's documented outcomes for a request from a caller the authorization table admits (plaintext here).
DOCUMENTED: dict[str, set[grpc.StatusCode]] = {
    "/splitmesh.v1.Orchestrator/Register": {C.OK, C.INVALID_ARGUMENT},
    "/splitmesh.v1.Orchestrator/Report": {C.OK, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION},
    "/splitmesh.v1.Orchestrator/GetPlan": {C.OK, C.UNAVAILABLE},
    "/splitmesh.v1.Orchestrator/WeightKeys": {C.OK, C.FAILED_PRECONDITION, C.PERMISSION_DENIED},
    "/splitmesh.v1.Admin/Status": {C.OK},
    "/splitmesh.v1.Admin/History": {C.OK},
    "/splitmesh.v1.Admin/GetPolicy": {C.OK},
    "/splitmesh.v1.Admin/Resplit": {C.OK, C.INVALID_ARGUMENT, C.ABORTED},
    "/splitmesh.v1.Admin/Drain": {C.OK, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED},
    "/splitmesh.v1.Admin/SetPolicy": {C.OK, C.INVALID_ARGUMENT},
    "/splitmesh.v1.ModelFiles/GetManifest": {C.OK, C.NOT_FOUND},
    "/splitmesh.v1.ModelFiles/FetchBlob": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND},
}

ids = st.one_of(st.sampled_from(["node-0", "node-1", "fz-2", "", "Node_0", "a" * 70]), st.text(max_size=20))
numbers = st.floats(allow_nan=True, allow_infinity=True)
counts = st.integers(0, (1 << 64) - 1)
capacities = st.builds(
    pb.Capacity, cpu_utilisation=numbers, memory_total_bytes=counts, memory_available_bytes=counts,
    gpus=st.lists(st.builds(pb.GpuStatus, index=st.integers(0, 1 << 31), utilisation=numbers,
                            memory_total_bytes=counts, memory_used_bytes=counts), max_size=2),
    cpu_count=st.integers(0, (1 << 32) - 1), layer_decode_ms=numbers, layer_prefill_ms_per_token=numbers,
    layer_decode_row_ms=numbers, decode_rows_mean=numbers)
links = st.builds(pb.LinkStatus, peer_id=ids, bandwidth_bps=numbers, rtt_ms=numbers)
# Addresses that a plan could be sent to are closed loopback ports, so an install fails in milliseconds.
registrations = st.builds(pb.RegisterRequest, node_id=ids,
                          address=st.sampled_from(["127.0.0.1:9", "[::1]:9", "", "x" * 600]),
                          capacity=capacities, x25519_public_key=st.binary(max_size=40),
                          model_digests=st.lists(st.text(max_size=70), max_size=3), plan_epoch=counts)
reports = st.builds(pb.NodeReport, node_id=ids, capacity=capacities, links=st.lists(links, max_size=3),
                    token_latency_ms=numbers, tokens=st.integers(0, (1 << 32) - 1),
                    active_sessions=st.integers(0, (1 << 32) - 1), plan_epoch=counts)
policy_keys = st.one_of(st.sampled_from(sorted(Policy.model_fields)), st.text(max_size=12))
policy_values = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-6", "5", "1e308", "true", "",
                                           "0,1,2", "plan", "all"]), st.text(max_size=12), numbers.map(str))
TYPED: dict[str, st.SearchStrategy[Message]] = {
    "/splitmesh.v1.Orchestrator/Register": registrations,
    "/splitmesh.v1.Orchestrator/GetPlan": st.just(pb.GetPlanRequest()),
    "/splitmesh.v1.Orchestrator/WeightKeys": st.builds(pb.WeightKeysRequest, epoch=counts | st.integers(0, 8),
                                                       node_id=ids),
    "/splitmesh.v1.Admin/Status": st.just(pb.StatusRequest()),
    "/splitmesh.v1.Admin/History": st.builds(pb.HistoryRequest, limit=st.integers(0, (1 << 32) - 1)),
    "/splitmesh.v1.Admin/GetPolicy": st.just(pb.GetPolicyRequest()),
    "/splitmesh.v1.Admin/Resplit": st.builds(
        pb.ResplitRequest, boundaries=st.one_of(st.lists(st.integers(0, (1 << 32) - 1), max_size=6),
                                                st.sampled_from([[0, 30], [0, 10, 30], [0, 1, 29, 30], [30, 0]])),
        placement=st.one_of(st.lists(ids, max_size=5), st.lists(st.sampled_from(["node-0", "node-1"]), max_size=3)),
        dry_run=st.booleans()),
    "/splitmesh.v1.Admin/Drain": st.builds(pb.DrainRequest, node_id=ids, undo=st.booleans()),
    "/splitmesh.v1.Admin/SetPolicy": st.builds(pb.SetPolicyRequest, set=st.dictionaries(policy_keys, policy_values,
                                                                                         max_size=4)),
    "/splitmesh.v1.ModelFiles/GetManifest": st.builds(pb.ManifestRequest, model_digest=st.text(max_size=70)),
    "/splitmesh.v1.ModelFiles/FetchBlob": st.builds(pb.BlobRequest, sha256=st.one_of(
        st.text(max_size=70), st.text("0123456789abcdef", min_size=64, max_size=64))),
}
REQUEST_TYPES: dict[str, type[Message]] = {
    "/splitmesh.v1.Orchestrator/Register": pb.RegisterRequest, "/splitmesh.v1.Orchestrator/Report": pb.NodeReport,
    "/splitmesh.v1.Orchestrator/GetPlan": pb.GetPlanRequest, "/splitmesh.v1.Admin/Status": pb.StatusRequest,
    "/splitmesh.v1.Orchestrator/WeightKeys": pb.WeightKeysRequest,
    "/splitmesh.v1.Admin/History": pb.HistoryRequest, "/splitmesh.v1.Admin/GetPolicy": pb.GetPolicyRequest,
    "/splitmesh.v1.Admin/Resplit": pb.ResplitRequest, "/splitmesh.v1.Admin/Drain": pb.DrainRequest,
    "/splitmesh.v1.Admin/SetPolicy": pb.SetPolicyRequest, "/splitmesh.v1.ModelFiles/GetManifest": pb.ManifestRequest,
    "/splitmesh.v1.ModelFiles/FetchBlob": pb.BlobRequest,
}
any_message = st.one_of(registrations, reports, *(s for s in TYPED.values()))


def _parses(kind: type[Message]) -> Callable[[bytes], bool]:
    def check(raw: bytes) -> bool:
        try:
            kind.FromString(raw)
        except DecodeError:
            return False
        return True
    return check


def request_bytes(method: str) -> st.SearchStrategy[bytes]:
    """The method's own request type with nonsense in it, or another message's bytes that parse as it."""
    own = reports if method.endswith("/Report") else TYPED[method]
    confused = any_message.map(lambda m: m.SerializeToString()).filter(_parses(REQUEST_TYPES[method]))
    return st.one_of(own.map(lambda m: m.SerializeToString()), confused)


def _pretend_nodes(address: str, stop: threading.Event) -> None:
    """node-0 (trusted) and node-1 registered and reporting, at closed ports: plans can be chosen, installs fail."""
    good = pb.Capacity(cpu_utilisation=0.1, memory_total_bytes=64 << 30, memory_available_bytes=32 << 30)

    def reports(node_id: str) -> Iterator[pb.NodeReport]:
        while not stop.is_set():
            yield pb.NodeReport(node_id=node_id, capacity=good)
            time.sleep(0.5)

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        while not stop.is_set():  # a fuzzed report about these ids ends their stream: register and report again
            streams = []
            for node_id in ("node-0", "node-1"):
                stub.Register(pb.RegisterRequest(node_id=node_id, address="127.0.0.1:9", capacity=good), timeout=10)
                streams.append(stub.Report.future(reports(node_id), timeout=3600))
            while not stop.is_set() and not any(f.done() for f in streams):
                time.sleep(0.2)
            for future in streams:
                future.cancel()


@pytest.fixture(scope="module")
def lone(store: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """One orchestrator process; its only nodes are pretend ones at closed ports (an install fails at once)."""
    workdir: Path = tmp_path_factory.mktemp("fuzz-orchestrator")
    mesh = LocalMesh(MeshSpec(nodes=0, store=store.root, workdir=workdir, orchestrator_port=0))
    mesh.start_orchestrator()
    deadline = time.monotonic() + 60
    while mesh.status() is None:
        assert time.monotonic() < deadline, f"orchestrator did not start; see {workdir}"
        time.sleep(0.2)
    stop = threading.Event()
    pretend = threading.Thread(target=_pretend_nodes, args=(mesh.address, stop), daemon=True)
    pretend.start()
    yield mesh
    stop.set()
    pretend.join(timeout=10)
    mesh.stop()


def _outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _fuzz(channel: grpc.Channel, method: str) -> None:
    documented = DOCUMENTED[method]
    streaming = method.endswith("/Report") or method.endswith("/FetchBlob")
    if method.endswith("/Report"):
        send = channel.stream_unary(method)

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(stream=st.lists(request_bytes(method), min_size=1, max_size=3))
        def run_stream(stream: list[bytes]) -> None:
            code, details = _outcome(lambda: send(iter(stream), timeout=30))
            assert code in documented, (method, code, details)
        run_stream()
        return
    if streaming:
        call = channel.unary_stream(method)

        def invoke(raw: bytes) -> object:
            return list(call(raw, timeout=30))
    else:
        unary = channel.unary_unary(method)

        def invoke(raw: bytes) -> object:
            return unary(raw, timeout=60)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw=request_bytes(method))
    def run(raw: bytes) -> None:
        code, details = _outcome(lambda: invoke(raw))
        assert code in documented, (method, code, details)
    run()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(DOCUMENTED))
def test_malformed_requests_get_documented_codes(lone: LocalMesh, method: str) -> None:
    with grpc.insecure_channel(lone.address) as channel:
        admin = pb_grpc.AdminStub(channel)
        for node_id in ("node-0", "node-1"):  # what an earlier RPC's fuzzing drained serves the next one again
            _outcome(lambda: admin.Drain(pb.DrainRequest(node_id=node_id, undo=True), timeout=10))  # noqa: B023
        _fuzz(channel, method)
        assert lone.processes["orchestrator"].poll() is None
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert lone.status() is not None


def test_every_orchestrator_side_rpc_has_a_fuzzer() -> None:
    services = [pb.DESCRIPTOR.services_by_name[name] for name in ("Orchestrator", "Admin", "ModelFiles")]
    rpcs = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert rpcs == set(DOCUMENTED) == set(REQUEST_TYPES)
    assert rpcs - {"/splitmesh.v1.Orchestrator/Report"} == set(TYPED)
