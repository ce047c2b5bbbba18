"""The batched data plane: a forward's rows leave as one message, and each row reaches only its own stream."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch

from common.model_store import StoredModel
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from node_agent.compute import ComputeThread
from node_agent.hops import HopError
from node_agent.row_link import RowLink
from node_agent.row_routes import RowRoutes, StreamInbox, activation_key, token_key
from node_agent.segment import SegmentRunner
from node_agent.step_batcher import StepJob


class FakeCall:
    """A Rows call that records what is written, or fails every write with ``error``."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.written: list[pb.RowBatch] = []
        self.error = error
        self.cancelled = False
        self.ended = asyncio.Event()  # awaiting the call returns once it is set (the peer ended the call)

    def __await__(self) -> Any:
        return self.ended.wait().__await__()

    async def write(self, batch: pb.RowBatch) -> None:
        if self.error is not None:
            raise self.error
        self.written.append(batch)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


def _row(session: str) -> pb.ActivationRow:
    frame = pb.ForwardRequest(frame=pb.ActivationFrame(header=b"h", ciphertext=session.encode()))
    return pb.ActivationRow(session_id=session, epoch=3, segment_index=1, messages=[frame])


def _link(calls: list[FakeCall]) -> RowLink:
    def open_call() -> Any:
        return calls.pop(0)
    return RowLink("node-1", open_call, timeout_s=5.0)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_rows_handed_over_in_one_loop_pass_leave_as_one_message() -> None:
    call = FakeCall()

    async def scenario() -> None:
        link = _link([call])
        for session in ("a", "b", "c"):
            link.activation(_row(session), lambda error: None)
        link.token(pb.TokenRow(session_id="d", epoch=3, token=pb.TokenFrame(header=b"h")), lambda error: None)
        await _settle()
        link.activation(_row("a"), lambda error: None)  # the next step: a message of its own
        await _settle()
        link.close()

    asyncio.run(scenario())
    assert [[r.session_id for r in b.activations] for b in call.written] == [["a", "b", "c"], ["a"]]
    assert [[t.session_id for t in b.tokens] for b in call.written] == [["d"], []]


@pytest.mark.parametrize("error", [asyncio.InvalidStateError(), TimeoutError()])
def test_a_batch_that_cannot_be_written_fails_exactly_its_sessions_and_the_link_reopens(error: BaseException) -> None:
    broken, fresh = FakeCall(error), FakeCall()
    failed: dict[str, HopError] = {}

    async def scenario() -> None:
        link = _link([broken, fresh])
        for session in ("a", "b"):
            link.activation(_row(session), lambda exc, s=session: failed.__setitem__(s, exc))  # type: ignore[misc]
        await _settle()
        link.activation(_row("c"), lambda exc: failed.__setitem__("c", exc))
        await _settle()
        link.close()

    asyncio.run(scenario())
    assert sorted(failed) == ["a", "b"] and {e.code for e in failed.values()} == {grpc.StatusCode.UNAVAILABLE}
    assert broken.cancelled and [[r.session_id for r in b.activations] for b in fresh.written] == [["c"]]


def test_a_call_that_ended_while_idle_is_replaced_without_failing_anyone() -> None:
    """The peer restarted between two batches: its old call is gone, the next batch goes on a fresh one."""
    old, fresh = FakeCall(), FakeCall()
    failed: list[HopError] = []

    async def scenario() -> None:
        link = _link([old, fresh])
        link.activation(_row("a"), failed.append)
        await _settle()
        old.error = asyncio.InvalidStateError()  # written to from now on, it says the RPC is finished
        link.activation(_row("b"), failed.append)
        await _settle()
        link.close()

    asyncio.run(scenario())
    assert not failed
    assert [r.session_id for b in old.written for r in b.activations] == ["a"]
    assert [r.session_id for b in fresh.written for r in b.activations] == ["b"]


def test_a_call_whose_end_is_seen_is_dropped_at_once() -> None:
    old, fresh = FakeCall(), FakeCall()

    async def scenario() -> None:
        link = _link([old, fresh])
        link.activation(_row("a"), lambda error: None)
        await _settle()
        old.ended.set()  # the peer ended it (a write to it would be lost, not refused)
        await _settle()
        link.activation(_row("b"), lambda error: None)
        await _settle()
        link.close()

    asyncio.run(scenario())
    assert [r.session_id for b in old.written for r in b.activations] == ["a"]
    assert [r.session_id for b in fresh.written for r in b.activations] == ["b"]


async def _stream(messages: list[str], end: BaseException | None = None,
                  until: asyncio.Event | None = None) -> AsyncIterator[str]:
    """A session stream's messages; it ends (or breaks with ``end``) once ``until`` is set."""
    for message in messages:
        await asyncio.sleep(0)
        yield message
    if until is not None:
        await until.wait()
    if end is not None:
        raise end


def test_a_row_reaches_only_the_stream_its_sender_opened() -> None:
    routes = RowRoutes()

    async def scenario() -> list[str]:
        closed = asyncio.Event()
        inbox: StreamInbox[str] = StreamInbox(_stream(["open", "prefill"], until=closed))
        key = activation_key("s1", 3, 1)
        with routes.route(key, "node-0", inbox):
            assert await anext(inbox) == "open"
            assert await anext(inbox) == "prefill"
            assert not routes.deliver(key, "node-9", ["forged"])  # another node's row for this session
            assert not routes.deliver(activation_key("s1", 4, 1), "node-0", ["other epoch"])
            assert not routes.deliver(token_key("s1", 3), "node-0", ["other kind"])
            assert routes.deliver(key, "node-0", ["row 1", "row 2"])
            closed.set()
            got = [message async for message in inbox]
        assert len(routes) == 0 and not routes.deliver(key, "node-0", ["late"])  # the stream ended: dropped
        return got

    assert asyncio.run(scenario()) == ["row 1", "row 2"]


def test_a_newer_stream_takes_the_route_and_the_older_ones_end_leaves_it() -> None:
    routes = RowRoutes()

    async def scenario() -> tuple[list[str], list[str]]:
        closed = asyncio.Event()
        old: StreamInbox[str] = StreamInbox(_stream([], until=closed))
        new: StreamInbox[str] = StreamInbox(_stream([], until=closed))
        key = token_key("s1", 3)
        older = routes.route(key, "node-2", old)
        older.__enter__()
        with routes.route(key, "node-2", new):
            older.__exit__(None, None, None)  # the older stream ends while the newer one lives
            assert routes.deliver(key, "node-2", ["token"])
        closed.set()
        return [m async for m in old], [m async for m in new]

    assert asyncio.run(scenario()) == ([], ["token"])


def test_a_broken_stream_raises_after_what_it_delivered() -> None:
    async def scenario() -> list[str]:
        inbox: StreamInbox[str] = StreamInbox(_stream(["a"], ConnectionError("reset")))
        got = []
        with pytest.raises(ConnectionError):
            async for message in inbox:
                got.append(message)
        return got

    assert asyncio.run(scenario()) == ["a"]


def test_the_rows_of_one_batched_forward_leave_as_one_message(embedded: StoredModel) -> None:
    """Sessions that shared a forward are woken in one pass of the loop, so what each hands to the link after
    its step leaves together, however the thread and the loop interleave."""
    runner = SegmentRunner(embedded, Span(0, 3))
    caches = [runner.new_cache() for _ in range(6)]
    for seed, cache in enumerate(caches):
        runner.run(cache, torch.randint(0, 5000, (1, 4 + seed), generator=torch.Generator().manual_seed(seed)), 0)
    compute = ComputeThread(max_batch_rows=8)
    call = FakeCall()

    async def session(link: RowLink, index: int) -> None:
        hidden = await compute.step(StepJob((runner,), (caches[index],), torch.tensor([[7]]), 4 + index))
        assert isinstance(hidden, torch.Tensor)
        link.activation(_row(f"s{index}"), lambda error: None)

    async def scenario() -> None:
        link = _link([call])
        blocker = asyncio.ensure_future(compute.run(time.sleep, 0.2))
        await asyncio.sleep(0.05)  # the thread is busy: the six steps wait for the same round
        await asyncio.gather(blocker, *(session(link, i) for i in range(6)))
        await _settle()
        link.close()

    try:
        asyncio.run(scenario())
    finally:
        compute.shutdown()
    assert sum(len(b.activations) for b in call.written) == 6
    assert len(call.written) == 1, [len(b.activations) for b in call.written]


class _Session:
    """Stands for a session pipeline: what a row's failure callback keeps alive."""

    def failed(self, error: HopError) -> None:
        pass


@pytest.mark.parametrize("fails", [False, True])
def test_a_quiet_link_keeps_no_session_of_its_last_message_alive(fails: bool) -> None:
    """A link whose peer left the plan sends nothing more: its last batch's sessions (their pipelines,
    caches and segment weights) must still be freed once they end."""
    error = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    calls = [FakeCall(error if fails else None) for _ in range(2)]
    gone: list[weakref.ref[_Session]] = []

    async def scenario() -> None:
        link = _link(calls)
        sessions = [_Session() for _ in range(3)]
        for i in range(3):
            link.activation(_row(str(i)), sessions[i].failed)
        gone.extend(weakref.ref(s) for s in sessions)
        del sessions
        await _settle()
        gc.collect()
        assert [ref() for ref in gone] == [None, None, None]  # while the writer waits for the next rows
        link.close()

    asyncio.run(scenario())
