"""Registers with the orchestrator and streams capacity reports; re-registers when the stream breaks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.model_store import StoreError
from common.plan_signing import key_id
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.weight_keys import WeightKeysError, open_sealed
from node_agent.capacity import CapacityProbe
from node_agent.link_probe import LinkProber
from node_agent.memory import return_freed_memory
from node_agent.runtime import NodeRuntime

TRIM_AFTER_SESSIONS = 16  # closed session pipelines that make the heap worth trimming
TRIM_INTERVAL_S = 10.0  # and at most this often for that reason (a trim holds the allocator's lock)

log = logging.getLogger(__name__)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("link prober stopped: %r", task.exception())


class Reporter:
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self.probe = CapacityProbe()
        self.interval_s = runtime.config.report_interval_ms / 1000.0
        self._closed_since_trim = 0
        self._trimmed_at = time.monotonic()
        self.registered = asyncio.Event()
        self.prober = LinkProber(runtime)

    def _pinned_key(self) -> Ed25519PublicKey | None:
        raw = self.rt.config.plan_public_key.strip()
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw)) if raw else None

    async def _register(self, stub: pb_grpc.OrchestratorStub) -> None:
        reply = await stub.Register(pb.RegisterRequest(
            node_id=self.rt.node_id, address=self.rt.config.advertised_address, x25519_public_key=self.rt.public_key,
            capacity=self.probe.read(), model_digests=self.rt.store.digests(),
            plan_epoch=self.rt.plans.committed.epoch if self.rt.plans.committed else 0), timeout=10)
        pinned = self._pinned_key()
        offered = Ed25519PublicKey.from_public_bytes(reply.plan_public_key)
        if pinned is not None and key_id(pinned) != key_id(offered):
            raise PermissionError("orchestrator offered a plan key that differs from the pinned one")
        self.rt.plans.trust_key(key_id(offered), pinned or offered, reply.cluster_id)
        if reply.report_interval_ms:
            self.interval_s = reply.report_interval_ms / 1000.0
        log.info("registered with orchestrator (trusted=%s, cluster=%s)", reply.trusted, reply.cluster_id)
        self.registered.set()

    async def _restore(self, stub: pb_grpc.OrchestratorStub) -> None:
        """Serve the committed plan found on disk after a restart, once the orchestrator has sent the keys of
        its encrypted layers again (sealed to this node's key in that plan); a plan it no longer offers keys
        for is dropped, and the node waits for a new one."""
        awaiting = self.rt.plans.awaiting_keys
        if awaiting is None:
            return
        view = awaiting[0]
        try:
            reply = await stub.WeightKeys(pb.WeightKeysRequest(epoch=view.epoch, node_id=self.rt.node_id), timeout=10)
            keys = open_sealed(reply.weight_keys, self.rt.node_key, cluster_id=view.cluster_id, epoch=view.epoch,
                               model_digest=view.model_digest, node_id=self.rt.node_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise  # try again with the registration
            log.warning("not restoring epoch %d: %s %s", view.epoch, exc.code().name, exc.details())
            self.rt.plans.awaiting_keys = None
            return
        except WeightKeysError as exc:
            log.error("not restoring epoch %d: %s", view.epoch, exc)
            self.rt.plans.awaiting_keys = None
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.rt.plans.restore_blocking, keys)
        except (OSError, ValueError, RuntimeError, StoreError) as exc:
            log.error("cannot restore epoch %d: %s", view.epoch, exc)
            self.rt.plans.awaiting_keys = None

    async def _reports(self) -> AsyncIterator[pb.NodeReport]:
        while True:
            latency, tokens = self.rt.stats.take_token_latency()
            committed = self.rt.plans.committed
            capacity = self.probe.read(self.rt.stats.decode_cost(), self.rt.stats.prefill_layer_ms)
            yield pb.NodeReport(node_id=self.rt.node_id, capacity=capacity,
                                links=list(self.prober.links.values()), token_latency_ms=latency,
                                tokens=tokens, active_sessions=len(self.rt.sessions),
                                plan_epoch=committed.epoch if committed else 0)
            # The next report is due after the interval, or at once when a link went down or came back.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.prober.changed.wait(), self.interval_s)
            self.prober.changed.clear()
            self._closed_since_trim += self.rt.sessions.take_closed()
            now = time.monotonic()
            churned = self._closed_since_trim >= TRIM_AFTER_SESSIONS and now - self._trimmed_at >= TRIM_INTERVAL_S
            # By now the sessions that held an unloaded segment are gone too. Sessions' caches are freed as
            # they close, among live blocks of other sessions, and glibc keeps those holes resident: after
            # enough closes the node trims too, or its memory floor creeps up under steady churn.
            if self.rt.pool.take_unloaded() or churned:
                self._closed_since_trim, self._trimmed_at = 0, now
                await asyncio.get_running_loop().run_in_executor(None, return_freed_memory)

    async def run(self) -> None:
        backoff = 0.2
        prober = asyncio.create_task(self.prober.run())
        prober.add_done_callback(_log_failure)
        async with self.rt.orchestrator_channel() as channel:
            stub = pb_grpc.OrchestratorStub(channel)
            while True:
                try:
                    await self._restore(stub)  # first, so the registration names the epoch served
                    await self._register(stub)
                    backoff = 0.2
                    await stub.Report(self._reports())
                except grpc.aio.AioRpcError as exc:
                    log.log(logging.DEBUG if exc.code() == grpc.StatusCode.UNAVAILABLE else logging.WARNING,
                            "orchestrator link: %s %s", exc.code().name, exc.details())
                except PermissionError as exc:  # an orchestrator this node must not trust: keep serving, say so
                    log.error("refusing the orchestrator at %s: %s", self.rt.config.orchestrator, exc)
                    backoff = 5.0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
