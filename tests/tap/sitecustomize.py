"""Recording taps for the leak tests, loaded by Python itself when this folder is on a process's path.

In a node agent named in ``SPLITMESH_TAP_NODES`` (comma-separated), every message its gRPC server receives
or sends is written, as it passes, to ``SPLITMESH_TAP_DIR/<node id>.jsonl``: the method, the direction, the
message type, every integer field (with its path) and every field set, and the raw bytes of small messages.
The node agent's own code is unchanged; the tap sits in front of its handlers, where a compromised node
reads its own traffic. Any other process is left alone.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

RAW_LIMIT = 1024  # messages up to this size are kept whole (token frames, opens), activations are not


def _node_id() -> str | None:
    argv = sys.argv
    if "--node-id" in argv[:-1]:
        return argv[argv.index("--node-id") + 1]
    return None


def _fields(message: Any, prefix: str = "") -> tuple[list[tuple[str, int]], list[str]]:
    ints: list[tuple[str, int]] = []
    names: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        names.append(path)
        values = list(value) if field.is_repeated else [value]
        for item in values:
            if hasattr(item, "ListFields"):
                more_ints, more_names = _fields(item, path + ".")
                ints += more_ints
                names += more_names
            elif isinstance(item, int) and not isinstance(item, bool):
                ints.append((path, item))
    return ints, names


class _Recorder:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, method: str, direction: str, message: Any) -> None:
        ints, names = _fields(message)
        raw = message.SerializeToString()
        line = {"method": method, "dir": direction, "type": message.DESCRIPTOR.full_name, "ints": ints,
                "fields": names, "raw": raw.hex() if len(raw) <= RAW_LIMIT else None}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()


def _install(node_id: str, folder: Path) -> None:
    import grpc

    record = _Recorder(folder / f"{node_id}.jsonl")

    class Tap(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped in grpc's stubs
        async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                    details: grpc.HandlerCallDetails) -> Any:
            handler = await continuation(details)
            if handler is None:
                return None
            method: str = details.method
            for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
                behaviour = getattr(handler, kind)
                if behaviour is not None:
                    return handler._replace(**{kind: _wrap(method, kind, behaviour)})
            return handler

    def _wrap(method: str, kind: str, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def requests_of(request: Any) -> Any:
            if not kind.startswith("stream"):
                record(method, "in", request)
                return request

            async def tapped() -> AsyncIterator[Any]:
                async for item in request:
                    record(method, "in", item)
                    yield item
            return tapped()

        if inspect.isasyncgenfunction(behaviour) or kind.endswith("stream"):
            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                async for reply in behaviour(requests_of(request), context):
                    record(method, "out", reply)
                    yield reply
            return stream

        async def call(request: Any, context: Any) -> Any:
            reply = await behaviour(requests_of(request), context)
            if reply is not None:
                record(method, "out", reply)
            return reply
        return call

    real_server = grpc.aio.server

    def server(*args: Any, interceptors: Any = (), **kwargs: Any) -> Any:
        return real_server(*args, interceptors=[Tap(), *interceptors], **kwargs)

    grpc.aio.server = server


def _maybe_install() -> None:
    wanted = set(filter(None, os.environ.get("SPLITMESH_TAP_NODES", "").split(",")))
    node_id = _node_id()
    folder = os.environ.get("SPLITMESH_TAP_DIR")
    if node_id in wanted and folder:
        _install(node_id, Path(folder))


_maybe_install()
