"""One session's path from a given segment to the tail: local segments in-process, then the next node.

The path ends where the last segment samples; the token id comes back up the same streams, so
logits never leave the tail and a cancelled stream frees every cache downstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import torch

from common.certs import Identity
from common.frame_crypto import MAX_FRAMES_PER_KEY, FrameCryptoError, public_key_from_bytes
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.sealed_frames import SealedHopSender
from common.tensor_codec import encode_tensor
from common.tls import TlsConfig
from common.transport import aio_channel
from node_agent.compute import ComputeThread
from node_agent.metrics_registry import ACTIVATION_BYTES, HOP_OVERHEAD_SECONDS, SEGMENT_SECONDS, TRANSFER_SECONDS
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.step_batcher import StepJob

log = logging.getLogger(__name__)


class HopError(Exception):
    """The next node failed or broke the protocol; carries the status to pass upstream."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def broken_hop_code(code: grpc.StatusCode) -> grpc.StatusCode:
    """No splitmesh node ends a stream with INTERNAL on purpose; gRPC's core reports it when the connection
    breaks mid-message (a reset link, a proxy that drops the stream). That is a broken hop, as retryable
    as UNAVAILABLE, not a bug of the request: the session replays on the next plan instead of failing."""
    return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.INTERNAL else code


def hop_failure(exc: grpc.aio.AioRpcError, peer: str) -> HopError:
    """What a failed call to the next node means for the session (see :func:`broken_hop_code`)."""
    code = exc.code()
    if code == grpc.StatusCode.INTERNAL:
        return HopError(broken_hop_code(code), f"{peer}: the stream broke ({exc.details()})")
    return HopError(code, f"{peer}: {exc.details()}")


class ChannelPool:
    """One long-lived channel per peer, shared by every session; with TLS it accepts only the plan's node."""

    def __init__(self, tls: TlsConfig | None = None) -> None:
        self._tls = tls
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def get(self, address: str, node_id: str) -> grpc.aio.Channel:
        channel = self._channels.get((address, node_id))
        if channel is None:
            channel = aio_channel(address, self._tls, Identity("node", node_id))
            self._channels[(address, node_id)] = channel
        return channel

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class RemoteHop:
    """The Forward stream to the node running the next segment of one session.

    With a ``sealer`` every activation chunk is encrypted for the peer; the token ids that come back
    stay in clear at the frame layer (inside mutual TLS): each node on the way back relays them anyway,
    so sealing them per hop would hide nothing from the nodes and only cost a second key exchange.
    """

    def __init__(self, channel: grpc.aio.Channel, peer: str, opening: pb.ForwardOpen, chunk_bytes: int,
                 timeout_s: float, sealer: SealedHopSender | None = None) -> None:
        self._stub = pb_grpc.NodeStub(channel)
        self._peer = peer
        self._opening = opening
        self._chunk_bytes = chunk_bytes
        self._timeout_s = timeout_s
        self._sealer = sealer
        if sealer is not None:
            opening.key_envelope = sealer.key_envelope()
        self._call: grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply] | None = None
        self._seq = 0
        # Metric children looked up once: the per-step path stays short.
        self._sent_bytes = ACTIVATION_BYTES.labels(peer=peer)
        self._hop_seconds = TRANSFER_SECONDS.labels(peer=peer)
        self._overhead = {kind: HOP_OVERHEAD_SECONDS.labels(peer=peer, kind=kind) for kind in ("decode", "prefill")}

    async def _open(self) -> grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply]:
        call = self._stub.Forward()
        await call.write(pb.ForwardRequest(open=self._opening))
        self._call = call
        return call

    async def step(self, step: int, position: int, hidden: torch.Tensor) -> int:
        started = time.perf_counter()
        try:
            call = self._call or await self._open()
            for request in self._requests(step, position, hidden):
                await call.write(request)
            async with asyncio.timeout(self._timeout_s):  # no task per step, unlike wait_for
                reply = await call.read()
            waited = time.perf_counter() - started
            self._sent_bytes.inc(hidden.numel() * hidden.element_size())
            self._hop_seconds.inc(waited)
        except grpc.aio.AioRpcError as exc:
            raise hop_failure(exc, self._peer) from exc
        except asyncio.InvalidStateError:  # the stream ended before we could write: the peer is gone
            raise await self._ended(call) from None
        except TimeoutError:
            raise HopError(grpc.StatusCode.UNAVAILABLE, f"{self._peer}: no reply within {self._timeout_s}s") from None
        if reply is grpc.aio.EOF:
            raise await self._ended(call)
        if reply.step != step:
            raise HopError(grpc.StatusCode.INTERNAL, f"{self._peer} answered step {reply.step}, expected {step}")
        if 0.0 <= reply.downstream_s <= waited:  # a peer's figure is only trusted as far as it is plausible
            self._overhead["decode" if hidden.shape[1] == 1 else "prefill"].observe(waited - reply.downstream_s)
        return int(reply.token_id)

    def _requests(self, step: int, position: int, hidden: torch.Tensor) -> list[pb.ForwardRequest]:
        if self._sealer is not None:
            try:
                return self._sealer.requests(step, position, hidden, self._chunk_bytes)
            except FrameCryptoError as exc:
                raise HopError(grpc.StatusCode.INTERNAL, f"cannot seal frames for {self._peer}: {exc}") from exc
        requests = []
        for chunk in encode_tensor(hidden, self._chunk_bytes):
            frame = pb.ActivationFrame(step=step, seq=self._seq, position=position, tensor=chunk)
            self._seq += 1
            requests.append(pb.ForwardRequest(frame=frame))
        return requests

    async def _ended(self, call: grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply]) -> HopError:
        code = broken_hop_code(await call.code())
        if code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
            code = grpc.StatusCode.UNAVAILABLE
        return HopError(code, f"{self._peer} closed the stream: {await call.details()}")

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _sealer(view: PlanView, session_id: str, hop: int, rekey_after: int) -> SealedHopSender:
    """A fresh hop key sealed to the receiver's key from the signed plan; no key, no activations."""
    peer = view.segments[hop].node_id
    raw = view.x25519_keys.get(peer)
    if raw is None:
        raise HopError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"plan epoch {view.epoch} carries no X25519 key for {peer}: cannot encrypt activations")
    return SealedHopSender(public_key_from_bytes(raw), session_id, view.epoch, hop, rekey_after)


class SessionPipeline:
    """Runs one session from segment ``first`` of ``view`` onward and returns each sampled token."""

    def __init__(self, *, node_id: str, session_id: str, view: PlanView, first: int, runners: list[SegmentRunner],
                 sampling: SamplingConfig, compute: ComputeThread, channels: ChannelPool, chunk_bytes: int,
                 timeout_s: float, on_compute: Callable[[int, int, float], None] | None = None, encrypt: bool = True,
                 rekey_after: int = MAX_FRAMES_PER_KEY, prefill_chunk_tokens: int = 0) -> None:
        self.runners = runners
        self._prefill_chunk_tokens = prefill_chunk_tokens  # 0: a prompt runs whole
        self._caches = [r.new_cache() for r in runners]
        self._sampling = sampling
        self._compute = compute
        self._on_compute = on_compute
        self._layers = sum(len(r.span) for r in runners)
        self._segment_seconds = SEGMENT_SECONDS.labels(segment=f"{runners[0].span.start}-{runners[-1].span.end}")
        nxt = first + len(runners)
        self.remote: RemoteHop | None = None
        if nxt < len(view.segments):
            peer = view.segments[nxt].node_id
            opening = pb.ForwardOpen(session_id=session_id, epoch=view.epoch, segment_index=nxt,
                                     sampling=sampling.to_proto())
            sealer = _sealer(view, session_id, nxt, rekey_after) if encrypt else None
            self.remote = RemoteHop(channels.get(view.addresses[peer], peer), peer, opening, chunk_bytes, timeout_s,
                                    sealer)
        elif not runners[-1].is_last:
            raise ValueError(f"segments from {first} on {node_id} end before the model does")

    def _record(self, rows: int, in_layers: float, seconds: float) -> None:
        self._segment_seconds.observe(seconds)
        if self._on_compute is not None:
            self._on_compute(self._layers, rows, in_layers)

    def _job(self, inputs: torch.Tensor, position: int, step: int) -> StepJob:
        return StepJob(tuple(self.runners), tuple(self._caches), inputs, position,
                       self._sampling if self.remote is None else None, step, self._record)

    async def _compute_local(self, inputs: torch.Tensor, position: int, step: int) -> torch.Tensor | int:
        """This node's segments over ``inputs``; a long prefill runs as chunks of ``prefill_chunk_tokens``,
        each its own job, so other sessions' decode steps run between them."""
        rows = int(inputs.shape[1])
        chunk = self._prefill_chunk_tokens
        if chunk <= 0 or rows <= chunk:
            return await self._compute.step(self._job(inputs, position, step))
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

    async def step(self, step: int, position: int, inputs: torch.Tensor) -> int:
        result = await self._compute_local(inputs, position, step)
        if self.remote is None:
            assert isinstance(result, int)
            return result
        assert isinstance(result, torch.Tensor)
        return await self.remote.step(step, position, result)

    def cache_bytes(self) -> int:
        """Bytes of keys and values this session holds on this node."""
        total = 0
        for cache in self._caches:
            for layer in getattr(cache, "layers", []):
                for name in ("keys", "values"):
                    tensor = getattr(layer, name, None)
                    if isinstance(tensor, torch.Tensor):
                        total += tensor.numel() * tensor.element_size()
        return total

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self._caches.clear()
