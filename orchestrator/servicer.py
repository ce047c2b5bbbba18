"""The Orchestrator (nodes) and Admin (CLI, SDK) gRPC services."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from common.authz import require_peer
from common.plan_signing import key_id
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from orchestrator.adaptation import Adapter
from orchestrator.coordinator import Coordinator
from orchestrator.planning import Plan
from orchestrator.policy import policy_values
from orchestrator.replanning import best_plan
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger(__name__)


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.co = coordinator
        self.stale_nodes: set[str] = set()  # plan nodes that came back without the committed plan

    async def Register(self, request: pb.RegisterRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext[pb.RegisterRequest, pb.RegisterReply]) -> pb.RegisterReply:
        # The certificate must name the node it registers: trust (from our config) binds to that identity.
        await require_peer(context, tls_on=self.co.tls is not None, kinds=("node",), node_id=request.node_id,
                           what=f"Register as {request.node_id!r}")
        if not request.node_id or not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id and address are required")
        if len(request.x25519_public_key) not in (0, 32):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"x25519_public_key must be 32 bytes, got {len(request.x25519_public_key)}")
        if self.co.model.digest not in request.model_digests:
            log.warning("node %s lacks model %s in its store", request.node_id, self.co.model.digest[:12])
        record = self.co.registry.register(request)
        self.co.state.remember_node(request.node_id, request.address)
        view = self.co.view
        if view is not None and request.node_id in view.node_ids() and (
                request.plan_epoch != view.epoch or request.address != view.addresses[request.node_id]):
            self.stale_nodes.add(request.node_id)  # restarted without the plan, or at a new address
        log.info("node %s registered at %s (trusted=%s, epoch %d)", request.node_id, request.address,
                 record.trusted, request.plan_epoch)
        return pb.RegisterReply(trusted=record.trusted, cluster_id=self.co.config.cluster_id,
                                plan_public_key=self.co.public_key, key_id=key_id(self.co.signing_key.public_key()),
                                report_interval_ms=self.co.config.report_interval_ms)

    async def Report(self, request_iterator: AsyncIterator[pb.NodeReport],  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.NodeReport, pb.ReportAck]) -> pb.ReportAck:
        caller = await require_peer(context, tls_on=self.co.tls is not None, kinds=("node",), what="Report")
        node_id = ""
        registration = 0.0
        try:
            async for report in request_iterator:
                if caller is not None and report.node_id != caller.node_id:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"node {caller.node_id} may not report as {report.node_id!r}")
                record = self.co.registry.report(report)
                if record is None:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {report.node_id!r} must register")
                    raise AssertionError("unreachable")
                node_id, registration = record.node_id, record.registered_at
                if report.tokens:
                    self.co.observe_latency(report.token_latency_ms)
        finally:
            # A report stream only ends when the node process or its link is gone: treat it as dead now
            # rather than after the missed-report timeout (a node that comes back registers again).
            if node_id:
                self.co.registry.lost_stream(node_id, registration)
        return pb.ReportAck()

    async def GetPlan(self, request: pb.GetPlanRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.GetPlanRequest, pb.SignedPlan]) -> pb.SignedPlan:
        """The route for a new generation. UNAVAILABLE (the retryable status) with the reason while none
        exists: no plan yet, the head is gone, or a plan node or link is lost and no feasible plan remains
        (e.g. no live trusted node for the first segment). Clients fail in milliseconds instead of
        dialling a dead head; the control loop keeps re-planning, so a later request succeeds by itself."""
        problem = self.co.route_problem()
        if problem is not None or self.co.signed is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, problem or "no plan yet")
            raise AssertionError("unreachable")
        return self.co.signed


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, coordinator: Coordinator, adapter: Adapter) -> None:
        self.co = coordinator
        self.adapter = adapter

    async def Status(self, request: pb.StatusRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.StatusRequest, pb.StatusReply]) -> pb.StatusReply:
        serving, reason = self.co.serving()
        registry = self.co.registry
        nodes = [pb.NodeState(node_id=r.node_id, address=r.address, trusted=r.trusted,
                              alive=registry.alive(r.node_id), last_seen_s=registry.silent_for(r.node_id),
                              capacity=r.capacity, links=r.links, active_sessions=r.active_sessions,
                              plan_epoch=r.plan_epoch, drained=r.node_id in self.adapter.drained)
                 for r in sorted(registry.nodes.values(), key=lambda r: r.node_id)]
        # No EWMA (none measured since the plan changed) stays unset: 0.0 would read as perfect latency.
        reply = pb.StatusReply(serving=serving, reason=reason, nodes=nodes, model_name=self.co.model.manifest.name,
                               ewma_latency_ms=self.adapter.engine.ewma_ms)
        if self.co.signed is not None:
            reply.plan.ParseFromString(self.co.signed.plan_bytes)
        return reply

    async def Resplit(self, request: pb.ResplitRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.ResplitRequest, pb.ResplitReply]) -> pb.ResplitReply:
        alive = [r for r in self.co.registry.alive_nodes() if r.node_id not in self.adapter.drained]
        drained = sorted(set(request.placement) & self.adapter.drained)
        if drained:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{', '.join(drained)} is drained: return it first with `splitmesh drain "
                                f"{drained[0]} --undo`")
        try:
            if request.boundaries or request.placement:
                segments = place(alive, self.co.model.num_layers, list(request.boundaries), list(request.placement))
                how = "operator"
            else:
                segments, how = best_plan(self.adapter)
        except PlacementError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        before = self.adapter.predicted_ms(self.adapter.current_plan())
        after = self.adapter.predicted_ms(Plan.of(segments))
        if request.dry_run:
            return pb.ResplitReply(committed=False, plan=self.co.build_plan(segments, 0), reason=f"dry run: {how}",
                                   predicted_ms_old=before, predicted_ms_new=after)
        epoch_before = self.co.view.epoch if self.co.view else 0
        committed, reason, installed = await self.co.install(segments)
        self.adapter.record("operator", f"resplit requested ({how}): {reason}", None, epoch_before,
                            installed.epoch if committed and installed else 0, old_ms=before, new_ms=after)
        if not committed:
            await context.abort(grpc.StatusCode.ABORTED, f"plan aborted, previous plan stays: {reason}")
        reply = pb.ResplitReply(committed=True, reason=reason, predicted_ms_old=before, predicted_ms_new=after)
        if installed is not None:
            reply.plan.CopyFrom(installed)
        return reply

    async def History(self, request: pb.HistoryRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.HistoryRequest, pb.HistoryReply]) -> pb.HistoryReply:
        return pb.HistoryReply(decisions=self.co.state.decisions(min(request.limit or 50, 1000), set(request.kinds)))

    async def Drain(self, request: pb.DrainRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.DrainRequest, pb.DrainReply]) -> pb.DrainReply:
        if request.node_id not in self.co.registry.nodes:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown node {request.node_id!r}")
        self.adapter.set_drained(request.node_id, not request.undo)
        if request.undo or self.co.view is None or request.node_id not in self.co.view.node_ids():
            return pb.DrainReply(committed=False, reason="no plan change needed")
        try:
            segments, how = best_plan(self.adapter)
        except PlacementError as exc:
            self.adapter.set_drained(request.node_id, False)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot drain {request.node_id}: {exc}")
            raise AssertionError("unreachable") from exc
        epoch_before = self.co.view.epoch
        committed, reason, installed = await self.co.install(segments)
        self.adapter.record("operator", f"drain {request.node_id} ({how}): {reason}", None, epoch_before,
                            installed.epoch if committed and installed else 0)
        if not committed:
            self.adapter.set_drained(request.node_id, False)
            await context.abort(grpc.StatusCode.ABORTED, f"drain aborted, previous plan stays: {reason}")
        reply = pb.DrainReply(committed=True, reason=reason)
        if installed is not None:
            reply.plan.CopyFrom(installed)
        return reply

    async def Policy(self, request: pb.PolicyRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.PolicyRequest, pb.PolicyReply]) -> pb.PolicyReply:
        if not request.set:
            return pb.PolicyReply(values=policy_values(self.adapter.policy))
        try:
            values = self.adapter.set_policy(dict(request.set))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        self.adapter.record("operator", f"policy set: {dict(request.set)}", None,
                            self.co.view.epoch if self.co.view else 0, 0)
        return pb.PolicyReply(values=values)
