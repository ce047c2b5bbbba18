"""The Node gRPC service: generation at the head, the activation data plane, and plan handling."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from common.model_store import StoreError
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tensor_codec import TensorAssembler, TensorError, check_activation
from node_agent.generation import RequestError, generate, prepare_request
from node_agent.pipeline import HopError
from node_agent.plan_state import PlanRejected
from node_agent.runtime import NodeRuntime, NotHostedError, SessionLimitError
from node_agent.sampler import SamplingConfig
from node_agent.weight_fetch import ensure_files

log = logging.getLogger(__name__)


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime

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
        runner_config = self.rt.store.open(view.model_digest).manifest.config
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
            async for event in generate(self.rt, view, prepared, tokenizer):
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
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("msg") != "open":
            frame_session = "" if first.WhichOneof("msg") is None else "before ForwardOpen"
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session: activation frame {frame_session}".strip())
            return
        opening = first.open
        view = self.rt.plans.plan(opening.epoch)
        if view is None:
            committed = self.rt.plans.committed.epoch if self.rt.plans.committed else 0
            code = grpc.StatusCode.UNAVAILABLE if opening.epoch > committed else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, f"epoch {opening.epoch} is not known here (committed: {committed})")
            return
        if not 0 < opening.segment_index < len(view.segments) or not opening.session_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"bad ForwardOpen: segment {opening.segment_index}, session {opening.session_id!r}")
            return
        s = opening.sampling
        sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p if s.top_p > 0 else 1.0,
                                  top_k=s.top_k, seed=s.seed)
        try:
            sampling.validate()
            pipeline = await self.rt.open_session(opening.session_id, view, opening.segment_index, sampling)
        except NotHostedError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            return
        except SessionLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        hidden_size = pipeline.runners[0].hidden_size
        max_rows = self.rt.config.max_prompt_tokens + self.rt.config.max_new_tokens  # a replayed history
        assembler = TensorAssembler()
        expected_seq = 0
        expected_step: int | None = None  # a stream opened by a replay starts at the step it resumes
        try:
            async for message in request_iterator:
                if message.WhichOneof("msg") != "frame":
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only activation frames may follow the open")
                    return
                frame = message.frame
                if frame.seq != expected_seq:
                    await context.abort(grpc.StatusCode.ABORTED, f"frame seq {frame.seq}, expected {expected_seq}")
                    return
                expected_seq += 1
                if expected_step is not None and frame.step != expected_step:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"step {frame.step}, expected {expected_step}")
                    return
                try:
                    tensor = assembler.add(frame.tensor)
                    if tensor is None:
                        continue
                    check_activation(tensor, hidden_size, max_rows)
                except TensorError as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                token = await pipeline.step(frame.step, frame.position, tensor.to(pipeline.runners[0].dtype))
                expected_step = frame.step + 1
                yield pb.ForwardReply(step=frame.step, token_id=token)
        except HopError as exc:
            await context.abort(exc.code, exc.details)
        finally:
            self.rt.close_session(opening.session_id, opening.segment_index)

    # ------------------------------------------------------------ plans
    async def Prepare(self, request: pb.SignedPlan,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.SignedPlan, pb.PrepareReply]) -> pb.PrepareReply:
        try:
            view = self.rt.plans.verify(request)
        except PlanRejected as exc:
            log.warning("rejected plan: %s", exc.reason)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.reason)
            raise AssertionError("unreachable") from exc
        if view is None:
            return pb.PrepareReply(ok=True, reason="already accepted")
        spans = [s.span for s in view.segments_on(self.rt.node_id)]
        try:
            fetched = await ensure_files(self.rt.store, self.rt.config.orchestrator, view.model_digest, spans)
        except grpc.aio.AioRpcError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: cannot fetch model files: {exc.details()}")
        except StoreError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {exc}")
        if fetched:
            log.info("epoch %d: fetched %.1f MB of weights", view.epoch, fetched / 1e6)
        try:
            await self.rt.compute.run(self.rt.plans.prepare_blocking, view, request.plan_bytes)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot prepare epoch %d: %s", view.epoch, exc)
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {exc}")
        return pb.PrepareReply(ok=True)

    async def Commit(self, request: pb.CommitRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.CommitRequest, pb.CommitReply]) -> pb.CommitReply:
        if not self.rt.plans.commit(request.epoch):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"epoch {request.epoch} was not prepared here")
        return pb.CommitReply()

    async def Abort(self, request: pb.CommitRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.CommitRequest, pb.CommitReply]) -> pb.CommitReply:
        self.rt.plans.abort(request.epoch)
        return pb.CommitReply()

    async def Info(self, request: pb.NodeInfoRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext[pb.NodeInfoRequest, pb.NodeInfoReply]) -> pb.NodeInfoReply:
        view = self.rt.plans.committed
        hosted = [] if view is None else [
            pb.PlanSegment(start=s.span.start, end=s.span.end, node_id=s.node_id, privacy_critical=s.privacy_critical)
            for s in view.segments_on(self.rt.node_id)]
        return pb.NodeInfoReply(node_id=self.rt.node_id, plan_epoch=view.epoch if view else 0, hosted=hosted,
                                active_sessions=len(self.rt.sessions), loaded_layers=self.rt.pool.loaded_roles())
