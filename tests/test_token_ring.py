"""The ring closes at the head: the tail's token goes straight there, sealed, and no middle node sees it.

In-process: the token frame codec and the head's inbox. Live: a 3-node mutual-TLS mesh whose middle and
head nodes record every message their servers receive and send (tests/tap), a generation through it,
and forged token deliveries while a session runs.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.certs import Identity
from common.chat import chat_token_ids
from common.frame_crypto import FrameAuthError, FrameEpochError, FrameSequenceError, public_key_from_bytes
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.sealed_tokens import TokenFrameError, TokenReceiver, TokenSender
from common.tls import TlsConfig
from common.transport import sync_channel
from node_agent.hops import HopError
from node_agent.token_ring import InboxError, TokenInbox
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

SESSION = "5b1f0c2e9d8a4b7c8e6f1a2b3c4d5e6f"
TAP = Path(__file__).resolve().parent / "tap"


# ------------------------------------------------------------------ token frames, in-process
@pytest.mark.parametrize("sealed", [True, False])
def test_token_frames_round_trip_and_refuse_replay(sealed: bool) -> None:
    key = X25519PrivateKey.generate()
    sender = TokenSender(key.public_key() if sealed else None, SESSION, epoch=4)
    opening = sender.opening().open
    assert (len(opening.key_envelope) > 0) == sealed
    frames = [sender.frame(step, token).token for step, token in ((0, 9), (1, 49151), (2, 7))]
    if sealed:
        assert all(f.token_id == f.step == f.seq == 0 for f in frames)  # nothing readable outside the seal
    receiver = TokenReceiver(key if sealed else None, opening.key_envelope, SESSION, 4)
    assert receiver.open(frames[0]) == (0, 9)
    with pytest.raises(FrameSequenceError) as replay:
        receiver.open(frames[0])
    assert replay.value.code == "ABORTED"
    skipping = TokenReceiver(key if sealed else None, opening.key_envelope, SESSION, 4)
    with pytest.raises(FrameSequenceError):
        skipping.open(frames[1])


def test_sealed_tokens_are_bound_to_their_key_session_and_epoch() -> None:
    key = X25519PrivateKey.generate()
    sender = TokenSender(key.public_key(), SESSION, epoch=4)
    envelope = sender.opening().open.key_envelope
    frame = sender.frame(0, 42).token
    with pytest.raises(FrameAuthError):
        TokenReceiver(X25519PrivateKey.generate(), envelope, SESSION, 4)  # another node's key
    with pytest.raises(FrameAuthError):
        TokenReceiver(key, envelope, "another-session", 4)
    with pytest.raises(FrameEpochError) as stale:
        TokenReceiver(key, envelope, SESSION, 5)
    assert stale.value.code == "FAILED_PRECONDITION"
    tampered = pb.TokenFrame()
    tampered.CopyFrom(frame)
    tampered.ciphertext = bytes([frame.ciphertext[0] ^ 1]) + frame.ciphertext[1:]
    with pytest.raises(FrameAuthError):
        TokenReceiver(key, envelope, SESSION, 4).open(tampered)
    with pytest.raises(TokenFrameError):  # a clear token id beside the seal is refused, never read
        TokenReceiver(key, envelope, SESSION, 4).open(pb.TokenFrame(header=frame.header, ciphertext=frame.ciphertext,
                                                                    token_id=42))
    plain = TokenSender(None, SESSION, 4).frame(0, 42).token
    with pytest.raises(TokenFrameError):
        TokenReceiver(None, b"", SESSION, 4).open(pb.TokenFrame(header=frame.header, ciphertext=frame.ciphertext))
    assert TokenReceiver(None, b"", SESSION, 4).open(plain) == (0, 42)


def test_the_inbox_takes_only_the_token_it_waits_for() -> None:
    async def run() -> None:
        inbox = TokenInbox(SESSION, 3)
        with pytest.raises(InboxError):
            inbox.deliver(0, 5, 0.0)  # nothing waits yet
        waiter = inbox.expect(0)
        with pytest.raises(InboxError):
            inbox.deliver(1, 5, 0.0)
        inbox.deliver(0, 5, 0.01)
        assert await waiter == (5, 0.01)
        waiter = inbox.expect(1)
        inbox.fail(HopError(grpc.StatusCode.UNAVAILABLE, "tail gone"))
        with pytest.raises(HopError):
            await waiter
        with pytest.raises(HopError):
            inbox.expect(2)

    asyncio.run(run())


# ------------------------------------------------------------------ a live mTLS mesh with recording taps
def _tapped(store: ModelStore, factory: pytest.TempPathFactory, secure: bool) -> Iterator[tuple[LocalMesh, Path]]:
    """node-0 (head) -> node-1 (middle, untrusted) -> node-2 (tail); node-0 and node-1 record their traffic.
    ``secure``: mutual TLS and sealed frames (the default deployment), else dev mode: plaintext, nothing sealed."""
    taps = factory.mktemp("taps")
    path = os.pathsep.join([str(TAP), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    spec = MeshSpec(nodes=3, store=store.root, workdir=factory.mktemp("ring-mesh"), orchestrator_port=0,
                    trusted=("node-0", "node-2"), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-2"),
                    tls=secure, encrypt_activations=secure,
                    extra_env={"PYTHONPATH": path, "SPLITMESH_TAP_NODES": "node-0,node-1",
                               "SPLITMESH_TAP_DIR": str(taps)})
    with LocalMesh(spec) as mesh:
        yield mesh, taps


@pytest.fixture(scope="module")
def tapped_mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalMesh, Path]]:
    yield from _tapped(store, tmp_path_factory, secure=True)


@pytest.fixture(scope="module")
def plain_tapped_mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory,
                      ) -> Iterator[tuple[LocalMesh, Path]]:
    yield from _tapped(store, tmp_path_factory, secure=False)


def _records(taps: Path, node: str) -> list[dict[str, Any]]:
    path = taps / f"{node}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _channel(mesh: LocalMesh, name: str, node: str) -> grpc.Channel:
    return sync_channel(mesh.node_addresses[node], TlsConfig.from_dir(mesh.tls_dir, name), Identity("node", node))


def _deliver(mesh: LocalMesh, name: str, requests: list[pb.DeliverRequest]) -> grpc.StatusCode | None:
    """Send ``requests`` on a Deliver stream to the head, presenting certificate ``name``: its status."""
    with _channel(mesh, name, "node-0") as channel:
        try:
            pb_grpc.NodeStub(channel).Deliver(iter(requests), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
    return None


PROMPT = [{"role": "user", "content": "Name three rivers in Europe."}]
MAX_NEW = 24


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tapped_mesh", "plain_tapped_mesh"])
def test_no_token_id_passes_the_middle_node(which: str, request: pytest.FixtureRequest, reference: PreTrainedModel,
                                            tokenizer: PreTrainedTokenizerBase) -> None:
    mesh, taps = request.getfixturevalue(which)
    prompt_ids = chat_token_ids(tokenizer, PROMPT)
    expected = reference_greedy(reference, prompt_ids, MAX_NEW)
    with mesh.client() as client:
        events = list(client.generate(PROMPT, max_new_tokens=MAX_NEW, ignore_eos=True))
    tokens = [e.token_id for e in events]
    assert tokens == expected
    middle = [r for r in _records(taps, "node-1") if r["method"].startswith("/splitmesh.v1.Node/")]
    # Activation frames on the session's own stream and batched on the rows stream (node_agent/row_link.py).
    frames = sum(r["fields"].count("frame") + r["fields"].count("activations.messages.frame")
                 for r in middle if r["dir"] == "in")
    assert frames >= MAX_NEW  # it did carry the session: one activation per step at least
    for record in middle:
        assert not [f for f in record["fields"] if f.split(".")[-1] in ("token_id", "ids")], record
        assert record["type"] not in ("splitmesh.v1.DeliverRequest", "splitmesh.v1.TokenFrame"), record
    sent = [value for record in middle if record["dir"] == "out" for _, value in record["ints"]]
    assert not any(sent[i:i + 4] == tokens[:4] for i in range(len(sent))), "the completion left the middle node"
    received = [value for record in middle if record["dir"] == "in" for _, value in record["ints"]]
    assert not any(received[i:i + 4] == tokens[:4] for i in range(len(received)))
    # The head received the tokens from the tail: one frame per generated token, sealed unless in dev mode.
    # The first on the session's Deliver stream, the rest batched on the tail's rows stream.
    head = [r for r in _records(taps, "node-0")
            if r["method"] in ("/splitmesh.v1.Node/Deliver", "/splitmesh.v1.Node/Rows") and r["dir"] == "in"]
    delivered = [value for r in head for name, value in r["ints"]
                 if name in ("token.token_id", "tokens.token.token_id")]
    frames = [name for r in head for name in r["fields"] if name in ("token", "tokens.token")]
    sealed = [name for r in head for name in r["fields"] if name in ("token.ciphertext", "tokens.token.ciphertext")]
    assert len(frames) >= MAX_NEW
    if mesh.spec.encrypt_activations:
        assert not delivered and len(sealed) == len(frames)
    else:
        assert delivered == tokens  # dev mode: plain frames, straight from the tail all the same


@pytest.mark.slow
def test_forged_token_deliveries_are_refused_and_the_session_runs_on(
        tapped_mesh: tuple[LocalMesh, Path], reference: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    mesh, taps = tapped_mesh
    prompt = [{"role": "user", "content": "Describe a lighthouse at night."}]
    expected = reference_greedy(reference, chat_token_ids(tokenizer, prompt), 48)
    with mesh.client() as client:
        plan = client.plan()
        head_key = public_key_from_bytes(next(n.x25519_public_key for n in plan.nodes if n.node_id == "node-0"))
        stream = client.generate(prompt, max_new_tokens=48, ignore_eos=True)
        first = [next(stream) for _ in range(3)]  # the session is live on every node meanwhile
        session = first[0].session_id

        def forged(session_id: str, epoch: int = plan.epoch, step: int = 3) -> list[pb.DeliverRequest]:
            sender = TokenSender(head_key, session_id, epoch)
            return [sender.opening(), sender.frame(step, 1)]

        assert _deliver(mesh, "node-1", forged(session)) == grpc.StatusCode.PERMISSION_DENIED  # not the tail
        # Batched rows: one from a node that is not the session's tail reaches no stream (dropped, not fatal).
        row = pb.TokenRow(session_id=session, epoch=plan.epoch, token=forged(session)[1].token)
        with _channel(mesh, "node-1", "node-0") as channel:
            ack = pb_grpc.NodeStub(channel).Rows(iter([pb.RowBatch(tokens=[row])]), timeout=30)
        assert ack.rows == 0
        assert _deliver(mesh, "client", forged(session)) == grpc.StatusCode.PERMISSION_DENIED  # not a node
        assert _deliver(mesh, "node-2", forged("no-such-session")) == grpc.StatusCode.NOT_FOUND
        assert _deliver(mesh, "node-2", forged(session, plan.epoch + 5)) == grpc.StatusCode.UNAVAILABLE
        # The tail's own stream, replayed: its recorded open and first token frame, as sent (the first open of
        # the session on its epoch is the tail's; the forged ones above came later).
        recorded = [pb.DeliverRequest.FromString(bytes.fromhex(r["raw"])) for r in _records(taps, "node-0")
                    if r["method"] == "/splitmesh.v1.Node/Deliver" and r["dir"] == "in" and r["raw"]]
        ours = [i for i, m in enumerate(recorded) if m.WhichOneof("msg") == "open" and m.open.session_id == session
                and m.open.epoch == plan.epoch]
        assert ours and recorded[ours[0] + 1].WhichOneof("msg") == "token", "the head recorded the tail's stream"
        assert _deliver(mesh, "node-2", recorded[ours[0]:ours[0] + 2]) == grpc.StatusCode.ABORTED
        assert _deliver(mesh, "node-2", forged(session)) == grpc.StatusCode.ABORTED  # a second stream, fresh key
        tokens = [e.token_id for e in first] + [e.token_id for e in stream]
    assert tokens == expected  # the honest session never noticed
    with _channel(mesh, "client", "node-0") as channel:
        assert pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions == 0
