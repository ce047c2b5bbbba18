"""One session's path from a given segment to the tail: local segments in-process, then the next node.

Activations flow one way along the plan; the last segment samples and its node sends the token id
straight to the head (node_agent/token_ring.py), so logits never leave the tail, no middle node sees a
token, and a cancelled stream still frees every cache downstream (each node closes the next stream).
A session's first tensor opens its stream to the next node; its decode rows then travel with the rest of
their batch as one message (node_agent/row_link.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from common.certs import Identity
from common.frame_crypto import MAX_FRAMES_PER_KEY, FrameCryptoError, public_key_from_bytes
from common.hop_codec import HopSender, PlainHopSender, SealedHopSender
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.sealed_tokens import TokenSender
from common.tls import TlsConfig
from common.transport import aio_channel
from node_agent.compute import ComputeThread, DueRow
from node_agent.hops import HopError, broken_hop_code
from node_agent.metrics_registry import ACTIVATION_BYTES, HOP_OVERHEAD_SECONDS, SEGMENT_SECONDS, TRANSFER_SECONDS
from node_agent.outbound_stream import OutboundStream
from node_agent.row_link import RowLink, RowLinks
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.step_batcher import StepJob
from node_agent.token_ring import Delivered, LocalTokenSink, RemoteTokenSink, TokenInbox, TokenInboxes

log = logging.getLogger(__name__)


class ChannelPool:
    """One long-lived channel per peer, shared by every session; with TLS it accepts only the plan's node.
    Each peer also has one rows stream on it (node_agent/row_link.py), shared by every session's batched rows."""

    def __init__(self, tls: TlsConfig | None = None, rows_timeout_s: float = 30.0) -> None:
        self._tls = tls
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._links = RowLinks(self.get, rows_timeout_s)

    def link(self, address: str, node_id: str) -> RowLink:
        return self._links.get(address, node_id)

    def get(self, address: str, node_id: str) -> grpc.aio.Channel:
        channel = self._channels.get((address, node_id))
        if channel is None:
            channel = aio_channel(address, self._tls, Identity("node", node_id))
            self._channels[(address, node_id)] = channel
        return channel

    async def close(self) -> None:
        self._links.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class RemoteHop:
    """The Forward stream to the node running the next segment of one session; activations flow one way.

    ``sender`` frames every activation (sealed for the peer, or plain on a dev mesh). The peer sends no
    reply per step (the token goes from the tail straight to the head, see node_agent/token_ring.py);
    the stream's end is watched beside the writes (node_agent/outbound_stream.py), and a failure
    downstream is reported to ``on_failure`` with its status.
    """

    def __init__(self, channel: grpc.aio.Channel, peer: str, opening: pb.ForwardOpen, chunk_bytes: int,
                 timeout_s: float, sender: HopSender,
                 on_failure: Callable[[HopError], None] | None = None, link: RowLink | None = None) -> None:
        stub = pb_grpc.NodeStub(channel)
        self._peer = peer
        self._link = link  # the peer's rows stream: decode rows of batched forwards travel on it
        self._chunk_bytes = chunk_bytes
        self._sender = sender
        opening.key_envelope = sender.key_envelope()
        self._opening = pb.ForwardRequest(open=opening)
        self._stream = OutboundStream(peer, "activation", timeout_s, stub.Forward, self._outcome, on_failure)
        # Metric children looked up once: the per-step path stays short.
        self._sent_bytes = ACTIVATION_BYTES.labels(peer=peer)
        self._hop_seconds = TRANSFER_SECONDS.labels(peer=peer)
        self._overhead = {kind: HOP_OVERHEAD_SECONDS.labels(peer=peer, kind=kind) for kind in ("decode", "prefill")}

    async def send(self, step: int, position: int, hidden: torch.Tensor, compute_s: float,
                   batched: bool = False) -> None:
        """Write one step's activation; ``compute_s`` is the step's compute since the head (a metric). A decode
        row of a ``batched`` forward leaves with the forward's other rows (node_agent/row_link.py); a row alone
        goes straight on its own stream, which spares it the hand-over."""
        requests = self._requests(step, position, hidden)
        for request in requests:
            if request.HasField("frame"):
                request.frame.compute_s = compute_s
        if self._link is not None and self._stream.rides_rows(batched and hidden.shape[1] == 1):
            opening = self._opening.open
            self._link.activation(pb.ActivationRow(session_id=opening.session_id, epoch=opening.epoch,
                                                   segment_index=opening.segment_index, messages=requests),
                                  self._stream.fail)
        else:
            await self._stream.write(requests, lambda: self._opening)
        self._sent_bytes.inc(hidden.numel() * hidden.element_size())

    async def token(self, waiter: asyncio.Future[Delivered], started: float, rows: int,
                    boundaries: int) -> int:
        """The head's wait for the token of the step it sent at ``started``, which crosses ``boundaries``
        node boundaries on its way to the tail; the ring's overhead beyond compute is observed per boundary."""
        # No deadline of its own: a busy path may take long, and the head's PathWatch (ring_session)
        # decides from probes when the path is stuck; a broken stream fails ``waiter`` at once.
        token, compute_s = await waiter
        waited = time.perf_counter() - started
        self._hop_seconds.inc(waited)
        if 0.0 <= compute_s <= waited:  # a peer's figure is only trusted as far as it is plausible
            self._overhead["decode" if rows == 1 else "prefill"].observe((waited - compute_s) / max(1, boundaries))
        return token

    def _requests(self, step: int, position: int, hidden: torch.Tensor) -> list[pb.ForwardRequest]:
        try:
            return self._sender.requests(step, position, hidden, self._chunk_bytes)
        except FrameCryptoError as exc:
            raise HopError(grpc.StatusCode.INTERNAL, f"cannot seal frames for {self._peer}: {exc}") from exc

    async def _outcome(self, call: grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply]) -> HopError:
        """The peer ended the stream (no node does so while the session uses it): why, as a HopError."""
        async for _ in call:
            pass  # a peer sends no replies; one that does is ignored
        code = broken_hop_code(await call.code())
        if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
            code = grpc.StatusCode.UNAVAILABLE
        return HopError(code, f"{self._peer} closed the stream: {await call.details()}")

    def close(self) -> None:
        self._stream.close()


def _sealer(view: PlanView, session_id: str, hop: int, rekey_after: int) -> SealedHopSender:
    """A fresh hop key sealed to the receiver's key from the signed plan; no key, no activations."""
    peer = view.segments[hop].node_id
    return SealedHopSender(_x25519_key(view, peer, "activations"), session_id, view.epoch, hop, rekey_after)


def _x25519_key(view: PlanView, node_id: str, what: str) -> X25519PublicKey:
    raw = view.x25519_keys.get(node_id)
    if raw is None:
        raise HopError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"plan epoch {view.epoch} carries no X25519 key for {node_id}: cannot encrypt {what}")
    return public_key_from_bytes(raw)


def shares_one_host(view: PlanView) -> bool:
    """Every node of the plan listens on the same host address: their processes share that box's cores."""
    return len({address.rsplit(":", 1)[0] for address in view.addresses.values()}) == 1


def _boundaries(view: PlanView) -> int:
    """Node boundaries a step crosses from the head to the tail (each one message per token)."""
    nodes = [s.node_id for s in view.segments]
    return sum(a != b for a, b in itertools.pairwise(nodes))


class SessionPipeline:
    """Runs one session from segment ``first`` of ``view`` onward.

    At the head the step returns the sampled token (from its own last segment, or delivered by the
    tail into ``inboxes``); elsewhere it returns None: a middle node forwards the activation, the tail
    sends the token straight to the head. ``on_failure`` hears of a failure downstream of this node.
    """

    def __init__(self, *, node_id: str, session_id: str, view: PlanView, first: int, runners: list[SegmentRunner],
                 sampling: SamplingConfig, compute: ComputeThread, channels: ChannelPool, chunk_bytes: int,
                 timeout_s: float, on_compute: Callable[[int, int, bool, float], None] | None = None,
                 encrypt: bool = True,
                 rekey_after: int = MAX_FRAMES_PER_KEY, inboxes: TokenInboxes | None = None,
                 on_failure: Callable[[HopError], None] | None = None, prefill_chunk_tokens: int = 0,
                 merge: bool = False) -> None:
        self.runners = runners
        self._shared = False  # the last step's forward carried other sessions' rows too
        # At a merging head: the compute thread counts this session's next decode row due while a step runs.
        self._due = DueRow() if merge and first == 0 else None
        self._prefill_chunk_tokens = prefill_chunk_tokens  # 0: a prompt runs whole
        self._caches = [r.new_cache() for r in runners]
        self._sampling = sampling
        self._compute = compute
        self._on_compute = on_compute
        self._on_failure = on_failure
        self._layers = sum(len(r.span) for r in runners)
        self._segment_seconds = SEGMENT_SECONDS.labels(segment=f"{runners[0].span.start}-{runners[-1].span.end}")
        self._boundaries = _boundaries(view)
        self._inboxes = inboxes if inboxes is not None else TokenInboxes()
        nxt = first + len(runners)
        self.remote: RemoteHop | None = None
        self.inbox: TokenInbox | None = None  # the head's, when another node samples
        self.sink: LocalTokenSink | RemoteTokenSink | None = None  # the tail's, when it is not the head's pipeline
        if nxt < len(view.segments):
            peer = view.segments[nxt].node_id
            opening = pb.ForwardOpen(session_id=session_id, epoch=view.epoch, segment_index=nxt,
                                     sampling=sampling.to_proto())
            sender = _sealer(view, session_id, nxt, rekey_after) if encrypt else PlainHopSender()
            self.remote = RemoteHop(channels.get(view.addresses[peer], peer), peer, opening, chunk_bytes, timeout_s,
                                    sender, self._failed, channels.link(view.addresses[peer], peer))
            if first == 0:
                self.inbox = self._inboxes.open(session_id, view.epoch)
        elif not runners[-1].is_last:
            raise ValueError(f"segments from {first} on {node_id} end before the model does")
        elif first > 0:
            head = view.head.node_id
            if head == node_id:
                self.sink = LocalTokenSink(self._inboxes, session_id, view.epoch)
            else:
                key = _x25519_key(view, head, "tokens") if encrypt else None
                self.sink = RemoteTokenSink(channels.get(view.addresses[head], head), head,
                                            TokenSender(key, session_id, view.epoch), timeout_s, self._failed,
                                            channels.link(view.addresses[head], head))

    def _failed(self, error: HopError) -> None:
        if self.inbox is not None:
            self.inbox.fail(error)
        if self._on_failure is not None:
            self._on_failure(error)

    def _record(self, rows: int, decode: bool, in_layers: float, seconds: float) -> None:
        self._segment_seconds.observe(seconds)
        if self._on_compute is not None:
            self._on_compute(self._layers, rows, decode, in_layers)

    def _job(self, inputs: torch.Tensor, position: int, step: int) -> StepJob:
        job = StepJob(tuple(self.runners), tuple(self._caches), inputs, position,
                      self._sampling if self.remote is None else None, step, self._record)
        job.due = self._due
        return job

    async def _compute_local(self, inputs: torch.Tensor, position: int, step: int) -> torch.Tensor | int:
        """This node's segments over ``inputs``; a long prefill runs as chunks of ``prefill_chunk_tokens``,
        each its own job, so other sessions' decode steps run between them."""
        rows = int(inputs.shape[1])
        chunk = self._prefill_chunk_tokens
        self._shared = False
        if chunk <= 0 or rows <= chunk:
            job = self._job(inputs, position, step)
            result = await self._compute.step(job)
            self._shared = job.shared
            return result
        parts: list[torch.Tensor] = []
        for start in range(0, rows, chunk):
            job = self._job(inputs[:, start:start + chunk], position + start, step)
            if start + chunk < rows:
                job.sampling = None  # only the prompt's last row samples
            result = await self._compute.step(job)
            if isinstance(result, int):
                return result
            parts.append(result)
        return torch.cat(parts, dim=1)

    async def step(self, step: int, position: int, inputs: torch.Tensor, compute_s: float = 0.0) -> int | None:
        """Run the step here and pass it on; ``compute_s`` is what it had since the head (a metric)."""
        started = time.perf_counter()
        result = await self._compute_local(inputs, position, step)
        if self.remote is None:
            assert isinstance(result, int)
            if self.sink is None:
                if self._due is not None:
                    self._compute.row_back(self._due)
                return result
            await self.sink.send(step, result, compute_s + time.perf_counter() - started, self._shared)
            return None
        assert isinstance(result, torch.Tensor)
        if self.inbox is None:
            await self.remote.send(step, position, result, compute_s + time.perf_counter() - started, self._shared)
            return None
        waiter = self.inbox.expect(step)  # before the activation leaves: the token may come back at once
        sent = time.perf_counter()
        await self.remote.send(step, position, result, 0.0, self._shared)
        token = await self.remote.token(waiter, sent, int(inputs.shape[1]), self._boundaries)
        if self._due is not None:
            self._compute.row_back(self._due)
        return token

    def cache_bytes(self) -> int:
        """Bytes of keys and values this session holds on this node."""
        return sum(cache.kv_bytes() for cache in self._caches)

    def close(self) -> None:
        if self._due is not None:
            self._compute.forget(self._due)
        if self.remote is not None:
            self.remote.close()
        if self.inbox is not None:
            self._inboxes.close(self.inbox)
        if self.sink is not None:
            self.sink.close()
        self._caches.clear()
