"""Faults the chaos and soak benchmarks inject into a local mesh, and the waits that follow them.

Kinds: ``kill`` (SIGKILL, then the node is started again), ``stop`` (SIGSTOP, then SIGCONT) and
``link-cut`` (the TCP proxy in front of the node resets every connection and refuses new ones, then
listens again). A link cut leaves the node alive and reporting to the orchestrator: only its peers
see it go, and their link probes report the link down (see node_agent/link_probe.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable

from bench.tcp_proxy import TcpProxy
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.transport import sync_channel
from splitmesh.launcher import LocalMesh

FAULT_KINDS = ("kill", "stop", "link-cut")


def put_proxies(mesh: LocalMesh, node_ids: Iterable[str]) -> dict[str, TcpProxy]:
    """A started proxy in front of each node; call before the nodes start (they advertise the proxy)."""
    proxies = {}
    for node_id in node_ids:
        proxy = TcpProxy(mesh.node_addresses[node_id])
        mesh.advertise[node_id] = proxy.start()
        proxies[node_id] = proxy
    return proxies


def inject(mesh: LocalMesh, proxies: dict[str, TcpProxy], kind: str, victim: str) -> None:
    if kind == "kill":
        mesh.signal(victim, signal.SIGKILL)
    elif kind == "stop":
        mesh.signal(victim, signal.SIGSTOP)
    elif kind == "link-cut":
        proxies[victim].cut()
    else:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")


def heal(mesh: LocalMesh, proxies: dict[str, TcpProxy], kind: str, victim: str) -> None:
    """Undo a fault: restart a killed node, resume a stopped one, reconnect a cut link."""
    if kind == "kill":
        mesh.processes[victim].wait(timeout=30)
        mesh.start_node(victim)
    elif kind == "stop":
        mesh.signal(victim, signal.SIGCONT)
    elif kind == "link-cut":
        proxies[victim].restore()


def wait_all_alive(mesh: LocalMesh, timeout_s: float = 60.0) -> None:
    """Until every node (a restarted one too) reports to the orchestrator again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = mesh.status()
        if status is not None and sum(n.alive for n in status.nodes) == len(mesh.node_ids):
            return
        time.sleep(0.2)
    raise TimeoutError("a node did not come back")


def links_down(status: pb.StatusReply) -> list[str]:
    return [f"{n.node_id}->{link.peer_id}" for n in status.nodes for link in n.links if link.bandwidth_bps <= 0]


def wait_links_up(mesh: LocalMesh, timeout_s: float = 30.0) -> None:
    """Until no node reports a link down (a healed link is seen again within a probe or two)."""
    deadline = time.monotonic() + timeout_s
    down: list[str] = ["orchestrator not answering"]
    while time.monotonic() < deadline:
        status = mesh.status()
        if status is not None and not (down := links_down(status)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"links still down after {timeout_s:.0f}s: {', '.join(down)}")


def sessions_left(mesh: LocalMesh, settle_s: float = 15.0) -> int:
    """Open sessions on every node once cancellations have had ``settle_s`` to propagate (a leak stays)."""
    deadline = time.monotonic() + settle_s
    while True:
        left = open_sessions(mesh)
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.3)


def open_sessions(mesh: LocalMesh) -> int:
    """Sessions open on every running node, asked at the address each listens on (never through a proxy)."""
    total = 0
    for node, address in mesh.node_addresses.items():
        if mesh.processes[node].poll() is not None:
            continue
        with sync_channel(address, mesh.client_tls) as channel:
            total += pb_grpc.NodeStub(channel).Info(pb.NodeInfoRequest(), timeout=10).active_sessions
    return total
