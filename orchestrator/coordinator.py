"""Builds, signs and installs plans with a two-phase switch: PREPARE on every node, COMMIT only if all ACK."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from common.certs import Identity
from common.model_store import ModelStore, StoredModel
from common.plan_signing import load_or_create_signing_key, public_bytes, sign_plan
from common.plan_view import PLAN_KIND, PlanView
from common.privacy import ENDS_ONLY, TrustRule
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.store_roles import roles_for_span
from common.transport import aio_channel
from common.weight_keys import hosted_blob_keys, seal
from orchestrator.config import OrchestratorConfig
from orchestrator.planning import Plan
from orchestrator.registry import Registry
from orchestrator.state_store import StateStore

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        state_dir = Path(config.state_dir).expanduser()
        self.state = StateStore(state_dir / "state.sqlite")
        self.signing_key = load_or_create_signing_key(state_dir / "plan_signing_key.pem")
        self.public_key = public_bytes(self.signing_key.public_key())
        self.model: StoredModel = ModelStore(Path(config.store).expanduser()).open(config.model)
        self.registry = Registry(set(config.trusted_nodes),
                                 dead_after_s=config.dead_after_reports * config.report_interval_ms / 1000.0,
                                 rejoin_grace_s=config.rejoin_grace_s)
        self.signed: pb.SignedPlan | None = self.state.committed_plan()
        self.view: PlanView | None = None
        self.preparing: PlanView | None = None  # the plan in PREPARE: its nodes may fetch their new layers
        if self.signed is not None:
            plan = pb.Plan()
            plan.ParseFromString(self.signed.plan_bytes)
            self.view = PlanView.parse(plan)
            log.info("reloaded committed plan epoch %d: %s", self.view.epoch, self.view.describe())
        self._lock = asyncio.Lock()
        self.tls = config.tls()  # None = plaintext (dev mode on loopback)
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()  # releases sent to nodes a new plan leaves out
        self.latency_listeners: list[Callable[[float], None]] = []
        # Why the last attempt to replace a broken plan found none ("" once a plan commits or the plan is whole).
        self.no_plan_reason = ""

    def observe_latency(self, latency_ms: float) -> None:
        """A head's mean per-token latency since its last report, passed on to the decision loop."""
        for listener in self.latency_listeners:
            listener(latency_ms)

    def _stub(self, address: str, node_id: str) -> pb_grpc.NodeStub:
        """A stub on a cached channel that, under TLS, accepts only the certificate of ``node_id``."""
        key = (address, node_id)
        if key not in self._channels:
            self._channels[key] = aio_channel(address, self.tls, Identity("node", node_id))
        return pb_grpc.NodeStub(self._channels[key])

    def build_plan(self, candidate: Plan, epoch: int, rule: TrustRule = ENDS_ONLY) -> pb.Plan:
        """The wire plan; it records the trusted depth and marks segments holding a critical layer
        (common.privacy) for the nodes to enforce."""
        now_ms = int(time.time() * 1000)
        n_layers = self.model.num_layers
        used = set(candidate.node_ids)
        nodes = [pb.PlanNode(node_id=r.node_id, address=r.address, trusted=r.trusted,
                             x25519_public_key=r.x25519_public_key)
                 for r in sorted(self.registry.nodes.values(), key=lambda r: r.node_id) if r.node_id in used]
        return pb.Plan(kind=PLAN_KIND, cluster_id=self.config.cluster_id, epoch=epoch, model_digest=self.model.digest,
                       num_layers=self.model.num_layers, issued_at_ms=now_ms,
                       expires_at_ms=now_ms + self.config.plan_ttl_s * 1000, nodes=nodes,
                       trusted_leading_layers=max(1, rule.leading), trusted_trailing_layers=max(1, rule.trailing),
                       segments=[pb.PlanSegment(start=s.span.start, end=s.span.end, node_id=s.node_id,
                                                privacy_critical=rule.segment_is_critical(s.span, n_layers))
                                 for s in candidate.segments])

    async def install(self, candidate: Plan, rule: TrustRule = ENDS_ONLY) -> tuple[bool, str, pb.Plan | None]:
        """Two-phase switch to ``candidate``; the old plan stays if any node NACKs. Only the controller calls it."""
        async with self._lock:
            missing = [n for n in candidate.node_ids if n not in self.registry.nodes]
            if missing:
                return False, f"unknown nodes {missing}", None
            epoch = self.state.next_epoch()
            plan = self.build_plan(candidate, epoch, rule)
            view = PlanView.parse(plan)
            signed = sign_plan(plan, self.signing_key)
            self.state.record_plan(signed, epoch)
            participants = view.node_ids()
            log.info("PREPARE epoch %d: %s", epoch, view.describe())
            self.preparing = view
            try:
                results = await asyncio.gather(*(self._prepare(n, signed, view) for n in participants))
            finally:
                self.preparing = None
            failures = [reason for ok, reason in results if not ok]
            if failures:
                log.warning("ABORT epoch %d: %s", epoch, "; ".join(failures))
                await asyncio.gather(*(self._call(n, "Abort", pb.CommitRequest(epoch=epoch)) for n in participants),
                                     return_exceptions=True)
                return False, "; ".join(failures), plan
            committed = await asyncio.gather(*(self._call(n, "Commit", pb.CommitRequest(epoch=epoch))
                                               for n in participants), return_exceptions=True)
            errors = [f"{n}: {c}" for n, c in zip(participants, committed, strict=True) if isinstance(c, Exception)]
            if errors:
                log.error("COMMIT epoch %d incomplete: %s", epoch, errors)
            self.state.mark_committed(epoch)
            departed = [n for n in (self.view.node_ids() if self.view else []) if n not in participants]
            self.signed, self.view = signed, view
            self.no_plan_reason = ""
            log.info("COMMIT epoch %d", epoch)
            for node_id in departed:  # after COMMIT, off the switch's path: they hold nothing of the new plan
                task = asyncio.create_task(self._release_departed(node_id, signed, view))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return True, "committed", plan

    async def _prepare(self, node_id: str, signed: pb.SignedPlan, view: PlanView) -> tuple[bool, str]:
        address = self.registry.nodes[node_id].address
        try:
            request = pb.PrepareRequest(plan=signed, weight_keys=self.sealed_weight_keys(view, node_id))
            reply = await self._stub(address, node_id).Prepare(request, timeout=self.config.prepare_timeout_s)
        except KeyError as exc:
            return False, f"{node_id}: the store holds no key for blob {str(exc)[:14]}: run `splitmesh model encrypt`"
        except ValueError as exc:  # no (or no valid) X25519 key registered: nothing can be sealed to it
            return False, f"{node_id}: cannot receive the weight keys of an encrypted model: {exc}"
        except grpc.aio.AioRpcError as exc:
            return False, f"{node_id}: {exc.code().name} {exc.details()}"
        return reply.ok, reply.reason

    async def _release_departed(self, node_id: str, signed: pb.SignedPlan, view: PlanView) -> None:
        """Move a node the new plan leaves out onto it too (no segments there), so it releases its old
        segments and forgets their weight keys; best effort: a node that is gone learns at its next plan."""
        if node_id not in self.registry.nodes:
            return
        ok, reason = await self._prepare(node_id, signed, view)
        try:
            if not ok:
                raise RuntimeError(reason)
            await self._call(node_id, "Commit", pb.CommitRequest(epoch=view.epoch))
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            log.info("%s left epoch %d but was not told: %s", node_id, view.epoch, exc)

    async def _call(self, node_id: str, method: str, request: pb.CommitRequest) -> None:
        stub = self._stub(self.registry.nodes[node_id].address, node_id)
        await getattr(stub, method)(request, timeout=10)

    def sealed_weight_keys(self, view: PlanView | None, node_id: str) -> bytes:
        """The keys of exactly the encrypted blobs ``view`` gives ``node_id``, sealed to its X25519 key in that
        plan (b"" for a plaintext model or no segments); KeyError when the key file lacks one."""
        if view is None or not view.segments_on(node_id):
            return b""
        keys = hosted_blob_keys(self.model.manifest, [s.span for s in view.segments_on(node_id)],
                                self.model.store.keys)
        return seal(keys, view.x25519_keys.get(node_id, b""), cluster_id=view.cluster_id, epoch=view.epoch,
                    model_digest=view.model_digest, node_id=node_id)

    def plan_for_keys(self, epoch: int) -> PlanView | None:
        """The committed plan or the plan in PREPARE with this epoch: the only ones whose keys a node gets."""
        return next((v for v in (self.view, self.preparing) if v is not None and v.epoch == epoch), None)

    def assigned_blobs(self, node_id: str) -> frozenset[str]:
        """Hashes of the store files ``node_id`` needs for the segments the committed plan or the plan in
        PREPARE gives it: the only ones it may fetch."""
        manifest = self.model.manifest
        roles = {role for view in (self.view, self.preparing) if view is not None
                 for seg in view.segments_on(node_id) for role in roles_for_span(manifest, seg.span)}
        return frozenset(manifest.files[r].sha256 for r in roles)

    def lost_plan_nodes(self) -> list[str]:
        """Nodes of the committed plan known to be gone (see :meth:`Registry.lost`)."""
        return [] if self.view is None else [n for n in self.view.node_ids() if self.registry.lost(n)]

    def down_hops(self, plan: Plan | None) -> list[tuple[str, str]]:
        """Hops of a chain (segment i's node dials segment i+1's) whose sender reports the link down."""
        nodes = plan.node_ids if plan is not None else ()
        return [(a, b) for a, b in itertools.pairwise(nodes) if a != b and self.registry.link_down(a, b)]

    def current_plan(self) -> Plan | None:
        """The committed plan as the planner's one plan type (None before the first commit)."""
        return None if self.view is None else Plan.of([(s.span, s.node_id) for s in self.view.segments])

    def route_problem(self) -> str | None:
        """Why a new generation cannot be routed now (clients get UNAVAILABLE with it), or None.

        Only what is known to be broken counts: a plan node that is merely not re-registered yet
        after an orchestrator restart, or a middle node whose replacement plan is being installed,
        does not stop a request (the head waits for the replacement and replays).
        """
        if self.view is None:
            return "no plan yet: waiting for nodes to register"
        broken = self.lost_plan_nodes() or self.down_hops(self.current_plan())
        if broken and self.no_plan_reason:
            return f"no feasible plan: {self.no_plan_reason}"
        head = self.view.head.node_id
        if self.registry.lost(head):
            return f"the head {head} of epoch {self.view.epoch} is not reporting; a replacement plan is being made"
        return None

    def serving(self) -> tuple[bool, str]:
        if self.view is None:
            return False, "no committed plan yet"
        problem = self.route_problem()
        if problem is not None:
            return False, problem
        dead = [n for n in self.view.node_ids() if not self.registry.alive(n)]
        if dead:
            return False, f"plan nodes not reporting: {', '.join(dead)}"
        moved = [n for n in self.view.node_ids() if self.registry.nodes[n].address != self.view.addresses[n]]
        if moved:
            return False, f"nodes registered at a new address since epoch {self.view.epoch}: {', '.join(moved)}"
        behind = [n for n in self.view.node_ids() if self.registry.nodes[n].plan_epoch != self.view.epoch]
        if behind:
            return False, f"nodes not yet on epoch {self.view.epoch}: {', '.join(behind)}"
        return True, ""

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self.state.close()
