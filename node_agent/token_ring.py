"""How the sampled token closes the ring: from the tail straight to the head, never through a middle node.

The head keeps one :class:`TokenInbox` per session and plan (the step it waits for); the tail hands each
token to a sink: :class:`LocalTokenSink` when it is the head itself, else :class:`RemoteTokenSink`, a
``Deliver`` stream to the head sealed to the head's key from the plan (common/sealed_tokens.py). The stream
opens with the session's first token; the later ones of a batch reach the head together, as one message on
the head's rows stream (node_agent/row_link.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.sealed_tokens import TokenSender
from node_agent.hops import HopError, broken_hop_code
from node_agent.outbound_stream import OutboundStream
from node_agent.row_link import RowLink

log = logging.getLogger(__name__)

Delivered = tuple[int, float]  # (token id, seconds of compute the step had after the head)


class InboxError(Exception):
    """A token the inbox did not ask for (a broken or hostile tail): the stream carrying it must end."""


class TokenInbox:
    """The head's mailbox for one session on one plan: at most one step waits, one stream feeds it."""

    def __init__(self, session_id: str, epoch: int) -> None:
        self.session_id = session_id
        self.epoch = epoch
        self.attached = False  # a token stream (or the head's own tail) feeds this inbox
        self.closed = False
        self._step = -1
        self._waiter: asyncio.Future[Delivered] | None = None
        self._failure: HopError | None = None

    def expect(self, step: int) -> asyncio.Future[Delivered]:
        """The future of ``step``'s token; call it before the step's activation leaves the head."""
        if self._failure is not None:
            raise self._failure
        self._step = step
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def deliver(self, step: int, token_id: int, compute_s: float) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done() or step != self._step:
            raise InboxError(f"token for step {step}, but the head waits for "
                             f"{'no step' if waiter is None or waiter.done() else f'step {self._step}'}")
        self._waiter = None
        waiter.set_result((token_id, compute_s))

    def fail(self, error: HopError) -> None:
        """The path broke: the waiting step (and any later one) gets ``error``; the first failure wins."""
        if self.closed or self._failure is not None:
            return
        self._failure = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
            self._waiter.exception()  # retrieved here: a step cancelled meanwhile must not log it as lost


class TokenInboxes:
    """Every inbox of the sessions this node heads, by (session id, epoch)."""

    def __init__(self) -> None:
        self._inboxes: dict[tuple[str, int], TokenInbox] = {}

    def open(self, session_id: str, epoch: int) -> TokenInbox:
        old = self._inboxes.get((session_id, epoch))
        if old is not None:
            self.close(old)
        inbox = self._inboxes[(session_id, epoch)] = TokenInbox(session_id, epoch)
        return inbox

    def get(self, session_id: str, epoch: int) -> TokenInbox | None:
        return self._inboxes.get((session_id, epoch))

    def close(self, inbox: TokenInbox) -> None:
        inbox.closed = True
        if self._inboxes.get((inbox.session_id, inbox.epoch)) is inbox:
            del self._inboxes[(inbox.session_id, inbox.epoch)]

    def __len__(self) -> int:
        return len(self._inboxes)


class LocalTokenSink:
    """The tail runs on the head's node (the head also hosts the last segment): the token stays in-process."""

    def __init__(self, inboxes: TokenInboxes, session_id: str, epoch: int) -> None:
        self._inboxes = inboxes
        self._session_id = session_id
        self._epoch = epoch

    async def send(self, step: int, token_id: int, compute_s: float, batched: bool = False) -> None:
        inbox = self._inboxes.get(self._session_id, self._epoch)
        if inbox is None:
            raise HopError(grpc.StatusCode.NOT_FOUND, f"session {self._session_id[:8]} has ended at its head")
        inbox.attached = True  # no Deliver stream may feed it besides
        try:
            inbox.deliver(step, token_id, compute_s)
        except InboxError as exc:
            raise HopError(grpc.StatusCode.INTERNAL, str(exc)) from exc

    def close(self) -> None:
        return


class RemoteTokenSink:
    """The tail's ``Deliver`` stream to the head for one session on one plan.

    One stream per session, not one per peer multiplexing every session: the key envelope, its sequence
    numbers and the stream's end then belong to exactly one session, so a replay or a failure never has
    to be untangled from other sessions' tokens, and closing the session closes its stream. The streams
    share the one HTTP/2 connection to the head (:class:`node_agent.pipeline.ChannelPool`), so the cost
    per session is one stream open, and per token one message. Writes do not wait for the head: the
    stream's end (a refusal, a head that went away) is watched beside them and reported to ``on_failure``.
    """

    def __init__(self, channel: grpc.aio.Channel, head: str, sender: TokenSender, timeout_s: float,
                 on_failure: Callable[[HopError], None], link: RowLink | None = None) -> None:
        self._head = head
        self._sender = sender
        self._link = link  # the head's rows stream: tokens of batched forwards travel on it
        self._stream = OutboundStream(head, "token", timeout_s, pb_grpc.NodeStub(channel).Deliver, self._outcome,
                                      on_failure)

    async def send(self, step: int, token_id: int, compute_s: float, batched: bool = False) -> None:
        """The token of ``step``; one of a ``batched`` forward leaves with the forward's other tokens."""
        request = self._sender.frame(step, token_id, compute_s)
        if self._link is not None and self._stream.rides_rows(batched):
            self._link.token(pb.TokenRow(session_id=self._sender.session_id, epoch=self._sender.epoch,
                                         token=request.token), self._stream.fail)
            return
        await self._stream.write([request], self._sender.opening)

    async def _outcome(self, call: grpc.aio.StreamUnaryCall[pb.DeliverRequest, pb.DeliverReply]) -> HopError:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return HopError(broken_hop_code(exc.code()), f"{self._head} refused the token stream: {exc.details()}")
        return HopError(grpc.StatusCode.UNAVAILABLE, f"{self._head} closed the token stream")

    def close(self) -> None:
        self._stream.close()
