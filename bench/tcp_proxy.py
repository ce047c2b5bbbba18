"""A user-space TCP proxy whose link can be cut and restored, for link-failure trials.

A node listens on its own port and advertises the proxy's, so every peer (and the orchestrator's
control calls) reaches it through the proxy, while its own outbound connections (reports to the
orchestrator, activations to the next node) do not pass through it. ``cut()`` resets every
connection through the proxy and closes its listening socket, so new connections are refused: the
node stays alive and keeps reporting, but nobody can reach it. ``restore()`` listens again on the
same port. The proxy runs its own asyncio loop in a daemon thread, so blocking code can drive it.

    proxy = TcpProxy("127.0.0.1:50061")    # forwards 127.0.0.1:<free port> -> 127.0.0.1:50061
    proxy.start(); proxy.cut(); proxy.restore(); proxy.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 1 << 16


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class TcpProxy:
    def __init__(self, target: str, listen: str = "127.0.0.1:0") -> None:
        self.target = target
        self._host, self._port = _split(listen)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy->{target}", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted since start

    @property
    def address(self) -> str:
        """host:port the proxy listens on (known once started)."""
        return f"{self._host}:{self._port}"

    @property
    def is_cut(self) -> bool:
        return self._server is None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def start(self) -> str:
        self._thread.start()
        self._run(self._listen())
        return self.address

    def cut(self) -> None:
        """Reset every open connection and refuse new ones."""
        self._run(self._cut())

    def restore(self) -> None:
        if self.is_cut:
            self._run(self._listen())

    def close(self) -> None:
        if self._thread.is_alive():
            self._run(self._cut())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, self._port, reuse_address=True)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # RST, as a broken link looks to both ends
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            host, port = _split(self.target)
            upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            log.debug("proxy to %s: %s", self.target, exc)
            client_writer.transport.abort()
            return
        if self.is_cut:  # cut while connecting
            client_writer.transport.abort()
            upstream_writer.transport.abort()
            return
        self._writers.update((client_writer, upstream_writer))
        await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))
        self._writers.difference_update((client_writer, upstream_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.close()
