"""Attacks on a live mutual-TLS mesh that once stalled or starved a node, and the codes they get now.

The attacker holds a real certificate of the cluster: node-0's (the predecessor of node-1's segment,
the one identity node-1 takes activations from) or a second client's. The head node-0 also hosts the
tail, so one generation must count once there. Limits are tight (3 sessions, a 3 s frame timeout, 6 s
of idleness between tensors) so each attack reaches them with few streams.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common import certs
from common.certs import Identity
from common.chat import text_token_ids
from common.frame_crypto import Direction, HopSealer, public_key_from_bytes
from common.hop_codec import POSITION, SealedHopSender
from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import TlsConfig
from common.transport import aio_channel, sync_channel
from splitmesh import SplitmeshError
from splitmesh.launcher import LocalMesh, MeshSpec
from tests.conftest import reference_greedy

pytestmark = pytest.mark.slow

HIDDEN = 576
MAX_SESSIONS = 3
FRAME_TIMEOUT_S = 3.0
IDLE_TIMEOUT_S = 6.0
NODE1 = Identity("node", "node-1")
HEAD = Identity("node", "node-0")


@pytest.fixture(scope="module")
def mesh(store: ModelStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    spec = MeshSpec(nodes=2, store=store.root, workdir=tmp_path_factory.mktemp("attack-mesh"), orchestrator_port=0,
                    trusted=("node-0",), boundaries=(0, 10, 20, 30), placement=("node-0", "node-1", "node-0"),
                    tls=True, extra_env={"SPLITMESH_MAX_SESSIONS": str(MAX_SESSIONS),
                                         "SPLITMESH_FRAME_TIMEOUT_S": str(FRAME_TIMEOUT_S),
                                         "SPLITMESH_SESSION_IDLE_TIMEOUT_S": str(IDLE_TIMEOUT_S)})
    with LocalMesh(spec) as local:
        certs.issue(local.tls_dir, "mallory", "client")  # a second, honest-looking client of the same CA
        yield local


@pytest.fixture(scope="module")
def prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return text_token_ids(tokenizer, "The lighthouse keeper looked at the sea and")


@pytest.fixture(scope="module")
def expected(reference: PreTrainedModel, prompt: list[int]) -> list[int]:
    return reference_greedy(reference, prompt, 12)


def _tls(mesh: LocalMesh, name: str) -> TlsConfig:
    return TlsConfig.from_dir(mesh.tls_dir, name)


def _sessions_drain(mesh: LocalMesh, node_id: str) -> int:
    """The node's active sessions once its streams have wound down (a closed stream frees downstream slots
    a few milliseconds later), or what is still held after 20 s."""
    with sync_channel(mesh.node_addresses[node_id], _tls(mesh, "client"), Identity("node", node_id)) as channel:
        node = pb_grpc.NodeStub(channel)
        deadline = time.monotonic() + 20
        while (active := node.Info(pb.NodeInfoRequest(), timeout=10).active_sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
    return int(active)


def _generate(mesh: LocalMesh, prompt: list[int], out: list[object], tokens: int = 12) -> threading.Thread:
    """A normal generation in the background; its tokens (or its error) land in ``out``."""
    def run() -> None:
        try:
            with mesh.client(120) as client:
                out.append([e.token_id for e in client.generate(prompt, max_new_tokens=tokens, ignore_eos=True)])
        except SplitmeshError as exc:
            out.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    return worker


def _node1_key(mesh: LocalMesh) -> tuple[int, X25519PublicKey]:
    with mesh.client() as client:
        plan = client.plan()
    return plan.epoch, public_key_from_bytes(next(n.x25519_public_key for n in plan.nodes if n.node_id == "node-1"))


def _opening(session_id: str, epoch: int, sender: SealedHopSender | HopSealer) -> pb.ForwardRequest:
    return pb.ForwardRequest(open=pb.ForwardOpen(session_id=session_id, epoch=epoch, segment_index=1,
                                                 key_envelope=sender.key_envelope()))


async def _held_stream(channel: grpc.aio.Channel, messages: list[pb.ForwardRequest],
                       timeout_s: float = 60.0) -> grpc.StatusCode:
    """Send ``messages`` on a Forward stream, then keep it open (never half-close) until the node ends it."""
    async def requests() -> AsyncIterator[pb.ForwardRequest]:
        for message in messages:
            yield message
        await asyncio.sleep(timeout_s)

    call = pb_grpc.NodeStub(channel).Forward(requests(), timeout=timeout_s)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _half_tensor(sealer: HopSealer) -> pb.ForwardRequest:
    """The first of two sealed chunks of a one-row prefill: the node must buffer it and wait for the rest."""
    header, ciphertext = sealer.seal(step=0, dtype="float32", shape=(1, 1, HIDDEN),
                                     plaintext=POSITION.pack(0) + b"\0" * (2 * HIDDEN), chunk_index=0, chunk_count=2)
    return pb.ForwardRequest(frame=pb.ActivationFrame(header=header, ciphertext=ciphertext))


def test_silent_forward_opens_hold_no_slot_and_are_closed(mesh: LocalMesh, prompt: list[int],
                                                         expected: list[int]) -> None:
    """Twice the session limit of ForwardOpens that never send a frame, and as many that stop in the middle of
    a tensor: a generation started meanwhile gets its exact tokens, and every stalled stream is closed with
    DEADLINE_EXCEEDED after the frame timeout."""
    epoch, key = _node1_key(mesh)
    out: list[object] = []

    def stalled(i: int) -> list[pb.ForwardRequest]:
        sealer = HopSealer(key, f"stalled-{i}", epoch, Direction.FORWARD, hop=1)
        return [_opening(f"stalled-{i}", epoch, sealer), *([_half_tensor(sealer)] if i % 2 else [])]

    async def attack() -> list[grpc.StatusCode]:
        async with aio_channel(mesh.node_addresses["node-1"], _tls(mesh, "node-0"), NODE1) as channel:
            streams = [asyncio.ensure_future(_held_stream(channel, stalled(i))) for i in range(4 * MAX_SESSIONS)]
            await asyncio.sleep(0.5)  # every silent stream is open before the honest generation starts
            worker = await asyncio.to_thread(_generate, mesh, prompt, out)
            await asyncio.to_thread(worker.join, 120)
            return list(await asyncio.gather(*streams))

    codes = asyncio.run(attack())
    assert out == [expected]
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * (4 * MAX_SESSIONS)


def test_concurrent_forward_opens_never_exceed_the_session_limit(mesh: LocalMesh, prompt: list[int],
                                                                 reference: PreTrainedModel) -> None:
    """200 streams open at once, each with a one-row prefill and then silence, while node-1's compute thread
    is busy with an honest long prefill (so every open that awaits it is in flight together): at no time
    does node-1 serve more than its limit, the rest are refused with RESOURCE_EXHAUSTED, the holders are
    closed (NOT_FOUND once their step reaches the head, which heads no such session and refuses its token;
    else after the idle timeout), and the honest generation gets its exact tokens."""
    long_prompt = (prompt * 200)[:1500]
    expected = reference_greedy(reference, long_prompt, 4)
    epoch, key = _node1_key(mesh)
    seen: list[int] = []
    out: list[object] = []

    async def attack() -> list[grpc.StatusCode]:
        async with aio_channel(mesh.node_addresses["node-1"], _tls(mesh, "node-0"), NODE1) as channel:
            info = pb_grpc.NodeStub(channel)
            senders = [SealedHopSender(key, f"burst-{i}", epoch, 1) for i in range(200)]
            bursts = [[_opening(f"burst-{i}", epoch, s), *s.requests(0, 0, torch.zeros(1, 1, HIDDEN), 1 << 20)]
                      for i, s in enumerate(senders)]
            worker = await asyncio.to_thread(_generate, mesh, long_prompt, out, 4)
            while not (await info.Info(pb.NodeInfoRequest(), timeout=10)).active_sessions:
                await asyncio.sleep(0.01)  # the honest prefill has reached node-1's compute thread
            streams = [asyncio.ensure_future(_held_stream(channel, messages)) for messages in bursts]
            while not all(s.done() for s in streams):
                seen.append((await info.Info(pb.NodeInfoRequest(), timeout=10)).active_sessions)
                await asyncio.sleep(0.05)
            await asyncio.to_thread(worker.join, 120)
            return [s.result() for s in streams]

    codes = asyncio.run(attack())
    assert out == [expected]
    closed = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, *closed}, set(codes)
    assert sum(code in closed for code in codes) >= 1
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    assert max(seen) <= MAX_SESSIONS, seen
    assert _sessions_drain(mesh, "node-1") == 0


def test_generates_over_the_limit_are_refused_at_once_by_the_head(mesh: LocalMesh, prompt: list[int],
                                                                  expected: list[int]) -> None:
    """200 concurrent Generate calls: each either completes with the exact tokens or is refused by the head's
    own admission (never by a downstream node after the ring worked on it), and none hangs. The head also
    hosts the tail, so MAX_SESSIONS generations run side by side on it."""
    async def burst() -> list[list[int] | tuple[grpc.StatusCode, str]]:
        async with aio_channel(mesh.node_addresses["node-0"], _tls(mesh, "client"), HEAD) as channel:
            stub = pb_grpc.NodeStub(channel)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), max_new_tokens=12, ignore_eos=True)

            async def one() -> list[int] | tuple[grpc.StatusCode, str]:
                try:
                    return [e.token_id async for e in stub.Generate(request, timeout=120)]
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details() or ""

            return list(await asyncio.gather(*(one() for _ in range(200))))

    outcomes = asyncio.run(burst())
    done = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if not isinstance(o, list)]
    assert len(done) >= MAX_SESSIONS and all(tokens == expected for tokens in done)
    assert refused and all(o == (grpc.StatusCode.RESOURCE_EXHAUSTED, f"node node-0 already serves {MAX_SESSIONS} "
                                                                     "sessions") for o in refused), set(refused)


def test_head_hosting_the_tail_counts_a_generation_once(mesh: LocalMesh, prompt: list[int],
                                                        expected: list[int]) -> None:
    outs: list[list[object]] = [[] for _ in range(MAX_SESSIONS)]
    with mesh.client() as client:
        streams = [client.generate(prompt, max_new_tokens=12, ignore_eos=True) for _ in range(MAX_SESSIONS)]
        firsts = [next(s).token_id for s in streams]  # all MAX_SESSIONS generations are running now
        for out, first, stream in zip(outs, firsts, streams, strict=True):
            out.extend([first, *(e.token_id for e in stream)])
    assert outs == [expected] * MAX_SESSIONS


def _forward(mesh: LocalMesh, requests: list[pb.ForwardRequest]) -> tuple[grpc.StatusCode, str]:
    with sync_channel(mesh.node_addresses["node-1"], _tls(mesh, "node-0"), NODE1) as channel:
        try:
            list(pb_grpc.NodeStub(channel).Forward(iter(requests), timeout=30))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def test_tensors_are_judged_on_their_first_chunk(mesh: LocalMesh) -> None:
    epoch, key = _node1_key(mesh)

    def sealed(name: str, shape: tuple[int, ...], count: int, data: bytes, position: int = 0,
               ) -> list[pb.ForwardRequest]:
        sealer = HopSealer(key, name, epoch, Direction.FORWARD, hop=1)
        header, ciphertext = sealer.seal(step=0, dtype="float32", shape=shape, plaintext=POSITION.pack(position) + data,
                                         chunk_index=0, chunk_count=count)
        return [_opening(name, epoch, sealer), pb.ForwardRequest(frame=pb.ActivationFrame(header=header,
                                                                                          ciphertext=ciphertext))]

    # 200,000 declared rows (460 MB): once buffered chunk after chunk up to 512 MiB, now refused on chunk one.
    code, details = _forward(mesh, sealed("rows", (1, 200_000, HIDDEN), 440, b"\0" * (1 << 20)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "rows" in details
    # 45,000 empty chunks of a one-row tensor: once 46 CPU-seconds of re-summing, now refused on chunk one.
    code, details = _forward(mesh, sealed("empty", (1, 1, HIDDEN), 45_000, b""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "45000 chunks" in details
    # A stream's first tensor sits at position 0 (a replay re-sends the whole history): anything else is a gap.
    code, details = _forward(mesh, sealed("gap", (1, 1, HIDDEN), 1, b"\0" * (4 * HIDDEN), position=8000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "position 8000" in details
    assert _sessions_drain(mesh, "node-1") == 0


def test_undecodable_bytes_are_invalid_argument(mesh: LocalMesh) -> None:
    with sync_channel(mesh.node_addresses["node-0"], _tls(mesh, "node-0"), HEAD) as channel:
        forward = channel.stream_stream("/splitmesh.v1.Node/Forward")
        with pytest.raises(grpc.RpcError) as caught:
            list(forward(iter([b"\xff\xff\xff\x00garbage"]), timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with sync_channel(mesh.node_addresses["node-0"], _tls(mesh, "client"), HEAD) as channel:
        generate = channel.unary_stream("/splitmesh.v1.Node/Generate")
        bad_utf8 = b"\x0a\x04hi\xff\xfe" + b"\x20\x04"  # prompt = b"hi\xff\xfe", max_new_tokens = 4
        with pytest.raises(grpc.RpcError) as caught:
            list(generate(bad_utf8, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (caught.value.details() or "")


@pytest.mark.parametrize(("sampling", "prompt_text", "messages", "match"), [
    (pb.SamplingParams(temperature=0.7, top_p=float("nan")), "hi", 0, "top_p"),
    (pb.SamplingParams(temperature=0.7, top_p=-0.5), "hi", 0, "top_p"),
    (pb.SamplingParams(temperature=float("nan")), "hi", 0, "temperature"),
    (pb.SamplingParams(), "word " * 1_500_000, 0, "byte"),  # 7.5 MB: once 6 s of tokenizing on the event loop
    (pb.SamplingParams(), "", 100_000, "messages"),  # once 2 s of chat template on the event loop
])
def test_bad_requests_are_refused_before_tokenizing(mesh: LocalMesh, sampling: pb.SamplingParams, prompt_text: str,
                                                    messages: int, match: str) -> None:
    if messages:
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * messages)
        request = pb.GenerateRequest(messages=chat, max_new_tokens=4, sampling=sampling)
    else:
        request = pb.GenerateRequest(prompt=prompt_text, max_new_tokens=4, sampling=sampling)
    with sync_channel(mesh.node_addresses["node-0"], _tls(mesh, "client"), HEAD) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.NodeStub(channel).Generate(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (caught.value.details() or "")


def test_only_the_owner_cancels_a_session(mesh: LocalMesh, prompt: list[int], expected: list[int]) -> None:
    """Another client's certificate hears NOT_FOUND (as for an unknown id), a node's PERMISSION_DENIED (nodes may not
    call Cancel at all: common.authz), and the victim's stream is untouched; the owner's Cancel ends its own stream
    with CANCELLED and frees the slot."""
    with mesh.client() as client:
        stream = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
        first = next(stream)
        for name, code in (("mallory", grpc.StatusCode.NOT_FOUND), ("node-1", grpc.StatusCode.PERMISSION_DENIED)):
            with sync_channel(mesh.node_addresses["node-0"], _tls(mesh, name), HEAD) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    pb_grpc.NodeStub(channel).Cancel(pb.CancelRequest(session_id=first.session_id), timeout=10)
                assert caught.value.code() == code, name
        assert [first.token_id, *(e.token_id for e in stream)] == expected

        stream = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
        first = next(stream)
        with sync_channel(mesh.node_addresses["node-0"], _tls(mesh, "client"), HEAD) as channel:
            pb_grpc.NodeStub(channel).Cancel(pb.CancelRequest(session_id=first.session_id), timeout=10)
            with pytest.raises(SplitmeshError) as ended:
                list(stream)
            assert ended.value.code == "CANCELLED"
    assert _sessions_drain(mesh, "node-0") == 0 and _sessions_drain(mesh, "node-1") == 0
