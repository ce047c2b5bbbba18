"""The sending end of the batched data plane: a step's rows of many sessions cross a boundary as one message.

The compute thread finishes a forward of many sessions at once and wakes them all in one pass of the
event loop (node_agent/compute.py). Each session then seals its own row (its activation for the next
node, or on the tail its token for the head) and hands it to the :class:`RowLink` of that peer, which
sends every row handed over in that pass as one ``RowBatch`` on one long-lived ``Rows`` stream. Its
writer wakes behind the wake-ups of the pass, so the message needs no timer and adds no wait.

A row only ever follows its session's own stream (opened with its first tensor), so the receiver knows
the session before its rows arrive; a row whose forward carried no other session's row keeps to that
stream, the shortest way. A batch that cannot be written fails exactly its rows' sessions
(``on_failure`` with the status), which then replay as after any broken hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from node_agent.hops import HopError, hop_failure
from node_agent.metrics_registry import ROW_BATCHES, ROWS_SENT

log = logging.getLogger(__name__)

OnFailure = Callable[[HopError], None]


@dataclass
class _Pending:
    batch: pb.RowBatch
    failures: list[OnFailure]


class RowLink:
    """One peer's ``Rows`` stream: rows handed over in one event-loop pass leave as one message, in order."""

    def __init__(self, peer: str, open_call: Callable[[], grpc.aio.StreamUnaryCall[pb.RowBatch, pb.RowBatchAck]],
                 timeout_s: float) -> None:
        self.peer = peer
        self._open_call = open_call
        self._timeout_s = timeout_s
        self._call: grpc.aio.StreamUnaryCall[pb.RowBatch, pb.RowBatchAck] | None = None
        self._pending: _Pending | None = None
        self._ready = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._watch: asyncio.Future[None] | None = None  # ends with the call (_forget_when_ended)
        self._sent_batches = ROW_BATCHES.labels(peer=peer)
        self._sent_rows = {kind: ROWS_SENT.labels(peer=peer, kind=kind) for kind in ("activation", "token")}

    def activation(self, row: pb.ActivationRow, on_failure: OnFailure) -> None:
        """Queue one session's activation row for the next message."""
        pending = self._take()
        pending.batch.activations.append(row)
        pending.failures.append(on_failure)

    def token(self, row: pb.TokenRow, on_failure: OnFailure) -> None:
        """Queue one session's token row for the next message."""
        pending = self._take()
        pending.batch.tokens.append(row)
        pending.failures.append(on_failure)

    def _take(self) -> _Pending:
        if self._pending is None:
            self._pending = _Pending(pb.RowBatch(), [])
            # The writer wakes behind the wake-ups already queued (the rest of this forward's sessions); rows
            # handed over while it writes leave together in the message after.
            self._ready.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_all())
        return self._pending

    async def _write_all(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            # No local names the batch across the wait: a link that goes quiet (its peer left the plan) would
            # otherwise keep its last sessions' failure callbacks, and through them their pipelines, caches
            # and segment weights, alive until its next message.
            await self._send_pending()

    async def _send_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            await self._write(pending.batch)
        except HopError as error:
            log.warning("rows to %s not sent (%d sessions fail over): %s %s", self.peer, len(pending.failures),
                        error.code.name, error.details)
            for fail in pending.failures:
                fail(error)
            return
        self._sent_batches.inc()
        self._sent_rows["activation"].inc(len(pending.batch.activations))
        self._sent_rows["token"].inc(len(pending.batch.tokens))

    async def _write(self, batch: pb.RowBatch) -> None:
        """Write ``batch``; a call that had ended before it (the peer restarted, or its connection went while no
        rows flowed) is replaced and the batch written once more on a fresh one before anything fails."""
        for retry in (False, True):
            fresh = self._call is None
            try:
                async with asyncio.timeout(self._timeout_s):
                    call = self._call if self._call is not None else self._open()
                    await call.write(batch)
                return
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                self._reset()
                if fresh or retry:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        raise hop_failure(exc, self.peer) from exc
                    raise HopError(grpc.StatusCode.UNAVAILABLE, f"{self.peer} closed the rows stream") from None
            except TimeoutError:
                self._reset()
                raise HopError(grpc.StatusCode.UNAVAILABLE,
                               f"{self.peer}: rows not taken within {self._timeout_s}s") from None

    def _open(self) -> grpc.aio.StreamUnaryCall[pb.RowBatch, pb.RowBatchAck]:
        call = self._call = self._open_call()
        self._watch = asyncio.ensure_future(self._forget_when_ended(call))
        return call

    async def _forget_when_ended(self, call: grpc.aio.StreamUnaryCall[pb.RowBatch, pb.RowBatchAck]) -> None:
        """The peer ends a rows stream only when it goes away (or refuses it): the next batch opens a new one."""
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            log.info("rows stream to %s ended: %s %s", self.peer, exc.code().name, exc.details())
        if self._call is call:
            self._call = None

    def _reset(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        self._reset()


class RowLinks:
    """One :class:`RowLink` per peer, built on the channel the peer's sessions already share."""

    def __init__(self, channel_of: Callable[[str, str], grpc.aio.Channel], timeout_s: float) -> None:
        self._channel_of = channel_of
        self._timeout_s = timeout_s
        self._links: dict[tuple[str, str], RowLink] = {}

    def get(self, address: str, node_id: str) -> RowLink:
        link = self._links.get((address, node_id))
        if link is None:
            stub = pb_grpc.NodeStub(self._channel_of(address, node_id))
            link = self._links[(address, node_id)] = RowLink(node_id, stub.Rows, self._timeout_s)
        return link

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
