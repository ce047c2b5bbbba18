"""Everything one node agent holds: store, loaded segments, plans, sessions, peers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.certs import Identity
from common.dtypes import parse_dtypes
from common.frame_crypto import load_or_create_node_key, public_key_bytes
from common.model_store import Manifest, ModelStore
from common.page_reserve import PageReserve
from common.plan_view import PlanView
from common.tensor_budget import BufferBudget
from common.transport import aio_channel
from node_agent.admission import BatchAdmission, Generations, SessionLimitError
from node_agent.compute import ComputeThread
from node_agent.config import NodeConfig
from node_agent.decode_fit import DecodeCost, DecodeFit
from node_agent.hops import HopError
from node_agent.path_watch import PeerProbes, grpc_probe
from node_agent.pipeline import ChannelPool, SessionPipeline, shares_one_host
from node_agent.plan_state import PlanState
from node_agent.row_routes import RowRoutes
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.segment_pool import SegmentPool
from node_agent.session_registry import NotHostedError, SessionRegistry
from node_agent.token_ring import TokenInboxes
from node_agent.torch_threads import confined_executor

log = logging.getLogger(__name__)

__all__ = ["NodeRuntime", "NotHostedError", "SessionLimitError"]  # the errors of opening a session


@dataclass
class LiveStats:
    """Running figures the capacity reporter sends: decode cost per layer by batch rows, prefill cost per
    layer-token, and head latency."""

    decode: DecodeFit = field(default_factory=DecodeFit)  # decode forwards by their batch rows
    prefill_layer_ms: float = 0.0  # EWMA of prefill milliseconds per layer per token row
    token_latency_sum_ms: float = 0.0
    tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_compute(self, layers: int, rows: int, decode: bool, seconds: float) -> None:
        """One forward of ``layers`` decoder layers over ``rows`` token rows: ``decode`` rows (one per session,
        batched or alone) feed the per-row fit, prompt rows the prefill cost per token."""
        if layers <= 0 or rows <= 0:
            return
        if decode:
            self.decode.record(rows, seconds * 1000.0 / layers)
            return
        per = seconds * 1000.0 / (layers * rows)
        with self.lock:
            self.prefill_layer_ms = per if self.prefill_layer_ms == 0.0 else 0.8 * self.prefill_layer_ms + 0.2 * per

    def decode_cost(self) -> DecodeCost:
        return self.decode.cost(self.prefill_layer_ms)

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
        self.store = ModelStore(Path(config.store).expanduser(), keys=self.weight_keys,
                                pages=PageReserve(config.weight_reserve_s, config.weight_reserve_mb << 20))
        self.pool = SegmentPool(self.store)
        self.plans = PlanState(config.node_id, self.state_dir, self.store, self.pool, parse_dtypes(config.dtypes),
                               self.weight_keys, drain_s=config.plan_drain_s)
        self.tls = config.tls()
        # The node's frame-encryption identity: kept across restarts so plans made before one stay usable.
        self.node_key = load_or_create_node_key(self.state_dir / "x25519_key.pem")
        self.public_key = public_key_bytes(self.node_key)
        self.sessions = SessionRegistry(config.node_id, config.max_sessions, self._acquire_runners,
                                        self._release_runners, self._pipeline)
        self.compute = ComputeThread(config.batch_rows, config.batch_gather_ms / 1000.0,
                                     self.sessions.pipeline_count, config.merge_wait_ms / 1000.0)
        self.channels = ChannelPool(self.tls, config.hop_timeout_s)
        self.rows = RowRoutes()  # where the batched rows of every stream open here go
        self.peer_probes = PeerProbes(grpc_probe(self.channels.get))  # shared by every step waiting on a peer
        self.stats = LiveStats()
        self.admission = BatchAdmission(config.node_id, config.max_batch_rows, config.max_queued_sessions,
                                        config.max_batch_tokens)  # what this node takes on as a head
        self.generations = Generations()  # the generations this node heads, with their owners
        self.inboxes = TokenInboxes()  # per session this node heads (and epoch): the step waiting for its token
        self.buffers = BufferBudget(config.max_buffer_bytes)  # bytes of partly received tensors, all streams
        # Tokenizing and chat templates take seconds for a large input: one thread, off the event loop.
        self.tokenizing = confined_executor("tokenize", max_workers=1)
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

    async def _acquire_runners(self, view: PlanView, first: int) -> list[SegmentRunner]:
        """This node's consecutive segments of ``view`` from ``first``, loaded on the compute thread."""
        def acquire() -> list[SegmentRunner]:
            runners = []
            for segment in view.segments[first:]:
                if segment.node_id != self.node_id:
                    break
                runners.append(self.pool.acquire(view.model_digest, segment.span))
            return runners

        return await self.compute.run(acquire)

    def _pipeline(self, session_id: str, view: PlanView, first: int, runners: list[SegmentRunner],
                  sampling: SamplingConfig, on_failure: Callable[[HopError], None] | None) -> SessionPipeline:
        return SessionPipeline(node_id=self.node_id, session_id=session_id, view=view, first=first, runners=runners,
                               sampling=sampling, compute=self.compute, channels=self.channels,
                               chunk_bytes=self.config.chunk_bytes, timeout_s=self.config.hop_timeout_s,
                               on_compute=self.stats.record_compute, encrypt=self.config.encrypt_activations,
                               rekey_after=self.config.rekey_after_frames, inboxes=self.inboxes,
                               on_failure=on_failure, prefill_chunk_tokens=self.config.prefill_chunk,
                               merge=self.config.merges(shares_one_host(view)))

    def _release_runners(self, model_digest: str, runners: list[SegmentRunner]) -> None:
        for runner in runners:
            self.pool.release(model_digest, runner.span)
