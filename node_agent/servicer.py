"""The Node gRPC service: generation at the head, the activation data plane, and plan handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from common.certs import Identity
from common.frame_crypto import FrameCryptoError
from common.hop_codec import HopReceiver, PlainHopReceiver, SealedHopReceiver
from common.model_store import StoreError
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.request_errors import field_metadata
from common.sealed_tokens import TokenReceiver
from common.tls import peer_identity
from common.weight_keys import WeightKeysError, open_sealed
from node_agent.forward_stream import ActivationReader, StreamError, crypto_status
from node_agent.generation import (
    ContextLengthError,
    RequestError,
    RequestLimits,
    check_request,
    generate,
    new_session_id,
    tokenize_request,
)
from node_agent.hops import HopError
from node_agent.memory import return_freed_memory
from node_agent.pipeline import SessionPipeline
from node_agent.plan_state import PlanRejected
from node_agent.read_ahead import read_ahead
from node_agent.row_routes import StreamInbox, activation_key, token_key
from node_agent.runtime import NodeRuntime, NotHostedError, SessionLimitError
from node_agent.sampler import SamplingConfig
from node_agent.token_ring import InboxError, TokenInbox
from node_agent.weight_fetch import ensure_files

log = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 64 << 20  # incoming tensor buffers above this, once all freed, are trimmed from the heap
TRIM_DELAY_S = 1.0


Opening = TypeVar("Opening")


async def _opening(requests: AsyncIterator[Opening], context: grpc.aio.ServicerContext[Any, Any], timeout_s: float,
                   what: str) -> Opening | None:
    """A stream's first message within the frame timeout (None: the peer closed at once), so a peer that
    opens a stream and goes quiet holds nothing for longer than that."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(requests, None)
    except TimeoutError:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no {what} within {timeout_s:g}s")
        raise AssertionError("unreachable") from None


async def _refuse(context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateEvent], exc: RequestError) -> None:
    """A request refused: OUT_OF_RANGE when it does not fit the context, else INVALID_ARGUMENT; the field at fault
    travels as trailing metadata (common.request_errors)."""
    code = grpc.StatusCode.OUT_OF_RANGE if isinstance(exc, ContextLengthError) else grpc.StatusCode.INVALID_ARGUMENT
    await context.abort(code, str(exc), trailing_metadata=field_metadata(exc.field, exc.limit))


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime
        self._trim: asyncio.Future[None] | None = None  # a pending heap trim after large incoming buffers

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
        owner = peer_identity(context)  # vetted by common.authz; None in dev mode
        manifest = self.rt.manifest(view.model_digest)
        limits = RequestLimits(vocab_size=int(manifest.config["vocab_size"]),
                               max_positions=int(manifest.config.get("max_position_embeddings", 2048)),
                               max_prompt_tokens=self.rt.config.max_prompt_tokens,
                               max_new_tokens=self.rt.config.max_new_tokens,
                               max_prompt_bytes=self.rt.config.max_prompt_bytes,
                               max_messages=self.rt.config.max_messages,
                               bos_token_id=manifest.config.get("bos_token_id"))
        try:
            check_request(request, manifest.has_tokenizer, limits)  # linear and bounded: fine on the loop
        except RequestError as exc:
            await _refuse(context, exc)
            return
        session_id = new_session_id()
        with contextlib.ExitStack() as held:
            try:
                # The slot and admission before any work: a request this head cannot take is refused at once.
                held.enter_context(self.rt.sessions.slot(session_id))
                self.rt.admission.admit(session_id)
            except SessionLimitError as exc:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                return
            held.callback(self.rt.admission.leave, session_id)
            generation = self.rt.generations.add(session_id, owner)
            held.callback(self.rt.generations.remove, session_id)
            try:
                async for event in self._generate(request, view, limits, session_id, context):
                    yield event
            except asyncio.CancelledError:
                if not generation.cancelled:
                    raise
                await context.abort(grpc.StatusCode.CANCELLED, f"session {session_id} was cancelled")

    async def _generate(self, request: pb.GenerateRequest, view: PlanView, limits: RequestLimits, session_id: str,
                        context: grpc.aio.ServicerContext[pb.GenerateRequest, pb.GenerateEvent],
                        ) -> AsyncIterator[pb.GenerateEvent]:
        loop = asyncio.get_running_loop()
        try:
            # Loading the tokenizer, tokenizing and the chat template take seconds on a large input: never on
            # the event loop, where they would stall every other session of this node.
            tokenizer = await loop.run_in_executor(self.rt.tokenizing, self.rt.tokenizer, view.model_digest)
            prepared = await loop.run_in_executor(self.rt.tokenizing, tokenize_request, request, tokenizer, limits,
                                                  self.rt.manifest(view.model_digest).config.get("eos_token_id"))
        except RequestError as exc:
            await _refuse(context, exc)
            return
        try:
            self.rt.admission.owe(session_id, len(prepared.prompt_ids))  # no await since the check: atomic
        except SessionLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            return
        try:
            # Token k goes out to the client while the ring already works on token k+1.
            async for event in read_ahead(generate(self.rt, view, prepared, tokenizer, session_id,
                                                 on_prefilled=self.rt.admission.prefilled)):
                yield event
        except SessionLimitError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except HopError as exc:
            log.warning("generation failed downstream: %s", exc.details)
            await context.abort(exc.code, exc.details)

    async def Cancel(self, request: pb.CancelRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext[pb.CancelRequest, pb.CancelReply]) -> pb.CancelReply:
        """Only the identity that opened a generation, or the orchestrator, may cancel it; anyone else gets
        the NOT_FOUND of an unknown id, so sessions cannot be probed (see node_agent/admission.py)."""
        caller = peer_identity(context)  # vetted by common.authz; None in dev mode
        if not self.rt.generations.cancel(request.session_id, caller):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown session {request.session_id[:64]!r}")
        return pb.CancelReply()

    # ------------------------------------------------------------ data plane
    async def Forward(self, request_iterator: AsyncIterator[pb.ForwardRequest],  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.ForwardRequest, pb.ForwardReply],
                      ) -> AsyncIterator[pb.ForwardReply]:
        """Activations in, nothing back per step: the stream ends with a status, this node's own refusal or
        the failure of a node after it (so the head learns it and replays)."""
        caller = peer_identity(context)  # a node (common.authz); it must feed this segment (_check_open)
        requests = aiter(request_iterator)
        first = await _opening(requests, context, self.rt.config.frame_timeout_s, "ForwardOpen")
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
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return
        downstream: asyncio.Future[HopError] = asyncio.get_running_loop().create_future()

        def failed(error: HopError) -> None:
            if not downstream.done():
                downstream.set_result(error)

        work = asyncio.ensure_future(self._serve_forward(requests, opening, view, receiver, sampling, failed,
                                                         None if caller is None else caller.node_id))
        try:
            either: set[asyncio.Future[Any]] = {work, downstream}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
        error: StreamError | HopError | None = downstream.result() if downstream.done() else None
        if error is None and not work.cancelled():
            problem = work.exception()
            if isinstance(problem, StreamError | HopError):
                error = problem
            elif problem is not None:
                raise problem
        if error is not None:
            await context.abort(error.code, error.details)
        for _ in ():  # activations flow one way: this stream yields no reply, it ends with its status
            yield pb.ForwardReply()

    async def _serve_forward(self, requests: AsyncIterator[pb.ForwardRequest], opening: pb.ForwardOpen,
                             view: PlanView, receiver: HopReceiver, sampling: SamplingConfig,
                             failed: Callable[[HopError], None], sender: str | None) -> None:
        """Run every activation of the stream, and of the rows its sender batches for it (node_agent/row_routes.py),
        through this node's segments and on; raises StreamError or HopError with the status to end the stream with."""
        reader = self._reader(view, receiver, opening.segment_index)
        pipeline: SessionPipeline | None = None
        inbox = StreamInbox(requests)
        try:
            with self.rt.rows.route(activation_key(opening.session_id, view.epoch, opening.segment_index), sender,
                                    inbox):
                async for step, position, tensor in reader.activations(inbox):
                    if pipeline is None:
                        # The slot is taken once there is work to run: a silent stream, or one that stops in
                        # the middle of a tensor, holds no slot (and is closed after the frame timeout).
                        pipeline = await self._open_pipeline(opening, view, sampling, failed)
                    await pipeline.step(step, position, tensor, reader.compute_s)
        finally:
            inbox.close()
            if pipeline is not None:
                self.rt.sessions.close(opening.session_id, opening.segment_index, opening.epoch, only=pipeline)
            self._trim_after_large_buffers()

    async def Deliver(self, request_iterator: AsyncIterator[pb.DeliverRequest],  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.DeliverRequest, pb.DeliverReply]) -> pb.DeliverReply:
        """The tail's sampled tokens of one session this node heads (node_agent/token_ring.py). A stream that
        is refused leaves the session alone; a stream that breaks after it was accepted fails the session's
        waiting step with its status, so the head replays (a tail killed mid-session)."""
        caller = peer_identity(context)  # a node (common.authz); it must be the plan's tail (_check_token_open)
        requests = aiter(request_iterator)
        first = await _opening(requests, context, self.rt.config.frame_timeout_s, "TokenOpen")
        if first is None:
            return pb.DeliverReply()
        if first.WhichOneof("msg") != "open":
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session: token frame before TokenOpen")
        try:
            view, inbox, receiver = self._check_token_open(first.open, caller)
        except StreamError as exc:
            await context.abort(exc.code, exc.details)
            raise AssertionError("unreachable") from exc
        vocab = int(self.rt.manifest(view.model_digest).config["vocab_size"])
        tail = view.segments[-1].node_id
        accepted = 0
        merged = StreamInbox(requests)  # the stream's tokens and those the tail batches on its rows stream
        try:
            with self.rt.rows.route(token_key(first.open.session_id, view.epoch),
                                    None if caller is None else caller.node_id, merged):
                accepted = await self._take_tokens(merged, inbox, receiver, vocab)
        except StreamError as exc:
            inbox.fail(HopError(exc.code, f"token stream from {tail}: {exc.details}"))
            await context.abort(exc.code, exc.details)
        finally:
            merged.close()
            inbox.fail(HopError(grpc.StatusCode.UNAVAILABLE, f"the token stream from {tail} ended"))
        return pb.DeliverReply(tokens=accepted)

    async def Rows(self, request_iterator: AsyncIterator[pb.RowBatch],  # noqa: N802
                   context: grpc.aio.ServicerContext[pb.RowBatch, pb.RowBatchAck]) -> pb.RowBatchAck:
        """Batched rows of many sessions from one node: each goes to the stream that node opened for its session
        (node_agent/row_routes.py), where the stream's own checks judge it; rows of no such stream are dropped."""
        caller = peer_identity(context)  # a node (common.authz)
        sender = None if caller is None else caller.node_id
        most = 4 * self.rt.config.max_sessions  # a few forwards' rows may leave in one message, never more
        taken = 0
        async for batch in request_iterator:
            rows = len(batch.activations) + len(batch.tokens)
            if rows > most:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"a row batch of {rows} rows; this node takes at most {most} in one message")
            for row in batch.activations:
                taken += self.rt.rows.deliver(activation_key(row.session_id, row.epoch, row.segment_index), sender,
                                              list(row.messages))
            for token in batch.tokens:
                taken += self.rt.rows.deliver(token_key(token.session_id, token.epoch), sender,
                                              [pb.DeliverRequest(token=token.token)])
        return pb.RowBatchAck(rows=taken)

    async def _take_tokens(self, requests: AsyncIterator[pb.DeliverRequest], inbox: TokenInbox,
                           receiver: TokenReceiver, vocab: int) -> int:
        """Feed the inbox until the tail ends the stream; returns the tokens taken."""
        idle_s = self.rt.config.session_idle_timeout_s
        taken = 0
        while True:
            try:
                async with asyncio.timeout(idle_s):
                    message = await anext(requests, None)
            except TimeoutError:
                raise StreamError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"the token stream was idle for {idle_s:g}s") from None
            if message is None:
                return taken
            if message.WhichOneof("msg") != "token":
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, "only token frames may follow the open")
            try:
                step, token = receiver.open(message.token)
            except FrameCryptoError as exc:
                raise crypto_status(exc) from exc
            if token >= vocab:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, f"token id {token} outside the vocabulary")
            try:
                inbox.deliver(step, token, message.token.compute_s)
            except InboxError as exc:
                raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            taken += 1

    def _check_token_open(self, opening: pb.TokenOpen, caller: Identity | None,
                          ) -> tuple[PlanView, TokenInbox, TokenReceiver]:
        """The inbox a TokenOpen feeds, checked before it is attached: this node heads the plan, the caller
        is its tail, the session waits here and has no token stream yet, and the key envelope opens."""
        view = self.rt.plans.plan(opening.epoch)
        if view is None:
            committed = self.rt.plans.committed.epoch if self.rt.plans.committed else 0
            code = grpc.StatusCode.UNAVAILABLE if opening.epoch > committed else grpc.StatusCode.FAILED_PRECONDITION
            raise StreamError(code, f"epoch {opening.epoch} is not known here (committed: {committed})")
        if view.head.node_id != self.rt.node_id:
            raise StreamError(grpc.StatusCode.FAILED_PRECONDITION,
                              f"node {self.rt.node_id} is not the head of epoch {view.epoch}")
        tail = view.segments[-1].node_id
        if caller is not None and caller.node_id != tail:
            raise StreamError(grpc.StatusCode.PERMISSION_DENIED,
                              f"epoch {view.epoch} takes tokens only from its tail {tail}, not {caller.node_id}")
        inbox = self.rt.inboxes.get(opening.session_id, view.epoch)
        if inbox is None:
            raise StreamError(grpc.StatusCode.NOT_FOUND, f"unknown session {opening.session_id[:64]!r}")
        if inbox.attached:
            raise StreamError(grpc.StatusCode.ABORTED,
                              f"session {opening.session_id[:8]} already has its token stream on epoch {view.epoch}")
        if not opening.key_envelope and self.rt.config.encrypt_activations:
            raise StreamError(grpc.StatusCode.UNAUTHENTICATED, "this node accepts only sealed tokens (no key envelope)")
        try:
            receiver = TokenReceiver(self.rt.node_key if opening.key_envelope else None, opening.key_envelope,
                                     opening.session_id, view.epoch)
        except FrameCryptoError as exc:
            raise crypto_status(exc) from exc
        inbox.attached = True
        return view, inbox, receiver

    def _reader(self, view: PlanView, receiver: HopReceiver, segment_index: int) -> ActivationReader:
        """The stream's activation reader, with the model's limits (known before any segment is touched)."""
        manifest = self.rt.manifest(view.model_digest)
        model_config = manifest.config
        max_positions = int(model_config.get("max_position_embeddings", 2048))
        max_rows = min(self.rt.config.max_prompt_tokens + self.rt.config.max_new_tokens,  # a replayed history
                       max_positions)
        return ActivationReader(receiver, int(model_config["hidden_size"]), max_rows,
                                self.rt.config.session_idle_timeout_s, max_positions=max_positions,
                                frame_timeout_s=self.rt.config.frame_timeout_s,
                                dtype=manifest.compute_dtype, segment_index=segment_index)

    async def _open_pipeline(self, opening: pb.ForwardOpen, view: PlanView, sampling: SamplingConfig,
                             failed: Callable[[HopError], None]) -> SessionPipeline:
        try:
            return await self.rt.sessions.open(opening.session_id, view, opening.segment_index, sampling, failed)
        except NotHostedError as exc:
            raise StreamError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        except SessionLimitError as exc:
            raise StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from exc
        except StoreError as exc:  # a replaced plan's segment, released after its drain (keys forgotten)
            raise StreamError(grpc.StatusCode.UNAVAILABLE, f"epoch {view.epoch}'s segment "
                              f"{opening.segment_index} is not held here any more: {exc}") from exc
        except ValueError as exc:
            raise StreamError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc

    def _trim_after_large_buffers(self) -> None:
        """Once no tensor is being received after many megabytes were, hand the freed heap back to the OS:
        glibc keeps it otherwise (its mmap threshold rises after large frees), and the node would look as
        if a burst of oversized streams still held its memory. The trim waits a moment so the buffers of
        the streams ending together are all freed first."""
        if self._trim is None and self.rt.buffers.in_use == 0 and self.rt.buffers.peak >= TRIM_AFTER_BYTES:
            self._trim = asyncio.ensure_future(self._trim_soon())

    async def _trim_soon(self) -> None:
        try:
            await asyncio.sleep(TRIM_DELAY_S)
            if self.rt.buffers.in_use == 0:
                self.rt.buffers.take_peak()
                await asyncio.get_running_loop().run_in_executor(None, return_freed_memory)
        finally:
            self._trim = None

    def _check_open(self, opening: pb.ForwardOpen, caller: Identity | None,
                    ) -> tuple[PlanView, HopReceiver]:
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
            return view, PlainHopReceiver(self.rt.buffers)
        try:
            receiver = SealedHopReceiver(self.rt.node_key, opening.key_envelope, opening.session_id, view.epoch,
                                         index, self.rt.buffers)
        except FrameCryptoError as exc:
            raise crypto_status(exc) from exc
        return view, receiver

    # ------------------------------------------------------------ plans
    async def Prepare(self, request: pb.PrepareRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext[pb.PrepareRequest, pb.PrepareReply]) -> pb.PrepareReply:
        try:
            view = self.rt.plans.verify(request.plan)
        except PlanRejected as exc:
            log.warning("rejected plan: %s", exc.reason)
            await context.abort(getattr(grpc.StatusCode, exc.code), exc.reason)
            raise AssertionError("unreachable") from exc
        if view is None:
            return pb.PrepareReply(ok=True, reason="already accepted")
        problem = self.rt.frame_key_problem(view)
        if problem is not None:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {problem}")
        try:
            keys = open_sealed(request.weight_keys, self.rt.node_key, cluster_id=view.cluster_id, epoch=view.epoch,
                               model_digest=view.model_digest, node_id=self.rt.node_id)
        except WeightKeysError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable") from exc
        spans = [s.span for s in view.segments_on(self.rt.node_id)]
        try:
            fetched = await ensure_files(self.rt.store, self.rt.orchestrator_channel(), view.model_digest, spans)
        except grpc.aio.AioRpcError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: cannot fetch model files: {exc.details()}")
        except StoreError as exc:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: {exc}")
        if fetched:
            log.info("epoch %d: fetched %.1f MB of weights", view.epoch, fetched / 1e6)
        hosted = self.rt.plans.hosted_blobs(view)
        extra = sorted(set(keys) - set(hosted))
        if extra:  # the orchestrator sends exactly the hosted layers' keys: anything else is refused whole
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"weight keys for {len(extra)} blob(s) of no segment epoch {view.epoch} gives "
                                f"{self.rt.node_id} (first {extra[0][:12]})")
        missing = sorted(hosted[sha] for sha in set(hosted) - set(keys))
        if missing:
            return pb.PrepareReply(ok=False, reason=f"{self.rt.node_id}: no weight key for encrypted {missing[0]} "
                                                    f"(and {len(missing) - 1} more)")
        self.rt.plans.grant(view.epoch, keys)
        try:
            # Loading runs beside the compute thread, so sessions keep generating while a plan is prepared.
            await asyncio.get_running_loop().run_in_executor(None, self.rt.plans.prepare_blocking, view, request.plan)
        except (OSError, ValueError, RuntimeError, StoreError) as exc:
            self.rt.plans.forget(view.epoch)
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

    async def Probe(self, request: pb.ProbeRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext[pb.ProbeRequest, pb.ProbeReply]) -> pb.ProbeReply:
        return pb.ProbeReply(received_bytes=len(request.payload), compute_rounds=self.rt.compute.rounds_done)

    async def Info(self, request: pb.NodeInfoRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext[pb.NodeInfoRequest, pb.NodeInfoReply]) -> pb.NodeInfoReply:
        view = self.rt.plans.committed
        hosted = [] if view is None else [
            pb.PlanSegment(start=s.span.start, end=s.span.end, node_id=s.node_id, privacy_critical=s.privacy_critical)
            for s in view.segments_on(self.rt.node_id)]
        return pb.NodeInfoReply(node_id=self.rt.node_id, plan_epoch=view.epoch if view else 0, hosted=hosted,
                                active_sessions=len(self.rt.sessions), loaded_layers=self.rt.pool.loaded_roles(),
                                weight_keys_held=sorted(self.rt.weight_keys))
