"""The Orchestrator (nodes) and Admin (CLI, SDK) gRPC services: thin translations to the controller."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from common.plan_signing import key_id
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import peer_identity
from orchestrator.controller import ControlError, Controller
from orchestrator.coordinator import Coordinator
from orchestrator.policy import PolicyError, policy_values
from orchestrator.report_checks import registration_problem, report_problem

log = logging.getLogger(__name__)


class OrchestratorServicer(pb_grpc.OrchestratorServicer):
    def __init__(self, coordinator: Coordinator, controller: Controller) -> None:
        self.co = coordinator
        self.controller = controller

    async def _refuse(self, context: grpc.aio.ServicerContext[Any, Any], node_id: str, what: str,
                      problem: str) -> None:
        self.co.registry.refuse(node_id, f"{what}: {problem}")
        log.warning("refused the %s of node %r: %s", what, node_id[:64], problem)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} refused: {problem}")

    async def Register(self, request: pb.RegisterRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext[pb.RegisterRequest, pb.RegisterReply]) -> pb.RegisterReply:
        # The certificate must name the node it registers: trust (from our config) binds to that identity.
        # (That the caller holds a node certificate at all is common.authz's table.)
        caller = peer_identity(context)
        if caller is not None and caller.node_id != request.node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node {caller.node_id} may not register as {request.node_id!r}")
        problem = registration_problem(request)
        if problem is not None:
            await self._refuse(context, request.node_id, "registration", problem)
        if self.co.model.digest not in request.model_digests:
            log.warning("node %s lacks model %s in its store", request.node_id, self.co.model.digest[:12])
        record = self.co.registry.register(request)
        self.co.state.remember_node(request.node_id, request.address)
        self.controller.note_registration(request)
        log.info("node %s registered at %s (trusted=%s, epoch %d)", request.node_id, request.address,
                 record.trusted, request.plan_epoch)
        return pb.RegisterReply(trusted=record.trusted, cluster_id=self.co.config.cluster_id,
                                plan_public_key=self.co.public_key, key_id=key_id(self.co.signing_key.public_key()),
                                report_interval_ms=self.co.config.report_interval_ms)

    async def WeightKeys(self, request: pb.WeightKeysRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext[pb.WeightKeysRequest, pb.WeightKeysReply],
                         ) -> pb.WeightKeysReply:
        """A restarted node's keys for the segments it hosts in a current plan, sealed to its key in that plan."""
        caller = peer_identity(context)
        if caller is not None and caller.node_id != request.node_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"node {caller.node_id} may not ask for the keys of {request.node_id[:64]!r}")
        view = self.co.plan_for_keys(request.epoch)
        if view is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"epoch {request.epoch} is neither committed nor being prepared")
            raise AssertionError("unreachable")
        if not view.segments_on(request.node_id):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"epoch {view.epoch} gives {request.node_id[:64]!r} no segment")
        try:
            return pb.WeightKeysReply(weight_keys=self.co.sealed_weight_keys(view, request.node_id))
        except KeyError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the store holds no key for blob {exc}")
            raise AssertionError("unreachable") from exc
        except ValueError as exc:  # the plan carries no valid X25519 key for this node
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot seal weight keys to "
                                f"{request.node_id[:64]!r}: {exc}")
            raise AssertionError("unreachable") from exc

    async def Report(self, request_iterator: AsyncIterator[pb.NodeReport],  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.NodeReport, pb.ReportAck]) -> pb.ReportAck:
        caller = peer_identity(context)  # a node (common.authz); it may report only about itself
        node_id = ""
        registration = 0.0
        try:
            async for report in request_iterator:
                if caller is not None and report.node_id != caller.node_id:
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        f"node {caller.node_id} may not report as {report.node_id!r}")
                if report.node_id not in self.co.registry.nodes:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"node {report.node_id!r} must register")
                problem = report_problem(report)
                if problem is not None:  # nothing of it is stored: the cost model never sees it
                    await self._refuse(context, report.node_id, "report", problem)
                record = self.co.registry.report(report)
                if record is None:
                    raise AssertionError("unreachable: checked above")
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
    """Translates Admin calls to the controller; who may call which is common.authz's table."""

    def __init__(self, coordinator: Coordinator, controller: Controller) -> None:
        self.co = coordinator
        self.controller = controller

    async def Status(self, request: pb.StatusRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.StatusRequest, pb.StatusReply]) -> pb.StatusReply:
        serving, reason = self.co.serving()
        registry = self.co.registry
        refused = registry.refused
        drained = self.controller.adapter.drained
        nodes = [pb.NodeState(node_id=r.node_id, address=r.address, trusted=r.trusted,
                              alive=registry.alive(r.node_id), last_seen_s=registry.silent_for(r.node_id),
                              capacity=r.capacity, links=r.links, active_sessions=r.active_sessions,
                              plan_epoch=r.plan_epoch,
                              refused_reports=refused[r.node_id].count if r.node_id in refused else 0,
                              refused_reason=refused[r.node_id].reason if r.node_id in refused else "",
                              drained=r.node_id in drained)
                 for r in sorted(registry.nodes.values(), key=lambda r: r.node_id)]
        # No EWMA (none measured since the plan changed) stays unset: 0.0 would read as perfect latency.
        reply = pb.StatusReply(serving=serving, reason=reason, nodes=nodes, model_name=self.co.model.manifest.name,
                               ewma_latency_ms=self.controller.adapter.engine.ewma_ms)
        if self.co.signed is not None:
            reply.plan.ParseFromString(self.co.signed.plan_bytes)
        return reply

    async def Resplit(self, request: pb.ResplitRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.ResplitRequest, pb.ResplitReply]) -> pb.ResplitReply:
        try:
            return await self.controller.resplit(list(request.boundaries), list(request.placement), request.dry_run)
        except ControlError as exc:
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from exc

    async def History(self, request: pb.HistoryRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.HistoryRequest, pb.HistoryReply]) -> pb.HistoryReply:
        return pb.HistoryReply(decisions=self.co.state.decisions(min(request.limit or 50, 1000), set(request.kinds)))

    async def Drain(self, request: pb.DrainRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.DrainRequest, pb.DrainReply]) -> pb.DrainReply:
        try:
            return await self.controller.drain(request.node_id, request.undo)
        except ControlError as exc:
            await context.abort(exc.code, exc.message)
            raise AssertionError("unreachable") from exc

    async def GetPolicy(self, request: pb.GetPolicyRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext[pb.GetPolicyRequest, pb.PolicyReply]) -> pb.PolicyReply:
        return pb.PolicyReply(values=policy_values(self.controller.adapter.policy))

    async def SetPolicy(self, request: pb.SetPolicyRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext[pb.SetPolicyRequest, pb.PolicyReply]) -> pb.PolicyReply:
        if not request.set:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SetPolicy needs at least one name=value")
        try:
            values = self.controller.set_policy(dict(request.set))
        except PolicyError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        return pb.PolicyReply(values=values)
