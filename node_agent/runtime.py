"""Everything one node agent holds: store, loaded segments, plans, sessions, peers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.certs import Identity
from common.dtypes import parse_dtypes
from common.frame_crypto import load_or_create_node_key, public_key_bytes
from common.model_store import Manifest, ModelStore
from common.plan_view import PlanView
from common.tensor_budget import BufferBudget
from common.transport import aio_channel
from node_agent.admission import BatchAdmission, Generations, SessionLimitError, SessionSlots
from node_agent.compute import ComputeThread
from node_agent.config import NodeConfig
from node_agent.hops import HopError
from node_agent.path_watch import PeerProbes, grpc_probe
from node_agent.pipeline import ChannelPool, SessionPipeline
from node_agent.plan_state import PlanState
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.segment_pool import SegmentPool
from node_agent.token_ring import TokenInboxes

log = logging.getLogger(__name__)

__all__ = ["NodeRuntime", "NotHostedError", "SessionLimitError"]


class NotHostedError(Exception):
    """The requested segment is not placed on this node by the named plan."""


@dataclass
class LiveStats:
    """Running figures the capacity reporter sends: compute per layer-token and head latency."""

    layer_ms: float = 0.0  # EWMA of decode milliseconds per layer (one token row)
    prefill_layer_ms: float = 0.0  # EWMA of prefill milliseconds per layer per token row
    token_latency_sum_ms: float = 0.0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_compute(self, layers: int, rows: int, seconds: float) -> None:
        """One segment run: ``layers`` decoder layers over ``rows`` token rows (1 = a decode step)."""
        if layers <= 0 or rows <= 0:
            return
        per = seconds * 1000.0 / (layers * rows)
        with self.lock:
            if rows == 1:
                self.layer_ms = per if self.layer_ms == 0.0 else 0.9 * self.layer_ms + 0.1 * per
            else:
                self.prefill_layer_ms = per if self.prefill_layer_ms == 0.0 else 0.8 * self.prefill_layer_ms + 0.2 * per

    def record_token(self, latency_ms: float) -> None:
        with self.lock:
            self.token_latency_sum_ms += latency_ms
            self.tokens += 1

    def take_token_latency(self) -> tuple[float, int]:
        with self.lock:
            mean = self.token_latency_sum_ms / self.tokens if self.tokens else 0.0
            count = self.tokens
            self.token_latency_sum_ms, self.tokens = 0.0, 0
            return mean, count


class NodeRuntime:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir).expanduser() / config.node_id
        # Keys of the encrypted blobs this node's plans give it, in memory only (node_agent.plan_state grants and
        # forgets them); the store decrypts with nothing else and never reads a key file.
        self.weight_keys: dict[str, bytes] = {}
        self.store = ModelStore(Path(config.store).expanduser(), keys=self.weight_keys)
        self.pool = SegmentPool(self.store)
        self.plans = PlanState(config.node_id, self.state_dir, self.store, self.pool, parse_dtypes(config.dtypes),
                               self.weight_keys)
        self.tls = config.tls()
        # The node's frame-encryption identity: kept across restarts so plans made before one stay usable.
        self.node_key = load_or_create_node_key(self.state_dir / "x25519_key.pem")
        self.public_key = public_key_bytes(self.node_key)
        self.compute = ComputeThread(config.batch_rows, config.batch_gather_ms / 1000.0,
                                     lambda: len(self.sessions))
        self.channels = ChannelPool(self.tls)
        self.peer_probes = PeerProbes(grpc_probe(self.channels.get))  # shared by every step waiting on a peer
        self.stats = LiveStats()
        # (session id, first segment index) -> pipeline: the head may host a session's first and last segment
        # (session id, epoch, first segment) -> pipeline. The epoch keeps a replayed session's new stream apart
        # from a stale one of the old plan that a stalled peer may still hold open.
        self.sessions: dict[tuple[str, int, int], SessionPipeline] = {}
        self._session_models: dict[tuple[str, int, int], str] = {}
        self.slots = SessionSlots(config.node_id, config.max_sessions)  # one per session id, taken without awaiting
        self.admission = BatchAdmission(config.node_id, config.max_batch_rows, config.max_queued_sessions,
                                        config.max_batch_tokens)  # what this node takes on as a head
        self.generations = Generations()  # the generations this node heads, with their owners
        self.inboxes = TokenInboxes()  # per session this node heads (and epoch): the step waiting for its token
        self.buffers = BufferBudget(config.max_buffer_bytes)  # bytes of partly received tensors, all streams
        # Tokenizing and chat templates take seconds for a large input: one thread, off the event loop.
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._tokenizers: dict[str, PreTrainedTokenizerBase | None] = {}
        self._manifests: dict[str, Manifest] = {}

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def orchestrator_channel(self) -> grpc.aio.Channel:
        """A new channel to the orchestrator, pinned to its certificate identity under TLS."""
        return aio_channel(self.config.orchestrator, self.tls, Identity("orchestrator", self.config.orchestrator_id))

    def frame_key_problem(self, view: PlanView) -> str | None:
        """Why activations could not be encrypted under ``view`` (a reason to NACK it), or None."""
        own = view.x25519_keys.get(self.node_id)
        if own is not None and own != self.public_key:
            return f"plan epoch {view.epoch} carries a stale X25519 key for {self.node_id}"
        if self.config.encrypt_activations:
            missing = [n for n in view.node_ids() if n not in view.x25519_keys]
            if missing:
                return f"plan epoch {view.epoch} carries no X25519 key for {', '.join(missing)}"
        return None

    def manifest(self, model_digest: str) -> Manifest:
        """The model's manifest, read and verified once rather than on every request."""
        if model_digest not in self._manifests:
            self._manifests[model_digest] = self.store.open(model_digest).manifest
        return self._manifests[model_digest]

    def tokenizer(self, model_digest: str) -> PreTrainedTokenizerBase | None:
        """The model's tokenizer (exported once from the store), or None for token-id-only models."""
        if model_digest not in self._tokenizers:
            stored = self.store.open(model_digest)
            tokenizer = None
            if stored.manifest.has_tokenizer:
                folder = stored.export_tokenizer(self.state_dir / "tokenizers" / model_digest)
                tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self._tokenizers[model_digest] = tokenizer
        return self._tokenizers[model_digest]

    def _acquire_runners(self, view: PlanView, first: int) -> list[SegmentRunner]:
        runners = []
        for segment in view.segments[first:]:
            if segment.node_id != self.node_id:
                break
            runners.append(self.pool.acquire(view.model_digest, segment.span))
        return runners

    async def open_session(self, session_id: str, view: PlanView, first: int, sampling: SamplingConfig,
                           on_failure: Callable[[HopError], None] | None = None) -> SessionPipeline:
        """Take the session's slot (before any await: the limit holds under any concurrency) and build its
        pipeline from segment ``first``; the slot is given back by :meth:`close_session`. ``on_failure``
        hears of a failure downstream of this node (the head learns through its token inbox)."""
        if view.segments[first].node_id != self.node_id:
            raise NotHostedError(f"epoch {view.epoch} places segment {first} on {view.segments[first].node_id}")
        self.slots.take(session_id)
        key = (session_id, view.epoch, first)
        if key in self.sessions:  # the upstream re-opened (a retry after a failure): the new stream wins
            log.info("session %s segment %d re-opened on epoch %d; closing the stale stream", session_id[:8], first,
                     view.epoch)
            self.close_session(session_id, first, view.epoch)
        try:
            runners = await self.compute.run(self._acquire_runners, view, first)
        except BaseException:
            self.slots.give(session_id)
            raise
        try:
            pipeline = SessionPipeline(node_id=self.node_id, session_id=session_id, view=view, first=first,
                                       runners=runners, sampling=sampling, compute=self.compute,
                                       channels=self.channels, chunk_bytes=self.config.chunk_bytes,
                                       timeout_s=self.config.hop_timeout_s, on_compute=self.stats.record_compute,
                                       encrypt=self.config.encrypt_activations,
                                       rekey_after=self.config.rekey_after_frames, inboxes=self.inboxes,
                                       on_failure=on_failure, prefill_chunk_tokens=self.config.prefill_chunk)
        except BaseException:
            self._release_runners(view.model_digest, runners)
            self.slots.give(session_id)
            raise
        self.sessions[key] = pipeline
        self._session_models[key] = view.model_digest
        return pipeline

    def session_ids(self) -> set[str]:
        return {session_id for session_id, _, _ in self.sessions}

    def close_session(self, session_id: str, first: int | None = None, epoch: int | None = None,
                      only: SessionPipeline | None = None) -> None:
        """Free one pipeline of a session (``first`` and ``epoch`` given) or all of them on this node;
        with ``only``, just that pipeline, so a superseded stream never closes its replacement."""
        keys = [k for k in self.sessions if k[0] == session_id and (epoch is None or k[1] == epoch)
                and (first is None or k[2] == first) and (only is None or self.sessions[k] is only)]
        for key in keys:
            pipeline = self.sessions.pop(key)
            pipeline.close()
            self._release_runners(self._session_models.pop(key), pipeline.runners)
            self.slots.give(session_id)

    def _release_runners(self, model_digest: str, runners: list[SegmentRunner]) -> None:
        for runner in runners:
            self.pool.release(model_digest, runner.span)
