"""The Node gRPC service: generation at the head, the activation data plane, and plan handling."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from common.authz import require_peer
from common.certs import Identity
from common.frame_crypto import FrameCryptoError
from common.model_store import StoreError
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.sealed_frames import SealedHopReceiver
from node_agent.forward_stream import ActivationReader, StreamError, crypto_status
from node_agent.generation import RequestError, generate, prepare_request
from node_agent.pipeline import HopError
from node_agent.plan_state import PlanRejected
from node_agent.read_ahead import read_ahead
from node_agent.runtime import NodeRuntime, NotHostedError, SessionLimitError
from node_agent.sampler import SamplingConfig
from node_agent.weight_fetch import ensure_files

log = logging.getLogger(__name__)


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self._tls_on = runtime.tls is not None

    async def _require_orchestrator(self, context: grpc.aio.ServicerContext[object, object], what: str) -> None:
        """Plans come only from the configured orchestrator's certificate (their signature is checked too)."""
        await require_peer(context, tls_on=self._tls_on, kinds=("orchestrator",),
                           node_id=self.rt.config.orchestrator_id, what=what)

    # ------------------------------------------------------------ generation
    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802 - gRPC method name
                       context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateEvent],
                       ) -> AsyncIterator[pb.GenerateEvent]:
        view = self.rt.plans.committed
        if view is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no committed plan yet")
            return
        if view.head.node_id != self.rt.node_id:
            head = view.head.node_id
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"node {self.rt.node_id} is not the head of epoch {view.epoch}; the head is {head}")
            return
        runner_config = self.rt.manifest(view.model_digest).config
        try:
            tokenizer = self.rt.tokenizer(view.model_digest)
            prepared = prepare_request(
                request, tokenizer, vocab_size=int(runner_config["vocab_size"]),
                max_positions=int(runner_config.get("max_position_embeddings", 2048)),
                max_prompt_tokens=self.rt.config.max_prompt_tokens,
                max_new_tokens_limit=self.rt.config.max_new_tokens, config_eos=runner_config.get("eos_token_id"))
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        try:
            # Token k goes out to the client while the ring already works on token k+1.
            async for event in read_ahead(generate(self.rt, view, prepared, tokenizer)):
                yield event
        except SessionLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except HopError as exc:
            log.warning("generation failed downstream: %s", exc.details)
            await context.abort(exc.code, exc.details)

    async def Cancel(self, request: pb.CancelRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.CancelRequest, pb.CancelReply]) -> pb.CancelReply:
        if request.session_id not in self.rt.session_ids():
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id!r}")
        self.rt.close_session(request.session_id)
        return pb.CancelReply()

    # ------------------------------------------------------------ data plane
    async def Forward(self, request_iterator: AsyncIterator[pb.ForwardRequest],  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.ForwardRequest, pb.ForwardReply],
                      ) -> AsyncIterator[pb.ForwardReply]:
        caller = await require_peer(context, tls_on=self._tls_on, kinds=("node",), what="Forward")
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("msg") != "open":
            frame_session = "" if first.WhichOneof("msg") is None else "before ForwardOpen"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session: activation frame {frame_session}".strip())
            return
        opening = first.open
        try:
            view, receiver = self._check_open(opening, caller)
        except StreamError as exc:
            await context.abort(exc.code, exc.details)
            return
        sampling = SamplingConfig.from_proto(opening.sampling)
        try:
            sampling.validate()
            pipeline = await self.rt.open_session(opening.session_id, view, opening.segment_index, sampling)
        except NotHostedError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        except SessionLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        except HopError as exc:
            await context.abort(exc.code, exc.details)
            return
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        max_rows = self.rt.config.max_prompt_tokens + self.rt.config.max_new_tokens  # a replayed history
        reader = ActivationReader(receiver, pipeline.runners[0].hidden_size, max_rows,
                                  self.rt.config.session_idle_timeout_s)
        dtype = pipeline.runners[0].dtype
        try:
            async for step, position, tensor in reader.activations(request_iterator):
                if tensor.dtype != dtype:  # a plan runs one model in one dtype: a mismatch is a broken peer
                    raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"activation in {str(tensor.dtype).removeprefix('torch.')}, but segment "
                                      f"{opening.segment_index} computes in {str(dtype).removeprefix('torch.')}")
                started = time.perf_counter()
                token = await pipeline.step(step, position, tensor)
                yield pb.ForwardReply(step=step, token_id=token, downstream_s=time.perf_counter() - started)
        except (StreamError, HopError) as exc:
            await context.abort(exc.code, exc.details)
        finally:
            self.rt.close_session(opening.session_id, opening.segment_index, opening.epoch, only=pipeline)

    def _check_open(self, opening: pb.ForwardOpen, caller: Identity | None,
                    ) -> tuple[PlanView, SealedHopReceiver | None]:
        """The plan and frame receiver of a ForwardOpen, checked before any session state is allocated."""
        view = self.rt.plans.plan(opening.epoch)
        if view is None:
            committed = self.rt.plans.committed.epoch if self.rt.plans.committed else 0
            code = grpc.StatusCode.UNAVAILABLE if opening.epoch > committed else grpc.StatusCode.FAILED_PRECONDITION
            raise StreamError(code, f"epoch {opening.epoch} is not known here (committed: {committed})")
        index = opening.segment_index
        if not 0 < index < len(view.segments) or not opening.session_id:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT,
                              f"bad ForwardOpen: segment {index}, session {opening.session_id!r}")
        if view.segments[index].node_id != self.rt.node_id:
            raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"epoch {view.epoch} places segment {index} on {view.segments[index].node_id}")
        sender = view.segments[index - 1].node_id
        if caller is not None and caller.node_id != sender:
            raise StreamError(grpc.StatusCode.PERMISSION_DENIED,
                              f"segment {index} of epoch {view.epoch} takes activations only from {sender}, "
                              f"not {caller.node_id}")
        if not opening.key_envelope:
            if self.rt.config.encrypt_activations:
                raise StreamError(grpc.StatusCode.UNAUTHENTICATED,
                                  "this node accepts only encrypted activation streams (no key envelope)")
            return view, None
        try:
            receiver = SealedHopReceiver(self.rt.node_key, opening.key_envelope, opening.session_id, view.epoch, index)
        except FrameCryptoError as exc:
            raise crypto_status(exc) from exc
        return view, receiver

    # ------------------------------------------------------------ plans
    async def Prepare(self, request: pb.SignedPlan,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.SignedPlan, pb.PrepareReply]) -> pb.PrepareReply:
        await self._require_orchestrator(context, "Prepare")
        try:
            view = self.rt.plans.verify(request)
        except PlanRejected as exc:
            log.warning("rejected plan: %s", exc.reason)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.reason)
            raise AssertionError("unreachable") from exc
        if view is None:
            return pb.PrepareReply(ok=True, reason="already accepted")
        problem = self.rt.frame_key_problem(view)
        if problem is not None:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {problem}")
        spans = [s.span for s in view.segments_on(self.rt.node_id)]
        try:
            fetched = await ensure_files(self.rt.store, self.rt.orchestrator_channel(), view.model_digest, spans)
        except grpc.aio.AioRpcError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: cannot fetch model files: {exc.details()}")
        except StoreError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {exc}")
        if fetched:
            log.info("epoch %d: fetched %.1f MB of weights", view.epoch, fetched / 1e6)
        try:
            # Loading runs beside the compute thread, so sessions keep generating while a plan is prepared.
            await asyncio.get_running_loop().run_in_executor(None, self.rt.plans.prepare_blocking, view, request)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot prepare epoch %d: %s", view.epoch, exc)
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {exc}")
        return pb.PrepareReply(ok=True)

    async def Commit(self, request: pb.CommitRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.CommitRequest, pb.CommitReply]) -> pb.CommitReply:
        await self._require_orchestrator(context, "Commit")
        if not self.rt.plans.commit(request.epoch):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"epoch {request.epoch} was not prepared here")
        return pb.CommitReply()

    async def Abort(self, request: pb.CommitRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.CommitRequest, pb.CommitReply]) -> pb.CommitReply:
        await self._require_orchestrator(context, "Abort")
        self.rt.plans.abort(request.epoch)
        return pb.CommitReply()

    async def Probe(self, request: pb.ProbeRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.ProbeRequest, pb.ProbeReply]) -> pb.ProbeReply:
        return pb.ProbeReply(received_bytes=len(request.payload))

    async def Info(self, request: pb.NodeInfoRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext[pb.NodeInfoRequest, pb.NodeInfoReply]) -> pb.NodeInfoReply:
        view = self.rt.plans.committed
        hosted = [] if view is None else [
            pb.PlanSegment(start=s.span.start, end=s.span.end, node_id=s.node_id, privacy_critical=s.privacy_critical)
            for s in view.segments_on(self.rt.node_id)]
        return pb.NodeInfoReply(node_id=self.rt.node_id, plan_epoch=view.epoch if view else 0, hosted=hosted,
                                active_sessions=len(self.rt.sessions), loaded_layers=self.rt.pool.loaded_roles())
