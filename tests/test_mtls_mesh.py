"""Encrypted activation streams and mutual TLS: the frame codec in-process, then a live mTLS mesh.

The live mesh rekeys every 3 frames, so its token checks also cover rekeying across a generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent import futures
from functools import partial
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common import certs
from common.certs import Identity
from common.chat import chat_token_ids
from common.frame_crypto import FrameCryptoError, public_key_from_bytes
from common.hop_codec import PlainHopReceiver, SealedHopReceiver, SealedHopSender
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tensor_codec import encode_tensor
from common.tls import TlsConfig
from common.transport import TransportError, bind, resolve_tls, sync_channel
from node_agent.forward_stream import ActivationReader, StreamError, crypto_status
from splitmesh import Client, SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

HIDDEN = 576
SESSION = "0f8e2a64c3b54c1f9d6f2b7a1e3c5d70"


# ------------------------------------------------------------------ frame codec, in-process
def _read(receiver: SealedHopReceiver | None, requests: Sequence[pb.ForwardRequest],
          max_rows: int = 64) -> tuple[list[tuple[int, int, torch.Tensor]], grpc.StatusCode | None]:
    """Everything an ActivationReader yields for ``requests``, and the status it ended with (None = OK)."""
    async def source() -> AsyncIterator[pb.ForwardRequest]:
        for request in requests:
            yield request

    async def run() -> tuple[list[tuple[int, int, torch.Tensor]], grpc.StatusCode | None]:
        got: list[tuple[int, int, torch.Tensor]] = []
        try:
            async for item in ActivationReader(receiver or PlainHopReceiver(), HIDDEN, max_rows).activations(source()):
                got.append(item)
        except StreamError as exc:
            return got, exc.code
        return got, None

    return asyncio.run(run())


Hop = tuple[X25519PrivateKey, SealedHopSender, bytes]


@pytest.fixture
def hop() -> Hop:
    """The receiver's key, a sender that rekeys every 3 frames, and its first key envelope."""
    key = X25519PrivateKey.generate()
    sender = SealedHopSender(key.public_key(), SESSION, epoch=7, hop=1, rekey_after=3)
    return key, sender, sender.key_envelope()


def _receiver(key: X25519PrivateKey, envelope: bytes, epoch: int = 7) -> SealedHopReceiver:
    return SealedHopReceiver(key, envelope, SESSION, epoch, 1)


def test_sealed_frames_round_trip_across_chunks_and_rekeys(hop: Hop) -> None:
    key, sender, envelope = hop
    tensors = [torch.randn(1, 5, HIDDEN), torch.randn(1, 1, HIDDEN), torch.randn(1, 1, HIDDEN)]
    requests = []
    for step, tensor in enumerate(tensors):
        requests += sender.requests(step, 4 + step if step else 0, tensor, chunk_bytes=4000)  # 3 chunks for prefill
    assert sum(r.WhichOneof("msg") == "rekey" for r in requests) == 1  # 5 frames, a new key after the 3rd
    for request in requests:
        if request.WhichOneof("msg") == "frame":
            frame = request.frame
            assert not frame.HasField("tensor") and frame.step == frame.seq == frame.position == 0
            assert tensors[0].numpy().tobytes()[:64] not in frame.ciphertext
    got, status = _read(_receiver(key, envelope), requests)
    assert status is None
    assert [(s, p) for s, p, _ in got] == [(0, 0), (1, 5), (2, 6)]
    for (_, _, tensor), sent in zip(got, tensors, strict=True):
        assert torch.equal(tensor, sent)


def _flip(request: pb.ForwardRequest, field: str, index: int) -> pb.ForwardRequest:
    tampered = pb.ForwardRequest()
    tampered.CopyFrom(request)
    data = bytearray(getattr(tampered.frame, field))
    data[index] ^= 0x01
    setattr(tampered.frame, field, bytes(data))
    return tampered


def test_tampered_replayed_and_skipped_frames_get_precise_codes(hop: Hop) -> None:
    key, sender, envelope = hop
    f0, f1 = (sender.requests(s, s, torch.ones(1, 1, HIDDEN), 1 << 20)[0] for s in range(2))
    cases: dict[str, tuple[list[pb.ForwardRequest], grpc.StatusCode]] = {
        "header bit": ([_flip(f0, "header", 30)], grpc.StatusCode.UNAUTHENTICATED),
        "ciphertext bit": ([_flip(f0, "ciphertext", 100)], grpc.StatusCode.UNAUTHENTICATED),
        "tag bit": ([_flip(f0, "ciphertext", -1)], grpc.StatusCode.UNAUTHENTICATED),
        "replay": ([f0, f0], grpc.StatusCode.ABORTED),
        "skip": ([f1], grpc.StatusCode.ABORTED),
        "plaintext frame": ([pb.ForwardRequest(frame=pb.ActivationFrame(
            tensor=encode_tensor(torch.ones(1, 1, HIDDEN))[0]))], grpc.StatusCode.UNAUTHENTICATED),
        "clear step beside the header": ([_with_step(f0)], grpc.StatusCode.INVALID_ARGUMENT),
        "old key envelope as rekey": ([pb.ForwardRequest(rekey=pb.ForwardRekey(key_envelope=envelope))],
                                      grpc.StatusCode.ABORTED),
        "garbage rekey": ([pb.ForwardRequest(rekey=pb.ForwardRekey(key_envelope=b"x" * 10))],
                          grpc.StatusCode.UNAUTHENTICATED),
    }
    for name, (requests, code) in cases.items():
        got, status = _read(_receiver(key, envelope), requests)
        assert status == code, name
        assert len(got) == (1 if name == "replay" else 0), name


def _with_step(request: pb.ForwardRequest) -> pb.ForwardRequest:
    out = pb.ForwardRequest()
    out.CopyFrom(request)
    out.frame.step = 1
    return out


@pytest.mark.parametrize(("tensor", "what"), [
    (torch.ones(1, 1, 100), "wrong hidden size"),
    (torch.ones(2, 1, HIDDEN), "batch of two"),
    (torch.full((1, 1, HIDDEN), float("nan")), "non-finite"),
    (torch.ones(1, 65, HIDDEN), "too many rows"),
    (torch.ones(1, 1, HIDDEN, dtype=torch.float64), "dtype not on the allow-list"),
])
def test_authentic_but_bad_tensors_are_invalid_argument(tensor: torch.Tensor, what: str) -> None:
    key = X25519PrivateKey.generate()
    sender = SealedHopSender(key.public_key(), SESSION, 7, 1)
    if tensor.dtype == torch.float64:  # encode_tensor refuses it: seal the raw bytes the way a hostile peer could
        sealer = sender._sealer
        header, ciphertext = sealer.seal(step=0, dtype="int64", shape=(1, 1, HIDDEN),
                                         plaintext=b"\0" * (4 + 8 * HIDDEN))
        requests = [pb.ForwardRequest(frame=pb.ActivationFrame(header=header, ciphertext=ciphertext))]
    else:
        requests = sender.requests(0, 0, tensor, 1 << 20)
    _, status = _read(_receiver(key, sender.key_envelope()), requests)
    assert status == grpc.StatusCode.INVALID_ARGUMENT, what


@pytest.mark.parametrize(("receiver_epoch", "code"), [(6, "UNAVAILABLE"), (8, "FAILED_PRECONDITION")])
def test_envelope_of_another_epoch(receiver_epoch: int, code: str) -> None:
    key = X25519PrivateKey.generate()
    sender = SealedHopSender(key.public_key(), SESSION, 7, 1)
    with pytest.raises(FrameCryptoError) as caught:
        _receiver(key, sender.key_envelope(), epoch=receiver_epoch)
    assert crypto_status(caught.value).code == getattr(grpc.StatusCode, code)
    with pytest.raises(FrameCryptoError) as caught:  # a key that is not ours
        _receiver(X25519PrivateKey.generate(), sender.key_envelope())
    assert crypto_status(caught.value).code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_stream_still_checks_seq_and_shape() -> None:
    def frame(seq: int, tensor: torch.Tensor) -> pb.ForwardRequest:
        return pb.ForwardRequest(frame=pb.ActivationFrame(step=0, seq=seq, tensor=encode_tensor(tensor)[0]))

    assert _read(None, [frame(0, torch.ones(1, 2, HIDDEN))])[1] is None
    assert _read(None, [frame(1, torch.ones(1, 2, HIDDEN))])[1] == grpc.StatusCode.ABORTED
    assert _read(None, [frame(0, torch.ones(1, 2, 7))])[1] == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------ transport settings
def test_plaintext_is_refused_off_loopback_unless_insecure(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        with pytest.raises(TransportError, match="not loopback"):
            bind(server, "0.0.0.0:0", None)
        assert bind(server, "127.0.0.1:0", None) > 0
        assert bind(server, "0.0.0.0:0", None, insecure=True) > 0
    finally:
        server.stop(None)


def test_tls_settings_resolve_from_a_folder_or_paths(tmp_path: Path) -> None:
    assert resolve_tls("", "node-1") is None
    with pytest.raises(TransportError, match="not found"):
        resolve_tls(str(tmp_path), "node-1")
    certs.init_ca(tmp_path)
    certs.issue(tmp_path, "node-1")
    assert resolve_tls(str(tmp_path), "node-1") == TlsConfig.from_dir(tmp_path, "node-1")
    with pytest.raises(TransportError, match="all three"):
        resolve_tls("", "node-1", ca=str(tmp_path / "ca.crt"))


# ------------------------------------------------------------------ a live mesh with mutual TLS
@pytest.fixture(scope="module")
def tls_mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Three nodes, one segment each, every channel mTLS; hop keys are replaced every 3 frames."""
    spec = MeshSpec(nodes=3, store=store.root, workdir=tmp_path_factory.mktemp("tls-mesh"), orchestrator_port=0,
                    trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-2"),
                    tls=True, extra_env={"SPLITMESH_REKEY_AFTER_FRAMES": "3"})
    with LocalMesh(spec) as mesh:
        yield mesh


def _as(mesh: LocalMesh, name: str, peer: Identity, address: str) -> grpc.Channel:
    """A channel to ``address`` presenting the mesh-issued certificate ``name``."""
    return sync_channel(address, TlsConfig.from_dir(mesh.tls_dir, name), peer)


def _code(call: Callable[[], object]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


PROMPT = [{"role": "user", "content": "Name three rivers in Europe."}]
MAX_NEW = 40


@pytest.mark.slow
def test_tls_mesh_tokens_equal_single_process(tls_mesh: LocalMesh, reference: PreTrainedModel,
                                              tokenizer: PreTrainedTokenizerBase) -> None:
    expected = reference_greedy(reference, chat_token_ids(tokenizer, PROMPT), MAX_NEW)
    with tls_mesh.client() as client:
        assert client.status().serving
        assert all(len(n.x25519_public_key) == 32 for n in client.plan().nodes)
        assert [e.token_id for e in client.generate(PROMPT, max_new_tokens=MAX_NEW)] == expected


@pytest.mark.slow
@pytest.mark.parametrize("who", ["no certificate", "plaintext", "another CA"])
def test_clients_without_a_cluster_certificate_are_refused(tls_mesh: LocalMesh, tmp_path: Path, who: str) -> None:
    ca = tls_mesh.tls_dir / "ca.crt"
    if who == "no certificate":
        creds = grpc.ssl_channel_credentials(ca.read_bytes())
        channels = [grpc.secure_channel(a, creds) for a in (tls_mesh.address, tls_mesh.node_addresses["node-0"])]
    elif who == "plaintext":
        channels = [grpc.insecure_channel(a) for a in (tls_mesh.address, tls_mesh.node_addresses["node-0"])]
    else:
        certs.init_ca(tmp_path)
        certs.issue(tmp_path, "client", "client")
        theirs = TlsConfig.from_dir(tmp_path, "client")
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), theirs.key.read_bytes(), theirs.cert.read_bytes())
        channels = [grpc.secure_channel(a, creds) for a in (tls_mesh.address, tls_mesh.node_addresses["node-0"])]
    orchestrator, node = channels
    with orchestrator, node:
        assert _code(lambda: pb_grpc.AdminStub(orchestrator).Status(pb.StatusRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: pb_grpc.NodeStub(node).Info(pb.NodeInfoRequest(), timeout=5)) == \
            grpc.StatusCode.UNAVAILABLE
    with Client(tls_mesh.address, 5.0, tls=TlsConfig.from_dir(tmp_path, "client") if who == "another CA" else None,
                ) as client, pytest.raises(SplitmeshError) as caught:
        client.status()
    assert caught.value.code == "UNAVAILABLE"


@pytest.mark.slow
def test_only_the_orchestrator_installs_plans_and_nodes_speak_for_themselves(tls_mesh: LocalMesh) -> None:
    with tls_mesh.client() as client:
        signed = client.signed_plan()
    node0 = Identity("node", "node-0")
    for name in ("node-1", "client"):
        with _as(tls_mesh, name, node0, tls_mesh.node_addresses["node-0"]) as channel:
            node = pb_grpc.NodeStub(channel)
            for call in (partial(node.Prepare, pb.PrepareRequest(plan=signed), timeout=10),
                         partial(node.Commit, pb.CommitRequest(epoch=1), timeout=10),
                         partial(node.Abort, pb.CommitRequest(epoch=1), timeout=10)):
                assert _code(call) == grpc.StatusCode.PERMISSION_DENIED, name
    orchestrator = Identity("orchestrator", "orchestrator")
    with _as(tls_mesh, "node-1", orchestrator, tls_mesh.address) as channel:
        stub = pb_grpc.OrchestratorStub(channel)
        claim = pb.RegisterRequest(node_id="node-0", address="127.0.0.1:1", x25519_public_key=b"k" * 32)
        assert _code(lambda: stub.Register(claim, timeout=10)) == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: stub.Report(iter([pb.NodeReport(node_id="node-0")]), timeout=10)) == \
            grpc.StatusCode.PERMISSION_DENIED
    with tls_mesh.client() as client:  # node-0 is still registered, trusted and heading the plan
        status = client.status()
        node_0 = next(n for n in status.nodes if n.node_id == "node-0")
        assert node_0.trusted and node_0.address == tls_mesh.node_addresses["node-0"]
        assert status.serving


def _forward(channel: grpc.Channel, requests: list[pb.ForwardRequest]) -> tuple[list[int], grpc.StatusCode | None]:
    """Steps answered before the stream ended, and its status (None = OK)."""
    steps: list[int] = []
    try:
        for reply in pb_grpc.NodeStub(channel).Forward(iter(requests), timeout=30):
            steps.append(reply.step)
    except grpc.RpcError as exc:
        return steps, exc.code()
    return steps, None


@pytest.mark.slow
def test_forged_frames_are_refused_and_the_node_keeps_serving(tls_mesh: LocalMesh, reference: PreTrainedModel,
                                                             tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [{"role": "user", "content": "Describe a lighthouse at night."}]
    expected = reference_greedy(reference, chat_token_ids(tokenizer, prompt), 60)
    node1 = tls_mesh.node_addresses["node-1"]
    with tls_mesh.client() as client:
        plan = client.plan()
        key = public_key_from_bytes(next(n.x25519_public_key for n in plan.nodes if n.node_id == "node-1"))
        stream = client.generate(prompt, max_new_tokens=60)
        tokens = [next(stream).token_id for _ in range(3)]  # a session is live on every node meanwhile

        def session(name: str) -> tuple[pb.ForwardRequest, list[pb.ForwardRequest]]:
            sender = SealedHopSender(key, name, plan.epoch, 1)
            opening = pb.ForwardRequest(open=pb.ForwardOpen(session_id=name, epoch=plan.epoch, segment_index=1,
                                                            key_envelope=sender.key_envelope()))
            return opening, [sender.requests(s, s, torch.zeros(1, 1, HIDDEN), 1 << 20)[0] for s in range(2)]

        node1_id = Identity("node", "node-1")
        with _as(tls_mesh, "node-0", node1_id, node1) as channel:
            opening, (f0, f1) = session("attack-header")
            assert _forward(channel, [opening, _flip(f0, "header", 20)]) == ([], grpc.StatusCode.UNAUTHENTICATED)
            opening, (f0, f1) = session("attack-ciphertext")
            assert _forward(channel, [opening, _flip(f0, "ciphertext", 7)]) == ([], grpc.StatusCode.UNAUTHENTICATED)
            opening, (f0, f1) = session("attack-replay")
            assert _forward(channel, [opening, f0, f0]) == ([], grpc.StatusCode.ABORTED)  # no replies: one-way
            opening, (f0, f1) = session("attack-skip")
            assert _forward(channel, [opening, f1]) == ([], grpc.StatusCode.ABORTED)
            opening, (f0, f1) = session("attack-plaintext")
            plain = pb.ForwardRequest(open=pb.ForwardOpen(session_id="p", epoch=plan.epoch, segment_index=1))
            assert _forward(channel, [plain, f0]) == ([], grpc.StatusCode.UNAUTHENTICATED)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        for name in ("client", "node-2"):  # only the node before segment 1 may feed it
            with _as(tls_mesh, name, node1_id, node1) as channel:
                opening, (f0, _) = session(f"attack-{name}")
                assert _forward(channel, [opening, f0]) == ([], grpc.StatusCode.PERMISSION_DENIED)
        tokens += [e.token_id for e in stream]
    assert tokens == expected  # the honest session never noticed
    with _as(tls_mesh, "client", node1_id, node1) as channel:
        assert pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions == 0
