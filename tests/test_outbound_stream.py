"""A closed or failed session leaves nothing for the cycle collector: it is freed when dropped.

A node runs thousands of sessions; each one's pipeline holds its segment runner and caches. Anything
of a closed session kept in a reference cycle waits for Python's full collection, which a process
with a few hundred thousand objects (torch and transformers loaded) runs only now and then, so the
runners of released segments stayed resident for minutes (seen in bench/soak.py as memory beyond
weights and caches that kept rising). These tests run with the collector off.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from node_agent.hops import HopError
from node_agent.outbound_stream import OutboundStream


class FakeCall:
    """A call whose end is a future nobody resolves unless told to (as a dropped gRPC call's status)."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[HopError] = asyncio.get_running_loop().create_future()
        self.written: list[Any] = []

    async def write(self, request: Any) -> None:
        self.written.append(request)

    def cancel(self) -> bool:
        return True


class Session:
    """What owns a stream in the node (a pipeline's hop): its outcome and failure callbacks are its own."""

    def __init__(self) -> None:
        self.call: FakeCall | None = None
        self.failures: list[HopError] = []
        self.stream = OutboundStream("node-x", "activation", 5.0, self._open, self._outcome, self._failed)
        self.payload = bytearray(1024)

    def _open(self) -> FakeCall:
        self.call = FakeCall()
        return self.call

    async def _outcome(self, call: FakeCall) -> HopError:
        return await call.ended

    def _failed(self, error: HopError) -> None:
        self.failures.append(error)


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_closed_stream_frees_its_session_without_the_collector(no_cycle_collector: None) -> None:
    async def scenario() -> weakref.ref[Session]:
        session = Session()
        await session.stream.write(["a"], lambda: "open")
        session.stream.close()
        with pytest.raises(HopError, match="closed") as raised:  # never reopened once closed
            await session.stream.write(["b"], lambda: "open")
        assert raised.value.code == grpc.StatusCode.CANCELLED
        del raised
        ref = weakref.ref(session)
        del session
        await _settle()
        return ref

    assert asyncio.run(scenario())() is None


def test_a_failed_stream_frees_its_session_without_the_collector(no_cycle_collector: None) -> None:
    async def scenario() -> weakref.ref[Session]:
        session = Session()
        await session.stream.write(["a"], lambda: "open")
        assert session.call is not None
        session.call.ended.set_result(HopError(grpc.StatusCode.UNAVAILABLE, "node-x went away"))
        await _settle()
        assert [f.details for f in session.failures] == ["node-x went away"]
        for _ in range(2):  # raised again on every later write, each time as the same status
            with pytest.raises(HopError, match="node-x went away") as raised:
                await session.stream.write(["b"], lambda: "open")
            assert raised.value.code == grpc.StatusCode.UNAVAILABLE
            del raised
        session.stream.close()
        ref = weakref.ref(session)
        del session
        await _settle()
        return ref

    assert asyncio.run(scenario())() is None


class FailingPipeline:
    """A session pipeline whose step fails downstream, as when the next node is killed mid-step."""

    async def step(self, step: int, position: int, inputs: Any) -> int:
        await asyncio.sleep(0)
        raise HopError(grpc.StatusCode.UNAVAILABLE, "node-1: Stream removed")


def test_a_failed_step_leaves_no_cycle_holding_its_pipeline(no_cycle_collector: None) -> None:
    """The head's step runs as a task beside its path watch; the task's error must not keep the pipeline."""
    import torch

    from node_agent.ring_session import RingSession

    config = SimpleNamespace(stall_reroute_s=30.0, hop_timeout_s=30.0)
    runtime = SimpleNamespace(config=config, node_id="node-0")

    async def scenario() -> weakref.ref[FailingPipeline]:
        session = RingSession(runtime, "s" * 32, None, [1, 2, 3], 1.0)  # type: ignore[arg-type]
        pipeline = FailingPipeline()
        session.pipeline, session.view = pipeline, SimpleNamespace(epoch=1)  # type: ignore[assignment]
        ref = weakref.ref(pipeline)
        del pipeline
        try:
            await session._step_or_reroute(0, torch.tensor([[1, 2, 3]]), time.perf_counter())
        except HopError as exc:
            assert exc.details == "node-1: Stream removed"
        session.pipeline = None
        await _settle()
        return ref

    assert asyncio.run(scenario())() is None
