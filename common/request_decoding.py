"""Request bytes that do not parse get INVALID_ARGUMENT, on every method of a server.

gRPC's own handling of a request that fails to deserialize ends the call with UNKNOWN (asyncio server)
or INTERNAL (sync server), which reads as a server bug and says nothing to the caller. This interceptor
decodes requests itself: a :class:`DecodeError` (corrupt wire format, a string field holding invalid
UTF-8) becomes a :class:`Malformed` marker, and the call is aborted with INVALID_ARGUMENT before the
servicer sees it; on a request stream, when the bad message arrives.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Malformed:
    """Stands in for a request that did not parse; carries the parser's reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except DecodeError as exc:
            return Malformed(str(exc))
    return deserialize


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: Malformed) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {bad.reason}")


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await _refuse(context, request)
        yield request


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def uu(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            return await unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(uu, deserialize, serialize)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream
        if inspect.isasyncgenfunction(unary_stream):
            async def us(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                if isinstance(request, Malformed):
                    await _refuse(context, request)
                async for reply in unary_stream(request, context):
                    yield reply
            return grpc.unary_stream_rpc_method_handler(us, deserialize, serialize)

        async def us_writer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if isinstance(request, Malformed):
                await _refuse(context, request)
            await unary_stream(request, context)
        return grpc.unary_stream_rpc_method_handler(us_writer, deserialize, serialize)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def su(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await stream_unary(_checked(requests, context), context)
        return grpc.stream_unary_rpc_method_handler(su, deserialize, serialize)
    stream_stream = handler.stream_stream
    if inspect.isasyncgenfunction(stream_stream):
        async def ss(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async for reply in stream_stream(_checked(requests, context), context):
                yield reply
        return grpc.stream_stream_rpc_method_handler(ss, deserialize, serialize)

    async def ss_writer(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await stream_stream(_checked(requests, context), context)
    return grpc.stream_stream_rpc_method_handler(ss_writer, deserialize, serialize)


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no stubs for it
    """Install on a ``grpc.aio`` server: undecodable requests are INVALID_ARGUMENT, never UNKNOWN."""

    def __init__(self) -> None:
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}  # one wrapper per method

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = _wrap(handler)
        return wrapped
