"""The OpenAI-compatible gateway, driven by the official openai client: same text as the SDK, OpenAI errors."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from transformers import PreTrainedTokenizerBase

from common.grpc_options import CHANNEL_OPTIONS
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from splitmesh.client import Client, TokenEvent
from splitmesh.gateway import build_app
from splitmesh.gateway_schema import FINISH_REASONS
from splitmesh.launcher import LocalMesh, free_port

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three primary colours."}]
RAW = "The three primary colours are"
LONG = 2000  # a generation no test waits for: it is there to be cancelled
MAX_TOKENS = 8  # the mesh fixture decodes through 5 processes on a shared CPU: keep generations short


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """uvicorn in a background thread on a socket bound here, so the port is known before it starts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _openai(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def gateway(mesh: LocalMesh) -> Iterator[str]:
    with running(build_app(mesh.address)) as url:
        yield url


@pytest.fixture(scope="module")
def api(gateway: str) -> OpenAI:
    return _openai(gateway)


@pytest.fixture(scope="module")
def model(mesh: LocalMesh) -> str:
    with Client(mesh.address) as client:
        return client.status().model_name


def _sdk(mesh: LocalMesh, prompt: object, **kwargs: object) -> list[TokenEvent]:
    """The oracle: the same greedy request through the SDK."""
    with Client(mesh.address) as client:
        return list(client.generate(prompt, max_new_tokens=MAX_TOKENS, temperature=0.0, **kwargs))  # type: ignore[arg-type]


def _usage(events: list[TokenEvent]) -> tuple[int, int, int]:
    last = events[-1]
    assert last.completion_tokens == len(events)
    return last.prompt_tokens, len(events), last.prompt_tokens + len(events)


# ------------------------------------------------------------------ without a mesh
def test_an_unreachable_mesh_is_503_and_bad_bodies_are_still_400() -> None:
    with running(build_app(f"127.0.0.1:{free_port()}")) as url:
        api = _openai(url)
        with pytest.raises(openai.InternalServerError) as caught:
            api.models.list()
        assert caught.value.status_code == 503 and caught.value.code == "unavailable"
        with pytest.raises(openai.BadRequestError) as bad:
            api.chat.completions.create(model="m", messages=CHAT, n=2)
        assert bad.value.param == "n" and bad.value.type == "invalid_request_error"
        for request, status in ((urllib.request.Request(f"{url}/v1/nope"), 404),
                                (urllib.request.Request(f"{url}/v1/completions", data=b"{bad"), 400)):
            with pytest.raises(urllib.error.HTTPError) as caught_http:
                urllib.request.urlopen(request, timeout=10)
            assert caught_http.value.code == status
            assert set(json.loads(caught_http.value.read())["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------ against the live mesh
@pytest.mark.slow
def test_models_lists_the_served_model(api: OpenAI, model: str) -> None:
    assert [m.id for m in api.models.list().data] == [model]
    assert api.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")


@pytest.mark.slow
def test_chat_completion_equals_the_sdk(api: OpenAI, mesh: LocalMesh, model: str) -> None:
    events = _sdk(mesh, CHAT)
    reply = api.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                        max_completion_tokens=MAX_TOKENS)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(e.text for e in events)
    assert choice.finish_reason == FINISH_REASONS[events[-1].finish_reason]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == _usage(events)
    assert reply.model == model and reply.object == "chat.completion"


@pytest.mark.slow
def test_streamed_chat_completion_equals_the_sdk(api: OpenAI, mesh: LocalMesh, model: str) -> None:
    events = _sdk(mesh, CHAT)
    stream = api.chat.completions.create(model=model, messages=CHAT, temperature=0,
                                         max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(e.text for e in events)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [FINISH_REASONS[events[-1].finish_reason]]
    assert not chunks[-1].choices and chunks[-1].usage is not None  # the usage chunk comes last
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == _usage(events)
    assert len({c.id for c in chunks}) == 1


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_completion_of_a_raw_prompt_equals_the_sdk(api: OpenAI, mesh: LocalMesh, model: str, stream: bool) -> None:
    events = _sdk(mesh, RAW)
    expected = "".join(e.text for e in events)
    if stream:
        chunks = list(api.completions.create(model=model, prompt=RAW, temperature=0, max_tokens=MAX_TOKENS,
                                             stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        usage = chunks[-1].usage
        reason = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    else:
        reply = api.completions.create(model=model, prompt=RAW, temperature=0, max_tokens=MAX_TOKENS)
        assert reply.choices[0].text == expected
        usage = reply.usage
        reason = reply.choices[0].finish_reason
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == _usage(events)
    assert reason == FINISH_REASONS[events[-1].finish_reason]


@pytest.mark.slow
def test_token_id_prompts_and_stop_strings(api: OpenAI, mesh: LocalMesh, model: str,
                                           tokenizer: PreTrainedTokenizerBase) -> None:
    ids = [int(i) for i in tokenizer(RAW)["input_ids"]]
    events = _sdk(mesh, ids, ignore_eos=True)
    reply = api.completions.create(model=model, prompt=ids, temperature=0, max_tokens=MAX_TOKENS,
                                   extra_body={"ignore_eos": True})
    assert reply.choices[0].text == "".join(e.text for e in events)
    assert reply.choices[0].finish_reason == "length" and reply.usage and reply.usage.completion_tokens == MAX_TOKENS
    full = reply.choices[0].text
    stop = full.strip().split()[1]
    stopped = api.completions.create(model=model, prompt=ids, temperature=0, max_tokens=MAX_TOKENS, stop=stop)
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text and full.startswith(stopped.choices[0].text)


@pytest.mark.slow
def test_seeded_sampling_is_reproducible(api: OpenAI, model: str) -> None:
    def run(seed: int) -> str | None:
        reply = api.completions.create(model=model, prompt="Once upon a time", temperature=0.9, seed=seed,
                                       max_tokens=6, extra_body={"ignore_eos": True})
        return reply.choices[0].text

    first = run(7)
    assert run(7) == first
    assert run(8) != first


@pytest.mark.slow
def test_stream_is_server_sent_events_ending_with_done(gateway: str, model: str) -> None:
    body = {"model": model, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(f"{gateway}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [part for part in raw.split("\n\n") if part]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


@pytest.mark.slow
@pytest.mark.parametrize(("kwargs", "error", "param"), [
    ({"n": 2}, openai.BadRequestError, "n"),
    ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
    ({"messages": []}, openai.BadRequestError, "messages"),
    ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
    ({"temperature": -1}, openai.BadRequestError, "temperature"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "t"}]}, openai.BadRequestError,
     "messages[0].role"),
    ({"logprobs": True}, openai.BadRequestError, "logprobs"),
    ({"stop": [""]}, openai.BadRequestError, None),  # refused by the mesh itself (INVALID_ARGUMENT)
])
def test_bad_requests_get_openai_errors(api: OpenAI, model: str, kwargs: dict[str, object],
                                        error: type[openai.APIStatusError], param: str | None) -> None:
    request: dict[str, object] = {"model": model, "messages": CHAT, "max_tokens": 4, **kwargs}
    for stream in (False, True):
        with pytest.raises(error) as caught:
            list(api.chat.completions.create(**request, stream=stream))  # type: ignore[call-overload]
        assert caught.value.param == param
        assert isinstance(caught.value.body, dict)
        assert set(caught.value.body) == {"message", "type", "param", "code"}
        assert caught.value.type == "invalid_request_error"


def _plan_nodes(mesh: LocalMesh) -> dict[str, str]:
    with Client(mesh.address) as client:
        plan = client.plan()
    used = {s.node_id for s in plan.segments}
    return {n.node_id: n.address for n in plan.nodes if n.node_id in used}


def _active_sessions(address: str) -> int:
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        return int(pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions)


def _wait_until_idle(mesh: LocalMesh) -> None:
    """Every node of the plan drops the session soon after the gRPC call is cancelled."""
    for node_id, address in _plan_nodes(mesh).items():
        deadline = time.monotonic() + 10
        while _active_sessions(address) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _active_sessions(address) == 0, node_id


def _busy(mesh: LocalMesh) -> bool:
    return any(_active_sessions(address) for address in _plan_nodes(mesh).values())


@pytest.mark.slow
def test_a_client_hanging_up_a_stream_cancels_the_generation(api: OpenAI, mesh: LocalMesh, model: str) -> None:
    stream = api.chat.completions.create(model=model, messages=CHAT, max_tokens=LONG, stream=True,
                                         extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert _busy(mesh)
    stream.close()
    _wait_until_idle(mesh)


@pytest.mark.slow
def test_a_client_hanging_up_a_plain_request_cancels_the_generation(gateway: str, mesh: LocalMesh,
                                                                    model: str) -> None:
    body = {"model": model, "messages": CHAT, "max_tokens": LONG, "ignore_eos": True}
    request = urllib.request.Request(f"{gateway}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(request, timeout=2)  # gives up, closing the connection, long before LONG tokens
    _wait_until_idle(mesh)  # within seconds: the generation itself would take minutes


@pytest.mark.slow
def test_openai_error_shapes_for_lengths_and_stops(api: OpenAI, model: str) -> None:
    long_text = "hello " * 5000  # over the head's 4096-token prompt limit
    with pytest.raises(openai.BadRequestError) as chat:
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": long_text}], max_tokens=4)
    assert (chat.value.code, chat.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as text:
        api.completions.create(model=model, prompt=long_text, max_tokens=4)
    assert (text.value.code, text.value.param) == ("context_length_exceeded", "prompt")
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as too_many:
            api.chat.completions.create(model=model, messages=CHAT, **{field: 5000})  # type: ignore[call-overload]
        assert too_many.value.param == field and "max_new_tokens" not in too_many.value.message
        assert f"{field} is too large: 5000" in too_many.value.message and "at most 2048" in too_many.value.message
    with pytest.raises(openai.BadRequestError) as stops:
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=4, stop=["a", "b", "c", "d", "e"])
    assert stops.value.param == "stop"
    four = api.chat.completions.create(model=model, messages=CHAT, max_tokens=2, stop=["a1", "b1", "c1", "d1"])
    assert four.choices[0].finish_reason in ("length", "stop")


@pytest.mark.slow
def test_an_empty_completions_prompt_is_allowed(api: OpenAI, model: str) -> None:
    reply = api.completions.create(model=model, prompt="", temperature=0, max_tokens=3)
    assert reply.usage is not None and reply.usage.prompt_tokens == 1  # the beginning-of-sequence token
    assert reply.usage.completion_tokens >= 1
