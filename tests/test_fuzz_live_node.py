"""Malformed requests and frames against a live node: never a crash, always a documented status code,
health stays SERVING and a generation running meanwhile keeps its exact tokens.

Every RPC of the Node service gets 1,000 generated requests (streams for Forward, Deliver and Rows): well-typed
messages with hostile values, and raw bytes that may not even parse (those must be INVALID_ARGUMENT, never UNKNOWN).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.hop_codec import PlainHopReceiver
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
token_opens = st.builds(pb.TokenOpen, session_id=st.text(max_size=40),
                        epoch=st.integers(0, 1 << 40) | st.integers(0, 4), key_envelope=st.binary(max_size=200))
token_frames = st.builds(pb.TokenFrame, step=st.integers(0, 1 << 40), seq=st.integers(0, 5),
                         token_id=st.integers(0, (1 << 32) - 1), header=st.binary(max_size=80),
                         ciphertext=st.binary(max_size=64), compute_s=st.floats(allow_nan=True, allow_infinity=True))
deliver_messages = st.one_of(st.builds(pb.DeliverRequest, open=token_opens),
                             st.builds(pb.DeliverRequest, token=token_frames))
activation_rows = st.builds(pb.ActivationRow, session_id=st.text(max_size=40), epoch=st.integers(0, 1 << 40),
                            segment_index=st.integers(0, 8), messages=st.lists(forward_messages, max_size=3))
token_rows = st.builds(pb.TokenRow, session_id=st.text(max_size=40), epoch=st.integers(0, 1 << 40),
                       token=token_frames)
row_batches = st.builds(pb.RowBatch, activations=st.lists(activation_rows, max_size=4),
                        tokens=st.lists(token_rows, max_size=4))
sampling = st.builds(pb.SamplingParams, temperature=st.floats(allow_nan=True, allow_infinity=True, width=32),
                     top_p=st.floats(-1, 2, width=32), top_k=st.integers(0, 1 << 31), seed=st.integers(0, 1 << 63))
chat = st.builds(pb.ChatMessages, messages=st.lists(st.builds(
    pb.ChatMessage, role=st.sampled_from(["user", "system", "assistant", "wizard", ""]), content=st.text(max_size=40)),
    max_size=4))
generate_requests = st.one_of(
    st.builds(pb.GenerateRequest, prompt=st.text(max_size=30), max_new_tokens=st.sampled_from([0, 1, 2, 100_000]),
              sampling=sampling, stop=st.lists(st.text(max_size=300), max_size=20)),
    st.builds(pb.GenerateRequest, messages=chat, max_new_tokens=st.sampled_from([0, 1, 2]), sampling=sampling),
    st.builds(pb.GenerateRequest, token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 1 << 31),
                                                                                max_size=5)),
              max_new_tokens=st.sampled_from([0, 1, 1 << 31]), sampling=sampling))
epochs = st.integers(0, (1 << 64) - 1) | st.integers(0, 8)
signed_plans = st.builds(pb.SignedPlan, plan_bytes=st.binary(max_size=300) | st.builds(
    pb.Plan, kind=st.sampled_from(["splitmesh.plan/1", "x"]), epoch=epochs, model_digest=st.text(max_size=70),
    num_layers=st.integers(0, 64)).map(lambda plan: plan.SerializeToString()),
    signature=st.binary(max_size=80), key_id=st.text(max_size=20))
prepares = st.builds(pb.PrepareRequest, plan=signed_plans, weight_keys=st.binary(max_size=200))
# Requests per unary RPC: typed messages with hostile values, or raw bytes (sent without a serializer).
UNARY: dict[str, st.SearchStrategy[object]] = {
    "Cancel": st.builds(pb.CancelRequest, session_id=st.text(max_size=64)),
    "Prepare": prepares,
    "Commit": st.builds(pb.CommitRequest, epoch=epochs),
    "Abort": st.builds(pb.CommitRequest, epoch=epochs),
    "Info": st.binary(max_size=300),  # the request has no fields: raw bytes, parsed or not, are its variety
    "Probe": st.builds(pb.ProbeRequest, payload=st.binary(max_size=1 << 16)),
}
RPCS = ("Generate", "Cancel", "Forward", "Deliver", "Rows", "Prepare", "Commit", "Abort", "Info", "Probe")
STREAMING_REQUESTS = {"Forward", "Deliver", "Rows"}
STREAM_UNARY = {"Deliver", "Rows"}
STREAMING_REPLIES = {"Generate", "Forward"}


@pytest.fixture(scope="module")
def background(mesh: LocalMesh) -> dict[str, list[int]]:
    """A generation that runs while the fuzzing goes on; its tokens are checked at the end."""
    with Client(mesh.address) as client:
        client.resplit([0, 10, 20, 30], ["node-0", "node-1", "node-4"])
        expected = [e.token_id for e in client.generate("Tell me about the moon.", max_new_tokens=60,
                                                        ignore_eos=True)]
    return {"expected": expected}


FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))


def _send_streams(mesh: LocalMesh, node: str, method: str, streams: list[list[Any]]) -> None:
    """Each stream of messages to ``method`` of ``node``: never a crash, always a documented status."""
    with sync_channel(mesh.node_addresses[node], mesh.client_tls) as channel:
        call = getattr(pb_grpc.NodeStub(channel), method)
        for messages in streams:
            try:
                reply = call(iter(messages), timeout=10)
                if method in STREAMING_REPLIES:
                    list(reply)
            except grpc.RpcError as exc:
                assert exc.code() in DOCUMENTED, (method, exc.code(), exc.details())


@FUZZ
@given(streams=st.lists(st.lists(forward_messages, min_size=1, max_size=4), min_size=1, max_size=1))
def forward_fuzz(mesh: LocalMesh, streams: list[list[pb.ForwardRequest]]) -> None:
    """1,000 malformed Forward streams (run by the test below, while a real session is generating)."""
    _send_streams(mesh, "node-1", "Forward", streams)


@FUZZ
@given(streams=st.lists(st.lists(deliver_messages, min_size=1, max_size=4), min_size=1, max_size=1))
def deliver_fuzz(mesh: LocalMesh, streams: list[list[pb.DeliverRequest]]) -> None:
    """1,000 malformed token streams to the head, which runs the real session meanwhile."""
    _send_streams(mesh, "node-0", "Deliver", streams)


@FUZZ
@given(streams=st.lists(st.lists(row_batches, min_size=1, max_size=3), min_size=1, max_size=1))
def rows_fuzz(mesh: LocalMesh, streams: list[list[pb.RowBatch]]) -> None:
    """1,000 malformed row streams to the middle node, which runs the real session meanwhile."""
    _send_streams(mesh, "node-1", "Rows", streams)


@FUZZ
@given(request=generate_requests)
def generate_fuzz(mesh: LocalMesh, request: pb.GenerateRequest) -> None:
    with sync_channel(mesh.node_addresses["node-0"], mesh.client_tls) as channel:
        try:
            list(pb_grpc.NodeStub(channel).Generate(request, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED, (exc.code(), exc.details())


def unary_fuzz(method: str) -> Callable[[LocalMesh], None]:
    """1,000 typed requests with hostile values for one unary RPC, sent to the head (which hosts segment 0)."""
    @FUZZ
    @given(request=UNARY[method])
    def fuzz(mesh: LocalMesh, request: object) -> None:
        with sync_channel(mesh.node_addresses["node-0"], mesh.client_tls) as channel:
            try:
                if isinstance(request, bytes):
                    channel.unary_unary(f"/splitmesh.v1.Node/{method}")(request, timeout=30)
                else:
                    getattr(pb_grpc.NodeStub(channel), method)(request, timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() in DOCUMENTED, (method, exc.code(), exc.details())
    return fuzz


@FUZZ
@given(method=st.sampled_from(RPCS), messages=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def raw_fuzz(mesh: LocalMesh, method: str, messages: list[bytes]) -> None:
    """Raw bytes to every RPC (8 x ~125 draws on top of the typed ones): bytes that do not parse are
    INVALID_ARGUMENT, never UNKNOWN; bytes that happen to parse get the typed request's codes."""
    path = f"/splitmesh.v1.Node/{method}"
    with sync_channel(mesh.node_addresses["node-1"], mesh.client_tls) as channel:
        try:
            if method in STREAM_UNARY:
                channel.stream_unary(path)(iter(messages), timeout=30)
            elif method in STREAMING_REQUESTS:
                list(channel.stream_stream(path)(iter(messages), timeout=30))
            elif method in STREAMING_REPLIES:
                list(channel.unary_stream(path)(messages[0], timeout=30))
            else:
                channel.unary_unary(path)(messages[0], timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in DOCUMENTED, (method, exc.code(), exc.details())


def test_every_node_rpc_is_fuzzed() -> None:
    assert set(RPCS) == set(pb.DESCRIPTOR.services_by_name["Node"].methods_by_name)
    assert set(RPCS) == {"Generate", "Forward", "Deliver", "Rows", *UNARY}


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
    deliver_fuzz(mesh)
    rows_fuzz(mesh)
    generate_fuzz(mesh)
    for method in UNARY:
        unary_fuzz(method)(mesh)
    raw_fuzz(mesh)
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
        reader = ActivationReader(PlainHopReceiver(), hidden_size=8, max_rows=4, idle_timeout_s=0.2)
        async for _ in reader.activations(silent()):  # type: ignore[arg-type]
            pass

    with pytest.raises(StreamError) as caught:
        asyncio.run(run())
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
