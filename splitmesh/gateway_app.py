"""The OpenAI-compatible HTTP routes: /v1/models, /v1/chat/completions, /v1/completions.

Every request becomes one generation on the mesh through the shared AsyncClient. A stream's first
token is awaited before the response starts, so a request the mesh refuses still gets its proper
HTTP status; after that, errors travel as an OpenAI error event inside the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from splitmesh.client import SplitmeshError, TokenEvent
from splitmesh.gateway_errors import ApiError, from_mesh, install_handlers
from splitmesh.gateway_format import ChunkWriter, Header, Kind, full_body, sse
from splitmesh.gateway_mesh import Mesh
from splitmesh.gateway_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    Generation,
    SamplingFields,
    chat_generation,
    completion_generation,
)

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a caller that hung up; nobody reads the body


async def _first(events: AsyncGenerator[TokenEvent, None]) -> TokenEvent:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise ApiError(502, "the mesh ended the generation without a token") from None


async def _sse(writer: ChunkWriter, first: TokenEvent, events: AsyncGenerator[TokenEvent, None],
               generation: Generation) -> AsyncIterator[bytes]:
    """The event stream. Starlette cancels it when the caller disconnects; closing ``events`` ends the gRPC call."""
    last = first
    async with aclosing(events):
        yield writer.opening(first) + writer.token(first)
        try:
            async for event in events:
                last = event
                chunk = writer.token(event)
                if chunk:
                    yield chunk
        except SplitmeshError as exc:
            yield sse(from_mesh(exc, generation).body())
            return
    yield writer.closing(last)


async def _wait_for_disconnect(request: Request) -> None:
    """Returns once the caller hangs up (the body is already read, so receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``, cancelling it (and so the generation) if the caller disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()  # no effect once it has finished
        await asyncio.wait({task, watcher})
    return None if task.cancelled() else task.result()


async def _collect(events: AsyncGenerator[TokenEvent, None]) -> list[TokenEvent]:
    async with aclosing(events):
        collected = [event async for event in events]
    if not collected:
        raise ApiError(502, "the mesh ended the generation without a token")
    return collected


async def _respond(mesh: Mesh, request: Request, kind: Kind, body: SamplingFields, generation: Generation) -> Response:
    model = await mesh.check_model(body.model)
    try:
        return await _generate(mesh, request, kind, body, generation, model)
    except SplitmeshError as exc:
        raise from_mesh(exc, generation) from exc  # names this request's fields (messages, max_tokens, ...)


async def _generate(mesh: Mesh, request: Request, kind: Kind, body: SamplingFields, generation: Generation,
                    model: str) -> Response:
    created = int(time.time())
    if body.stream:
        events = mesh.events(generation)
        first = await _first(events)
        writer = ChunkWriter(Header.of(kind, first.session_id, created, model), body.include_usage)
        return StreamingResponse(_sse(writer, first, events, generation), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collected = await _unless_disconnected(request, _collect(mesh.events(generation)))
    if collected is None:
        return ApiError(CLIENT_CLOSED_REQUEST, "the client closed the request").response()
    return JSONResponse(full_body(Header.of(kind, collected[0].session_id, created, model), collected))


def _model_card(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "splitmesh"}


def create_app(mesh_address: str, default_max_tokens: int) -> FastAPI:
    """The ASGI app; its lifespan opens the one AsyncClient all requests share."""
    mesh = Mesh(mesh_address)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await mesh.open()
        try:
            yield
        finally:
            await mesh.close()

    app = FastAPI(title="splitmesh OpenAI-compatible gateway", lifespan=lifespan)
    install_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> dict[str, object]:
        return {"object": "list", "data": [_model_card(await mesh.model_name(), started)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, object]:
        return _model_card(await mesh.check_model(model_id), started)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _respond(mesh, request, "chat", body, chat_generation(body, default_max_tokens))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _respond(mesh, request, "text", body, completion_generation(body))

    @app.get("/health", response_model=None)
    async def health() -> Response:
        """200 while the mesh serves, 503 otherwise: for load balancer and container probes."""
        status = await mesh.status()
        if not status.serving:
            return ApiError(503, f"the mesh is not serving: {status.reason}", code="unavailable").response()
        return JSONResponse({"status": "serving", "model": status.model_name, "epoch": status.plan.epoch})

    return app
