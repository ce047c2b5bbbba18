"""Behaviour of a live mesh: what nodes hold, bad requests, cancellation, seeded sampling, the async SDK."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from common.frame_crypto import public_key_from_bytes
from common.grpc_options import CHANNEL_OPTIONS
from common.hop_codec import SealedHopSender
from common.model_store import layer_role
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tensor_codec import encode_tensor
from splitmesh import AsyncClient, Client, SplitmeshError
from splitmesh.launcher import LocalMesh

pytestmark = pytest.mark.slow


def _install(mesh: LocalMesh, boundaries: list[int], placement: list[str]) -> pb.Plan:
    with Client(mesh.address) as client:
        reply = client.resplit(boundaries, placement)
    mesh.wait_serving(60, epoch_above=reply.plan.epoch - 1)
    return reply.plan


def _node(mesh: LocalMesh, node_id: str) -> tuple[grpc.Channel, pb_grpc.NodeStub]:
    channel = grpc.insecure_channel(mesh.node_addresses[node_id], options=CHANNEL_OPTIONS)
    return channel, pb_grpc.NodeStub(channel)


def test_a_node_holds_only_the_layers_of_its_segments(mesh: LocalMesh) -> None:
    _install(mesh, [0, 10, 20, 30], ["node-0", "node-1", "node-4"])
    channel, stub = _node(mesh, "node-1")
    with channel:
        info = stub.Info(pb.NodeInfoRequest(), timeout=10)
    assert list(info.loaded_layers) == [layer_role(i) for i in range(10, 20)]
    assert [(s.start, s.end) for s in info.hosted] == [(10, 20)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens must be in"),
    ({"prompt": "hi", "max_new_tokens": 100_000}, "max_new_tokens must be in"),
    ({"prompt": "hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "hi", "temperature": 0.5, "top_p": 1.5}, "top_p"),
    ({"prompt": [], "max_new_tokens": 4}, "messages is empty"),
    ({"prompt": [99_999_999], "max_new_tokens": 4}, "outside the vocabulary"),
    ({"prompt": [{"role": "wizard", "content": "x"}]}, "unknown message roles"),
    ({"prompt": "hi", "stop": [""]}, "stop takes"),
])
def test_bad_requests_get_invalid_argument(mesh: LocalMesh, kwargs: dict[str, object], message: str) -> None:
    prompt = kwargs.pop("prompt")
    kwargs.setdefault("max_new_tokens", 8)
    with Client(mesh.address) as client, pytest.raises(SplitmeshError) as caught:
        list(client.generate(prompt, **kwargs))  # type: ignore[arg-type]
    assert caught.value.code == "INVALID_ARGUMENT"
    assert message in caught.value.message


def test_unknown_sessions_and_bad_frames_get_precise_codes(mesh: LocalMesh) -> None:
    plan = _install(mesh, [0, 10, 20, 30], ["node-0", "node-1", "node-4"])
    channel, stub = _node(mesh, "node-1")
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Cancel(pb.CancelRequest(session_id="no-such-session"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        frame = pb.ForwardRequest(frame=pb.ActivationFrame(step=0, seq=0, tensor=encode_tensor(
            torch.zeros(1, 1, 576))[0]))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([frame]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # Activations are encrypted by default: a stream opened without a key envelope is refused outright.
        opening = pb.ForwardRequest(open=pb.ForwardOpen(session_id="s1", epoch=plan.epoch, segment_index=1))
        plain = pb.ForwardRequest(frame=pb.ActivationFrame(step=0, seq=0, tensor=encode_tensor(
            torch.zeros(1, 1, 576))[0]))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([opening, plain]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = public_key_from_bytes(next(n.x25519_public_key for n in plan.nodes if n.node_id == "node-1"))

        def sealed(session: str) -> tuple[pb.ForwardRequest, SealedHopSender]:
            sender = SealedHopSender(key, session, plan.epoch, 1)
            return pb.ForwardRequest(open=pb.ForwardOpen(session_id=session, epoch=plan.epoch, segment_index=1,
                                                         key_envelope=sender.key_envelope())), sender

        opening, sender = sealed("s1")  # authentic, but the wrong shape
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([opening, *sender.requests(0, 0, torch.zeros(1, 1, 100), 1 << 20)]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        opening, sender = sealed("s2")  # seq 0 never arrives
        skipped = [sender.requests(s, s, torch.zeros(1, 1, 576), 1 << 20)[0] for s in range(2)][1]
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([opening, skipped]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.ABORTED
        stale = pb.ForwardRequest(open=pb.ForwardOpen(session_id="s3", epoch=plan.epoch + 100, segment_index=1))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([stale]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        not_mine = pb.ForwardRequest(open=pb.ForwardOpen(session_id="s4", epoch=plan.epoch, segment_index=2))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Forward(iter([not_mine]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = stub.Info(pb.NodeInfoRequest(), timeout=10)
        assert info.active_sessions == 0  # every rejected stream released its session
    with Client(mesh.address) as client:  # and the mesh still serves
        assert len(list(client.generate("Hello", max_new_tokens=3, ignore_eos=True))) == 3
        assert client.status().serving


def test_seeded_sampling_is_reproducible_through_the_mesh(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        def run(seed: int) -> list[int]:
            return [e.token_id for e in client.generate("Once upon a time", max_new_tokens=16, temperature=0.9,
                                                        top_p=0.95, top_k=50, seed=seed, ignore_eos=True)]
        first = run(7)
        assert run(7) == first
        assert run(8) != first


def test_stop_strings_end_the_generation(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        full = "".join(e.text for e in client.generate([{"role": "user", "content": "Count from 1 to 10."}],
                                                       max_new_tokens=40))
        assert "5" in full
        events = list(client.generate([{"role": "user", "content": "Count from 1 to 10."}], max_new_tokens=40,
                                      stop=["5"]))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert "5" not in text and full.startswith(text)


def test_cancelled_stream_frees_sessions_on_every_node(mesh: LocalMesh) -> None:
    _install(mesh, [0, 10, 20, 30], ["node-0", "node-1", "node-4"])
    with Client(mesh.address) as client:
        stream = client.generate("Tell me a long story.", max_new_tokens=200, ignore_eos=True)
        next(stream)
        next(stream)
        stream.close()  # cancels the gRPC call
    for node_id in ("node-0", "node-1", "node-4"):
        channel, stub = _node(mesh, node_id)
        with channel:
            for _ in range(50):
                if stub.Info(pb.NodeInfoRequest(), timeout=10).active_sessions == 0:
                    break
                asyncio.run(asyncio.sleep(0.1))
            assert stub.Info(pb.NodeInfoRequest(), timeout=10).active_sessions == 0, node_id


def test_async_client_streams_the_same_tokens(mesh: LocalMesh) -> None:
    with Client(mesh.address) as client:
        sync_ids = [e.token_id for e in client.generate("The three primary colours are", max_new_tokens=10)]

    async def run() -> list[int]:
        async with AsyncClient(mesh.address) as client:
            return [e.token_id async for e in client.generate("The three primary colours are", max_new_tokens=10)]

    assert asyncio.run(run()) == sync_ids
