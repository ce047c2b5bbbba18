"""Produce the next items of an async generator while the consumer is still sending the last one.

A gRPC server stream's ``yield`` waits until the message has left; feeding the handler from a task
lets the head compute token k+1 while token k is on its way to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def read_ahead(source: AsyncGenerator[T, None], depth: int = 4) -> AsyncGenerator[T, None]:
    """Yields what ``source`` yields, at most ``depth`` items ahead; its errors surface here.

    Closing this iterator (the client went away) cancels the producer and closes ``source``, so its
    ``finally`` blocks run (a session frees its caches) before this returns.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=depth)
    failure: list[BaseException] = []

    async def produce() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which raises it in the handler's context
            failure.append(exc)
        finally:
            await source.aclose()
        await queue.put(_DONE)  # not reached when cancelled: nobody is waiting then

    producer = asyncio.ensure_future(produce())
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            yield item  # type: ignore[misc]
        if failure:
            raise failure[0]
    finally:
        if not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
