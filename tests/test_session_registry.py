"""The node's one registry of sessions: slots held atomically, and every open undone by its close."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from common.spans import Span
from node_agent.admission import SessionLimitError
from node_agent.session_registry import NotHostedError, SessionRegistry

VIEW = SimpleNamespace(epoch=3, model_digest="m", segments=[SimpleNamespace(node_id="n0", span=Span(0, 10)),
                                                            SimpleNamespace(node_id="n1", span=Span(10, 30))])


class Pool:
    def __init__(self, fail_acquire: bool = False, fail_build: bool = False) -> None:
        self.held: list[Span] = []
        self.fail_acquire, self.fail_build = fail_acquire, fail_build
        self.closed: list[Any] = []

    async def acquire(self, view: Any, first: int) -> list[Any]:
        await asyncio.sleep(0.01)  # an await between the slot and the pipeline, as loading layers has
        if self.fail_acquire:
            raise RuntimeError("no such layer")
        runners = [SimpleNamespace(span=view.segments[first].span)]
        self.held += [r.span for r in runners]
        return runners

    def release(self, digest: str, runners: list[Any]) -> None:
        for runner in runners:
            self.held.remove(runner.span)

    def build(self, session_id: str, view: Any, first: int, runners: list[Any], *_: Any) -> Any:
        if self.fail_build:
            raise ValueError("bad sampling")
        pipeline = SimpleNamespace(runners=runners)
        pipeline.close = lambda: self.closed.append(pipeline)
        return pipeline


def _registry(pool: Pool, limit: int = 2) -> SessionRegistry:
    return SessionRegistry("n0", limit, pool.acquire, pool.release, pool.build)


def test_concurrent_opens_never_pass_the_limit_and_closes_give_everything_back() -> None:
    pool = Pool()
    registry = _registry(pool)

    async def scenario() -> list[object]:
        return await asyncio.gather(*(registry.open(f"s{i}", VIEW, 0, None) for i in range(5)),  # type: ignore[arg-type]
                                    return_exceptions=True)

    results = asyncio.run(scenario())
    assert sum(isinstance(r, SessionLimitError) for r in results) == 3
    assert len(registry) == 2 and registry.pipeline_count() == 2 and len(pool.held) == 2
    assert registry.holders() == {("m", Span(0, 10)): {"s0", "s1"}}
    for session in registry.session_ids():
        registry.close(session)
    assert len(registry) == 0 and pool.held == [] and len(pool.closed) == 2


@pytest.mark.parametrize("failing", ["acquire", "build"])
def test_a_failed_open_gives_back_its_slot_and_runners(failing: str) -> None:
    pool = Pool(fail_acquire=failing == "acquire", fail_build=failing == "build")
    registry = _registry(pool, limit=1)
    with pytest.raises((RuntimeError, ValueError)):
        asyncio.run(registry.open("s", VIEW, 0, None))  # type: ignore[arg-type]
    assert len(registry) == 0 and pool.held == []
    with pytest.raises(NotHostedError):
        asyncio.run(registry.open("s", VIEW, 1, None))  # type: ignore[arg-type]
    assert len(registry) == 0


def test_a_reopened_stream_replaces_the_stale_one_and_only_closes_its_own() -> None:
    pool = Pool()
    registry = _registry(pool)
    stale = asyncio.run(registry.open("s", VIEW, 0, None))  # type: ignore[arg-type]
    fresh = asyncio.run(registry.open("s", VIEW, 0, None))  # type: ignore[arg-type]
    assert pool.closed == [stale] and registry.pipelines() == [fresh] and len(pool.held) == 1
    registry.close("s", 0, VIEW.epoch, only=stale)  # the stale stream's own close: the replacement stays
    assert registry.pipelines() == [fresh]
    with registry.slot("s"):  # the generation's slot and the pipeline's are one slot of one session
        assert len(registry) == 1
    registry.close("s", 0, VIEW.epoch, only=fresh)
    assert len(registry) == 0 and pool.held == []
    with registry.slot("a"), registry.slot("b"), pytest.raises(SessionLimitError), registry.slot("c"):
        pass
    assert len(registry) == 0
