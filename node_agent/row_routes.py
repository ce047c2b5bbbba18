"""The receiving end of the batched data plane: each row of a ``RowBatch`` joins its session's own stream.

A session's ``Forward`` (or ``Deliver``) stream registers a route when its open is accepted, under the
session, epoch and segment it opened and the node that opened it. A row reaches the stream only through
the route of that very sender: a node cannot put a row into a session it does not feed, and a row for a
session that has ended meanwhile is dropped (its session already failed or finished through its stream).
The row's messages then go through the stream's own checks (key, sequence, shape, limits) in arrival
order, merged with what the stream itself carries (:class:`StreamInbox`), so a bad row ends exactly its
session, with the status its stream would have ended with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from node_agent.metrics_registry import ROWS_DROPPED

log = logging.getLogger(__name__)

T = TypeVar("T")
RowKey = tuple[str, str, int, int]  # (kind "activation" or "token", session id, epoch, segment index)


def activation_key(session_id: str, epoch: int, segment_index: int) -> RowKey:
    return ("activation", session_id, epoch, segment_index)


def token_key(session_id: str, epoch: int) -> RowKey:
    return ("token", session_id, epoch, 0)


@dataclass
class _End:
    error: BaseException | None


class StreamInbox(Generic[T]):
    """A stream's own messages and the rows routed to it, in arrival order, read as one async iterator.

    The stream is read by a task of its own; its end (or error) comes after everything that arrived before.
    """

    def __init__(self, requests: AsyncIterator[T]) -> None:
        self._queue: asyncio.Queue[T | _End] = asyncio.Queue()
        self._pump = asyncio.ensure_future(self._read(requests))

    async def _read(self, requests: AsyncIterator[T]) -> None:
        try:
            async for message in requests:
                self._queue.put_nowait(message)
        except asyncio.CancelledError:
            self._queue.put_nowait(_End(None))
            raise
        except Exception as exc:  # the call broke: the reader raises it, as it would have from the stream
            self._queue.put_nowait(_End(exc))
        else:
            self._queue.put_nowait(_End(None))

    def push(self, messages: Sequence[T]) -> None:
        for message in messages:
            self._queue.put_nowait(message)

    def __aiter__(self) -> StreamInbox[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if isinstance(item, _End):
            self._queue.put_nowait(item)  # stays ended for any later read
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._pump.cancel()


class RowRoutes:
    """Every open stream's route, by :data:`RowKey`, with the sender allowed to use it (None: a dev mesh)."""

    def __init__(self) -> None:
        self._routes: dict[RowKey, tuple[str | None, StreamInbox[object]]] = {}

    @contextlib.contextmanager
    def route(self, key: RowKey, sender: str | None, inbox: StreamInbox[T]) -> Iterator[None]:
        """Rows of ``key`` from ``sender`` go to ``inbox`` while the context lasts (a newer stream of the same
        key takes the route over; the older one's exit then leaves it alone)."""
        entry = (sender, inbox)
        self._routes[key] = entry  # type: ignore[assignment]
        try:
            yield
        finally:
            if self._routes.get(key) is entry:
                del self._routes[key]

    def deliver(self, key: RowKey, sender: str | None, messages: Sequence[object]) -> bool:
        """Hand a row to its stream; False (and the row is dropped) when no stream of ``sender`` has that key."""
        entry = self._routes.get(key)
        if entry is None or entry[0] != sender:
            ROWS_DROPPED.inc()
            log.debug("dropped a %s row of session %s (epoch %d) from %s: no such stream from it", key[0],
                      key[1][:8], key[2], sender)
            return False
        entry[1].push(messages)
        return True

    def __len__(self) -> int:
        return len(self._routes)
