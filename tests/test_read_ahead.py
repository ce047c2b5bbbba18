"""read_ahead keeps order, passes errors through and, when closed early, closes its source."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from node_agent.read_ahead import read_ahead


class Boom(Exception):
    pass


def test_items_in_order_then_the_error() -> None:
    async def source() -> AsyncGenerator[int, None]:
        for i in range(10):
            yield i
        raise Boom("downstream failed")

    async def main() -> list[int]:
        seen = []
        with pytest.raises(Boom, match="downstream failed"):
            async for item in read_ahead(source(), depth=2):
                seen.append(item)
        return seen

    assert asyncio.run(main()) == list(range(10))


def test_closing_early_runs_the_source_cleanup() -> None:
    closed = asyncio.Event()
    produced = []

    async def source() -> AsyncGenerator[int, None]:
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    async def main() -> None:
        stream = read_ahead(source(), depth=3)
        async for item in stream:
            if item == 4:
                break
        await stream.aclose()
        assert closed.is_set()

    asyncio.run(main())
    assert len(produced) <= 4 + 1 + 3 + 1  # never more than `depth` items beyond what was consumed


def test_consumer_cancelled_mid_wait_cancels_the_producer() -> None:
    closed = asyncio.Event()

    async def source() -> AsyncGenerator[int, None]:
        try:
            yield 1
            await asyncio.sleep(3600)  # a stalled ring
            yield 2
        finally:
            closed.set()

    async def consume() -> None:
        async for _ in read_ahead(source()):
            pass

    async def main() -> None:
        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert closed.is_set()

    asyncio.run(main())
