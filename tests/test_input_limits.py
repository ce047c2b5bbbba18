"""Limits that keep one stream or request from stalling or starving a node, checked in-process.

Tensors are judged on their first chunk before anything is buffered; positions continue without gaps
and stay inside the model; a node-wide cap bounds buffered bytes; silent streams are closed; session
slots count once per session; only a generation's owner cancels it; requests are size-checked before
any tokenizer runs, and tokenizing never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from common.certs import Identity
from common.hop_codec import PlainHopReceiver
from common.proto import splitmesh_pb2 as pb
from common.tensor_budget import BufferBudget
from common.tensor_codec import TensorAssembler, TensorError, encode_tensor
from node_agent.admission import BatchAdmission, Generations, SessionLimitError, SessionSlots
from node_agent.forward_stream import ActivationReader, StreamError
from node_agent.generation import RequestError, RequestLimits, check_request
from node_agent.pipeline import SessionPipeline
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.servicer import NodeServicer
from node_agent.session_registry import SessionRegistry

HIDDEN = 8
LIMITS = RequestLimits(vocab_size=1000, max_positions=128, max_prompt_tokens=64, max_new_tokens=32,
                       max_prompt_bytes=1000, max_messages=4)


def _frame(seq: int, step: int, position: int, chunk: pb.TensorChunk) -> pb.ForwardRequest:
    return pb.ForwardRequest(frame=pb.ActivationFrame(step=step, seq=seq, position=position, tensor=chunk))


def _tensors(*items: tuple[int, int, int]) -> list[pb.ForwardRequest]:
    """Plaintext frames for ``(step, position, rows)`` tensors, one chunk each."""
    return [_frame(seq, step, position, encode_tensor(torch.ones(1, rows, HIDDEN))[0])
            for seq, (step, position, rows) in enumerate(items)]


async def _source(requests: Iterable[pb.ForwardRequest], pulled: list[int],
                  then: asyncio.Event | None = None) -> AsyncIterator[pb.ForwardRequest]:
    for request in requests:
        pulled.append(1)
        yield request
    if then is not None:
        await then.wait()


async def _drain(reader: ActivationReader, source: AsyncIterator[pb.ForwardRequest],
                 ) -> tuple[list[tuple[int, int]], grpc.StatusCode | None]:
    got: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(30):  # a reader that never ends fails the test instead of hanging it
            async for step, position, _ in reader.activations(source):
                got.append((step, position))
    except StreamError as exc:
        return got, exc.code
    return got, None


def _read(requests: Iterable[pb.ForwardRequest], budget: BufferBudget | None = None, **kwargs: Any,
          ) -> tuple[list[tuple[int, int]], grpc.StatusCode | None, int]:
    pulled: list[int] = []
    reader = ActivationReader(PlainHopReceiver(budget), HIDDEN, 64, max_positions=128, **kwargs)
    got, code = asyncio.run(_drain(reader, _source(requests, pulled)))
    return got, code, len(pulled)


def test_declared_rows_are_refused_on_the_first_chunk_before_anything_is_buffered() -> None:
    declared = pb.TensorChunk(dtype="float32", shape=[1, 200_000, HIDDEN], data=b"\0" * 4096, chunk_index=0,
                              chunk_count=1563)
    more = (_frame(i, 0, 0, pb.TensorChunk(dtype="float32", shape=[1, 200_000, HIDDEN], data=b"\0" * 4096,
                                           chunk_index=i, chunk_count=1563)) for i in range(1, 1563))
    budget = BufferBudget(1 << 30)
    got, code, pulled = _read([_frame(0, 0, 0, declared), *more], budget)
    assert (got, code, pulled) == ([], grpc.StatusCode.INVALID_ARGUMENT, 1)
    assert budget.peak == 0 and budget.in_use == 0


def test_empty_chunks_and_more_chunks_than_bytes_are_refused_at_once() -> None:
    many = pb.TensorChunk(dtype="float32", shape=[1, 1, HIDDEN], data=b"", chunk_index=0, chunk_count=45_000)
    with pytest.raises(TensorError, match="45000 chunks"):
        TensorAssembler().add(many)
    empty = pb.TensorChunk(dtype="float32", shape=[1, 4, HIDDEN], data=b"", chunk_index=0, chunk_count=2)
    with pytest.raises(TensorError, match="empty"):
        TensorAssembler().add(empty)


def test_reassembly_of_many_chunks_is_exact_and_holds_the_bytes_once() -> None:
    tensor = torch.randn(1, 2500, HIDDEN)
    chunks = encode_tensor(tensor, chunk_bytes=8)  # 10,000 chunks
    budget = BufferBudget(tensor.numel() * 4)
    assembler = TensorAssembler(budget)
    results = [assembler.add(c) for c in chunks]
    assert all(r is None for r in results[:-1]) and budget.peak == tensor.numel() * 4
    assert results[-1] is not None and torch.equal(results[-1], tensor)
    assert budget.in_use == 0


@pytest.mark.parametrize(("tensors", "answered"), [
    (((0, 3, 2),), 0),  # a stream starts at position 0
    (((0, 0, 4), (1, 2, 1)), 1),  # backwards
    (((0, 0, 4), (1, 9, 1)), 1),  # a gap
    (((0, 0, 64), (1, 64, 60), (2, 124, 5)), 2),  # past the model's 128 positions
    (((0, 0, 2), (3, 2, 1)), 1),  # a step skipped
])
def test_positions_continue_without_gaps_and_stay_within_the_model(tensors: tuple[tuple[int, int, int], ...],
                                                                   answered: int) -> None:
    got, code, _ = _read(_tensors(*tensors))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and len(got) == answered


def test_positions_up_to_the_models_last_are_accepted() -> None:
    got, code, _ = _read(_tensors((0, 0, 64), (1, 64, 60), (2, 124, 4)))
    assert code is None and got == [(0, 0), (1, 64), (2, 124)]


def test_the_node_buffer_cap_is_shared_by_all_streams_and_given_back() -> None:
    budget = BufferBudget(10_000)
    half = encode_tensor(torch.ones(1, 200, HIDDEN), chunk_bytes=3200)  # 6,400 bytes in 2 chunks

    async def run() -> tuple[grpc.StatusCode | None, grpc.StatusCode | None]:
        hold = asyncio.Event()
        first = ActivationReader(PlainHopReceiver(budget), HIDDEN, 256, max_positions=1024)
        second = ActivationReader(PlainHopReceiver(budget), HIDDEN, 256, max_positions=1024)
        holder = asyncio.ensure_future(_drain(first, _source([_frame(0, 0, 0, half[0])], [], hold)))
        while budget.in_use == 0:
            await asyncio.sleep(0.01)
        _, refused = await _drain(second, _source([_frame(0, 0, 0, half[0]), _frame(1, 0, 0, half[1])], []))
        hold.set()
        _, ended = await holder
        return refused, ended

    refused, ended = asyncio.run(run())
    assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ended is None and budget.in_use == 0


HALF_A_TENSOR = _frame(0, 0, 0, encode_tensor(torch.ones(1, 200, HIDDEN), chunk_bytes=3200)[0])


@pytest.mark.parametrize("sent", [[], [HALF_A_TENSOR]], ids=["nothing after the open", "half a tensor"])
def test_a_stream_that_goes_quiet_is_closed_after_the_frame_timeout(sent: list[pb.ForwardRequest]) -> None:
    async def run() -> grpc.StatusCode | None:
        reader = ActivationReader(PlainHopReceiver(), HIDDEN, 256, 3600.0, max_positions=1024, frame_timeout_s=0.2)
        return (await _drain(reader, _source(sent, [], asyncio.Event())))[1]

    assert asyncio.run(run()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_session_takes_one_slot_however_many_pipelines_it_has() -> None:
    slots = SessionSlots("node-0", limit=2)
    slots.take("a")
    slots.take("a")  # the head and the tail it also hosts
    slots.take("b")
    with pytest.raises(SessionLimitError):
        slots.take("c")
    slots.give("a")
    with pytest.raises(SessionLimitError):
        slots.take("c")
    slots.give("a")
    slots.take("c")
    assert len(slots) == 2


@pytest.mark.parametrize(("owner", "caller", "allowed"), [
    (Identity("client", "alice"), Identity("client", "alice"), True),
    (Identity("client", "alice"), Identity("client", "mallory"), False),
    (Identity("client", "alice"), Identity("node", "node-1"), False),
    (Identity("client", "alice"), Identity("orchestrator", "orchestrator"), True),
    (None, None, True),  # dev mode without TLS: the unguessable session id is the capability
])
def test_only_the_owner_or_the_orchestrator_cancels(owner: Identity | None, caller: Identity | None,
                                                    allowed: bool) -> None:
    async def run() -> tuple[bool, bool, bool]:
        generations = Generations()
        victim = asyncio.ensure_future(asyncio.sleep(60))
        generation = generations.add("s1", owner)
        generation.task = victim
        result = generations.cancel("s1", caller)
        unknown = generations.cancel("s2", caller)
        await asyncio.sleep(0)
        cancelled = victim.cancelled()
        victim.cancel()
        return result, unknown, cancelled

    result, unknown, cancelled = asyncio.run(run())
    assert (result, cancelled) == (allowed, allowed) and not unknown


class _NoTokenizer:
    """Fails the test if anything tokenizes: these requests must be refused before that."""

    chat_template = "{{ messages }}"
    eos_token_id = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise AssertionError("tokenized a request that should have been refused first")

    apply_chat_template = __call__


def _request(**fields: Any) -> pb.GenerateRequest:
    fields.setdefault("max_new_tokens", 4)
    if not {"prompt", "messages", "token_ids"} & set(fields):
        fields["prompt"] = "hello"
    return pb.GenerateRequest(**fields)


@pytest.mark.parametrize(("request_", "match"), [
    (_request(prompt="x" * 1001), "byte"),
    (_request(prompt="é" * 501), "byte"),  # 1,002 UTF-8 bytes in 501 characters
    (_request(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 5)), "messages"),
    (_request(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="y" * 600)] * 2)), "byte"),
    (_request(token_ids=pb.TokenIds(ids=list(range(65)))), "tokens"),
    (_request(sampling=pb.SamplingParams(top_p=float("nan"))), "top_p"),
    (_request(sampling=pb.SamplingParams(top_p=-0.5)), "top_p"),
    (_request(sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (_request(sampling=pb.SamplingParams(temperature=float("nan"))), "temperature"),
    (_request(sampling=pb.SamplingParams(temperature=float("inf"))), "temperature"),
    (_request(sampling=pb.SamplingParams(top_k=1 << 31)), "top_k"),
    (_request(max_new_tokens=0), "max_new_tokens"),
    (_request(max_new_tokens=33), "max_new_tokens"),
])
def test_requests_are_judged_before_any_tokenizer_runs(request_: pb.GenerateRequest, match: str) -> None:
    with pytest.raises(RequestError, match=match):
        check_request(request_, True, LIMITS)


def test_unset_top_p_means_no_cut_and_valid_requests_pass() -> None:
    assert SamplingConfig.from_proto(pb.SamplingParams()).top_p == 1.0
    check_request(_request(prompt="é" * 500, sampling=pb.SamplingParams(top_p=0.9, temperature=0.7)), True, LIMITS)


async def _no_segments(*_: object) -> list[SegmentRunner]:
    raise AssertionError("a refused request opens no pipeline")


def _no_pipeline(*_: object) -> SessionPipeline:
    raise AssertionError("a refused request opens no pipeline")


def test_tokenizing_runs_off_the_event_loop() -> None:
    """The head's Generate hands tokenizing to a worker thread: a huge prompt cannot freeze other sessions."""
    seen: list[threading.Thread] = []

    class Recording(_NoTokenizer):
        def __call__(self, *args: object, **kwargs: object) -> object:
            seen.append(threading.current_thread())
            return {"input_ids": list(range(100))}  # over max_prompt_tokens: refused after tokenizing

    class Aborted(Exception):
        pass

    class Context:
        code: grpc.StatusCode | None = None

        async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: object = ()) -> None:
            self.code = code
            raise Aborted(details)

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}  # a plaintext channel: no identity

    view = SimpleNamespace(head=SimpleNamespace(node_id="node-0"), epoch=1, model_digest="m")
    config = SimpleNamespace(max_prompt_tokens=64, max_new_tokens=32, max_prompt_bytes=1000, max_messages=4,
                             max_sessions=4)
    runtime = SimpleNamespace(
        tls=None, node_id="node-0", config=config, plans=SimpleNamespace(committed=view),
        sessions=SessionRegistry("node-0", 4, _no_segments, lambda *_: None, _no_pipeline),
        admission=BatchAdmission("node-0", 4, 0, 1000),
        generations=Generations(), tokenizing=ThreadPoolExecutor(1),
        manifest=lambda digest: SimpleNamespace(config={"vocab_size": 1000, "max_position_embeddings": 128},
                                                 has_tokenizer=True),
        tokenizer=lambda digest: Recording())
    servicer = NodeServicer(runtime)  # type: ignore[arg-type]
    context = Context()

    async def run() -> threading.Thread:
        loop_thread = threading.current_thread()
        with pytest.raises(Aborted, match="tokens"):
            async for _ in servicer.Generate(_request(), context):
                pass
        return loop_thread

    loop_thread = asyncio.run(run())
    assert context.code == grpc.StatusCode.OUT_OF_RANGE  # over max_prompt_tokens: context length
    assert seen and all(t is not loop_thread for t in seen)
    assert len(runtime.sessions) == 0  # the refused request gave its slot back
