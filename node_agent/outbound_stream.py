"""A stream a session writes to another node without waiting for replies: activations on, tokens home.

Both the Forward stream to the next node (node_agent/pipeline.py) and the tail's Deliver stream to
the head (node_agent/token_ring.py) work this way: the call opens with the first write, each write
must be taken within ``timeout_s``, and the stream's end is watched beside the writes. An end while the
session still uses the stream is a failure downstream: it is kept (the next write raises it) and
reported once to ``on_failure``, so a waiting head learns it at once.

Closing leaves no reference cycle behind: the watch task and the owner's callbacks are let go, and a
kept failure is raised as a fresh error each time (a raised exception's traceback holds the frame
that raised it, and that frame this stream). A session caught in a cycle waits for Python's full
collection, rare in a process holding torch, and keeps its segment runner resident until then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from node_agent.hops import HopError, hop_failure

log = logging.getLogger(__name__)


class WritableCall(Protocol):
    async def write(self, request: Any) -> None: ...

    def cancel(self) -> bool: ...


class OutboundStream:
    """One session's outgoing stream to ``peer``; ``outcome`` turns the call's end into the HopError it means."""

    def __init__(self, peer: str, what: str, timeout_s: float, open_call: Callable[[], WritableCall],
                 outcome: Callable[[Any], Awaitable[HopError]],
                 on_failure: Callable[[HopError], None] | None = None) -> None:
        self.peer = peer
        self._what = what  # "activation", "token": for the timeout's message
        self._timeout_s = timeout_s
        self._open_call = open_call
        self._outcome = outcome
        self._on_failure = on_failure
        self._call: WritableCall | None = None
        self._watch: asyncio.Future[None] | None = None
        self._failure: HopError | None = None
        self._closed = False

    async def write(self, messages: Sequence[Any], opening: Callable[[], Any]) -> None:
        """Write ``messages``, opening the call with ``opening()`` first if it is not open yet."""
        self._raise_failure()
        try:
            async with asyncio.timeout(self._timeout_s):  # no task per step, unlike wait_for
                if self._call is None:
                    call = self._open_call()
                    self._call = call
                    self._watch = asyncio.ensure_future(self._watch_end(call))
                    await call.write(opening())
                for message in messages:
                    await self._call.write(message)
        except grpc.aio.AioRpcError as exc:
            raise hop_failure(exc, self.peer) from exc
        except asyncio.InvalidStateError:  # the stream ended before we could write: its status says why
            raise await self._ended() from None
        except TimeoutError:
            raise HopError(grpc.StatusCode.UNAVAILABLE,
                           f"{self.peer}: {self._what} not taken within {self._timeout_s}s") from None

    def rides_rows(self, batched: bool) -> bool:
        """Whether the session's next message leaves on the peer's rows stream (node_agent/row_link.py) instead: only
        one of a ``batched`` forward, and only once this call is open, so the peer knows the session before its
        rows. A failure already seen here is raised either way."""
        self._raise_failure()
        return batched and self._call is not None

    def fail(self, error: HopError) -> None:
        """A failure of this session's traffic seen elsewhere (its batched rows not taken): kept and reported
        once, as if the stream itself had ended."""
        if self._closed or self._failure is not None:
            return
        self._failure = error
        if self._on_failure is not None:
            self._on_failure(error)

    def _raise_failure(self) -> None:
        if self._failure is not None:  # a copy: the kept one must not collect this frame's traceback
            raise HopError(self._failure.code, self._failure.details)

    async def _ended(self) -> HopError:
        if self._watch is not None:
            await asyncio.wait({self._watch}, timeout=self._timeout_s)
        return self._failure or HopError(grpc.StatusCode.UNAVAILABLE, f"{self.peer} closed the stream")

    async def _watch_end(self, call: WritableCall) -> None:
        try:
            error = await self._outcome(call)
        except grpc.aio.AioRpcError as exc:
            error = hop_failure(exc, self.peer)
        except asyncio.CancelledError:
            return
        if self._closed:
            return
        self._failure = error
        log.warning("%s stream to %s ended: %s %s", self._what, self.peer, error.code.name, error.details)
        if self._on_failure is not None:
            self._on_failure(error)

    def close(self) -> None:
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()  # a dropped call's end may never come: the watch must not wait for it
            self._watch = None
        if self._call is not None:
            self._call.cancel()
            self._call = None
        # The owner's bound methods: keeping them would tie the owner and this stream into a cycle.
        self._open_call = _closed_call
        self._outcome = _closed_outcome
        self._on_failure = None


def _closed_call() -> WritableCall:
    raise HopError(grpc.StatusCode.CANCELLED, "the session closed this stream")


async def _closed_outcome(call: Any) -> HopError:
    raise AssertionError("a closed stream watches no call")
