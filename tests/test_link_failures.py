"""Lost nodes and broken links as the orchestrator sees them, and the TCP proxy that cuts links in trials."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import cast

import grpc
import pytest

from bench.tcp_proxy import TcpProxy
from common.proto import splitmesh_pb2 as pb
from node_agent.link_probe import LinkProber
from node_agent.pipeline import ChannelPool
from node_agent.runtime import NodeRuntime
from orchestrator.environment import cluster_state
from orchestrator.policy import Policy
from orchestrator.registry import LINK_SETTLE_S, Registry


def _register(registry: Registry, node_id: str) -> None:
    registry.register(pb.RegisterRequest(node_id=node_id, address=f"{node_id}:1", capacity=pb.Capacity(
        memory_available_bytes=8 << 30)))


def test_unregistered_plan_node_is_lost_only_after_the_rejoin_grace() -> None:
    registry = Registry({"a"}, dead_after_s=3.0, rejoin_grace_s=0.2)
    assert not registry.lost("a")  # just restarted: it may still register
    _register(registry, "b")
    assert not registry.lost("b")
    registry.lost_stream("b", registry.nodes["b"].registered_at)
    assert registry.lost("b")  # registered, then its report stream ended
    time.sleep(0.25)
    assert registry.lost("a")


def test_a_link_reported_down_is_left_out_of_the_cluster() -> None:
    registry = Registry({"a"}, dead_after_s=3.0)
    for n in ("a", "b", "c"):
        _register(registry, n)
    registry.report(pb.NodeReport(node_id="a", links=[pb.LinkStatus(peer_id="b", bandwidth_bps=0.0, rtt_ms=-1),
                                                      pb.LinkStatus(peer_id="c", bandwidth_bps=5e8, rtt_ms=0.1)]))
    assert not registry.link_down("a", "b")  # b has just registered: a's mark may predate it
    registry.nodes["b"].registered_at -= LINK_SETTLE_S
    assert registry.link_down("a", "b") and not registry.link_down("a", "c") and not registry.link_down("b", "a")
    links = cluster_state(registry.alive_nodes(), Policy()).links
    assert ("a", "b") not in links  # no default fills in for a link known to be down
    assert links[("a", "c")].bandwidth_bps == 5e8
    assert ("b", "a") in links and ("c", "b") in links  # unmeasured links keep the default


def _echo_server() -> tuple[socket.socket, str]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


def _connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def test_proxy_forwards_then_cuts_and_restores() -> None:
    server, target = _echo_server()
    proxy = TcpProxy(target)
    try:
        address = proxy.start()
        conn = _connect(address)
        conn.sendall(b"hello")
        assert conn.recv(16) == b"hello"
        proxy.cut()
        with pytest.raises(OSError):  # the open connection is reset ...
            conn.sendall(b"again")
            if not conn.recv(16):
                raise ConnectionResetError("closed")
        with pytest.raises(ConnectionRefusedError):  # ... and new ones are refused
            _connect(address)
        proxy.restore()
        assert proxy.address == address
        with _connect(address) as again:
            again.sendall(b"back")
            assert again.recv(16) == b"back"
        conn.close()
    finally:
        proxy.close()
        server.close()


async def _probe(request: pb.ProbeRequest, context: object) -> pb.ProbeReply:
    return pb.ProbeReply(received_bytes=len(request.payload))


def _probe_only_node() -> grpc.GenericRpcHandler:
    """A Node service that answers only Probe: all a link prober talks to."""
    handler = grpc.unary_unary_rpc_method_handler(_probe, request_deserializer=pb.ProbeRequest.FromString,
                                                  response_serializer=pb.ProbeReply.SerializeToString)
    return grpc.method_handlers_generic_handler("splitmesh.v1.Node", {"Probe": handler})


async def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_prober_reports_a_cut_link_down_at_once_and_back_after_repair() -> None:
    asyncio.run(_cut_and_repair())


async def _cut_and_repair() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_probe_only_node(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = TcpProxy(f"127.0.0.1:{port}")
    address = await asyncio.to_thread(proxy.start)
    channels = ChannelPool()
    runtime = SimpleNamespace(node_id="a", tls=None, channels=channels,
                              config=SimpleNamespace(probe_bytes=1 << 16, probe_interval_s=60.0,
                                                     probe_bandwidth_window=1, probe_rtt_window=5),
                              plans=SimpleNamespace(committed=SimpleNamespace(addresses={"a": "-", "b": address})))
    prober = LinkProber(cast(NodeRuntime, runtime))
    task = asyncio.create_task(prober.run())  # one full round now, then only the watch until the next
    try:
        await _until(lambda: prober.links.get("b") is not None and prober.links["b"].bandwidth_bps > 0)
        await asyncio.to_thread(proxy.cut)
        cut_at = time.monotonic()
        await _until(lambda: "b" in prober.down)
        assert prober.changed.is_set() and prober.links["b"].bandwidth_bps == 0
        assert time.monotonic() - cut_at < 3.0  # the watch noticed the closed connection, no full round needed
        prober.changed.clear()
        await asyncio.to_thread(proxy.restore)
        await _until(lambda: "b" not in prober.down)
        assert prober.changed.is_set() and prober.links["b"].bandwidth_bps > 0
    finally:
        task.cancel()
        await channels.close()
        await asyncio.to_thread(proxy.close)
        await server.stop(None)
