"""Malformed requests and frames against a live node: never a crash, always a documented status code,
health stays SERVING and a generation running meanwhile keeps its exact tokens."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import sync_channel
from node_agent.forward_stream import ActivationReader, StreamError
from splitmesh import Client
from splitmesh.launcher import LocalMesh

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}

tensor_chunks = st.builds(pb.TensorChunk, dtype=st.sampled_from(["float32", "bfloat16", "int64", "", "float32\0"]),
                          shape=st.lists(st.integers(-3, 1 << 20), max_size=4), data=st.binary(max_size=4096),
                          chunk_index=st.integers(0, 3), chunk_count=st.integers(0, 3))
frames = st.builds(pb.ActivationFrame, step=st.integers(0, 1 << 40), seq=st.integers(0, 5),
                   position=st.integers(0, 1 << 20), tensor=tensor_chunks, header=st.binary(max_size=80),
                   ciphertext=st.binary(max_size=4096))
opens = st.builds(pb.ForwardOpen, session_id=st.text(max_size=40), epoch=st.integers(0, 1 << 40),
                  segment_index=st.integers(0, 8), key_envelope=st.binary(max_size=200))
forward_messages = st.one_of(st.builds(pb.ForwardRequest, open=opens), st.builds(pb.ForwardRequest, frame=frames),
                             st.builds(pb.ForwardRequest, rekey=st.builds(pb.ForwardRekey,
                                                                          key_envelope=st.binary(max_size=200))))
sampling = st.builds(pb.SamplingParams, temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
                     top_p=st.floats(-1, 2, width=32), top_k=st.integers(0, 1 << 31), seed=st.integers(0, 1 << 63))
generate_requests = st.one_of(
    st.builds(pb.GenerateRequest, prompt=st.text(max_size=30), max_new_tokens=st.sampled_from([0, 1, 2, 100_000]),
              sampling=sampling, stop=st.lists(st.text(max_size=300), max_size=20)),
    st.builds(pb.GenerateRequest, token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 1 << 31),
                                                                                max_size=5)),
              max_new_tokens=st.sampled_from([0, 1, 1 << 31]), sampling=sampling))


@pytest.fixture(scope="module")
def background(mesh: LocalMesh) -> dict[str, list[int]]:
    """A generation that runs while the fuzzing goes on; its tokens are checked at the end."""
    with Client(mesh.address) as client:
        client.resplit([0, 10, 20, 30], ["node-0", "node-1", "node-4"])
        expected = [e.token_id for e in client.generate("Tell me about the moon.", max_new_tokens=60,
                                                        ignore_eos=True)]
    return {"expected": expected}


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(streams=st.lists(st.lists(forward_messages, min_size=1, max_size=4), min_size=1, max_size=1))
def forward_fuzz(mesh: LocalMesh, streams: list[list[pb.ForwardRequest]]) -> None:
    """500 malformed Forward streams (run by the test below, while a real session is generating)."""
    with sync_channel(mesh.node_addresses["node-1"], mesh.client_tls) as channel:
        stub = pb_grpc.NodeStub(channel)
        for messages in streams:
            try:
                list(stub.Forward(iter(messages), timeout=10))
            except grpc.RpcError as exc:
                assert exc.code() in DOCUMENTED, (exc.code(), exc.details())


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=generate_requests)
def test_generate_fuzz(mesh: LocalMesh, request: pb.GenerateRequest) -> None:
    with sync_channel(mesh.node_addresses["node-0"], mesh.client_tls) as channel:
        try:
            list(pb_grpc.NodeStub(channel).Generate(request, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED, (exc.code(), exc.details())


@pytest.mark.slow
def test_node_survives_fuzzing_with_a_live_session(mesh: LocalMesh, background: dict[str, list[int]]) -> None:
    got: list[int] = []

    def generate() -> None:
        with Client(mesh.address) as client:
            got.extend(e.token_id for e in client.generate("Tell me about the moon.", max_new_tokens=60,
                                                           ignore_eos=True))

    worker = threading.Thread(target=generate)
    worker.start()
    forward_fuzz(mesh)
    worker.join(timeout=300)
    assert got == background["expected"]
    for node in ("node-0", "node-1", "node-4"):
        with sync_channel(mesh.node_addresses[node], mesh.client_tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=5).active_sessions == 0


def test_idle_upstream_is_cut_off() -> None:
    async def silent() -> object:
        await asyncio.sleep(10)
        yield pb.ForwardRequest()

    async def run() -> None:
        reader = ActivationReader(None, hidden_size=8, max_rows=4, idle_timeout_s=0.2)
        async for _ in reader.activations(silent()):  # type: ignore[arg-type]
            pass

    with pytest.raises(StreamError) as caught:
        asyncio.run(run())
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
