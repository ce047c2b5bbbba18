"""Start a whole local mesh (orchestrator + N node agents) as separate processes on loopback.

Used by ``splitmesh up``/``demo`` and by the test fixtures, so tests run exactly what users run.
With ``MeshSpec.tls`` the mesh gets its own CA and certificates (orchestrator, every node, a client
and an operator) in ``WORKDIR/tls`` and every channel is mutual TLS; ``LocalMesh.client_tls`` is
what an SDK or test presents, ``LocalMesh.operator_tls`` what changes the mesh.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc

from common import certs
from common.certs import Identity
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from common.tls import TlsConfig
from common.transport import DEFAULT_CLIENT_ID, DEFAULT_OPERATOR_ID, DEFAULT_ORCHESTRATOR_ID, TLS_ENV, sync_channel
from orchestrator.registry import NodeRecord
from orchestrator.static_placement import PlacementError, place
from splitmesh.client import Client

log = logging.getLogger(__name__)


EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()  # ports this process already named: two nodes of one mesh never share one


def ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections and ``bind(0)`` (Linux's default where unknown)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A free loopback port for a server that binds it later, chosen outside the ephemeral range.

    A port from ``bind(0)`` is ephemeral: between choosing it and a node binding it (seconds, while the
    node imports torch) any outgoing connection of the box, the mesh's own included, may take it as its
    source port, and the node then fails to start. Ports below the ephemeral range are only ever taken by
    servers that bind them on purpose.
    """
    ephemeral = ephemeral_ports()
    pool = range(10000, ephemeral.start) if ephemeral.start > 11000 else range(ephemeral.stop, 65536)
    if len(pool) < 1000:
        pool = range(1024, 65536)
    for _ in range(200):
        port = random.choice(pool)
        if port in _handed_out or port in ephemeral or port_taken(port):
            continue
        _handed_out.add(port)
        return port
    raise MeshStartError(f"no free loopback port in {pool.start}-{pool.stop - 1}")


@dataclass
class MeshSpec:
    nodes: int = 3  # node agents to start
    store: Path = Path("~/.cache/splitmesh/store")  # model store shared by every local process
    workdir: Path = Path("~/.cache/splitmesh/local")  # state and logs of this mesh
    model: str = "smollm2-135m-instruct"  # model name in the store
    orchestrator_port: int = 50051  # 0 picks a free port
    trusted: Sequence[str] = ("node-0",)  # nodes allowed to host privacy-critical segments
    boundaries: Sequence[int] = ()  # initial boundaries; empty = even split
    placement: Sequence[str] = ()  # initial node per segment; empty = automatic
    threads: int = 0  # torch threads per node; 0 = all cores
    metrics_port: int = 0  # orchestrator's Prometheus port (0 = off)
    # On a reused workdir the nodes start with the orchestrator, and a node agent takes tens of seconds to start on
    # a busy box: the orchestrator's 10 s default would replace a plan whose node is still booting. Used only when
    # every node of the saved plan is one this mesh starts (else that node is gone for good: the default applies).
    rejoin_grace_s: float = 120.0
    adaptive: bool = False  # run the orchestrator's adaptive loop (off: plans change by operator or node loss)
    node_stores_empty: bool = False  # give each node its own empty store: weights stream from the orchestrator
    tls: bool = False  # mutual TLS on every channel, with a CA and certificates made in WORKDIR/tls
    encrypt_activations: bool = True  # seal activation frames on every node-to-node hop
    advertise: dict[str, str] = field(default_factory=dict)  # node id -> address peers dial (e.g. a TCP proxy)
    extra_env: dict[str, str] = field(default_factory=dict)


class MeshStartError(RuntimeError):
    """The mesh cannot start, or a process of it died while starting; the message says why."""


def port_taken(port: int) -> bool:
    """Whether a server listens on 127.0.0.1:port (connections of a stopped one in TIME_WAIT do not count,
    as for gRPC's own bind)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def check_spec(spec: MeshSpec, num_layers: int) -> None:
    """Refuse, before any process starts, a mesh whose first plan the orchestrator could never make.

    The checks are the orchestrator's own (``place``) on the nodes this mesh will have, so the message
    is the one its log would repeat every tick while the mesh waited for a plan.
    """
    if spec.nodes < 1:
        raise MeshStartError(f"a mesh needs at least one node, got --nodes {spec.nodes}")
    node_ids = [f"node-{i}" for i in range(spec.nodes)]
    unknown = [n for n in spec.trusted if n not in node_ids]
    if unknown:
        raise MeshStartError(f"--trusted names {', '.join(unknown)}, not a node of this mesh "
                             f"({', '.join(node_ids)})")
    records = [NodeRecord(node_id=n, address="", trusted=n in spec.trusted, model_digests=set(),
                          capacity=pb.Capacity()) for n in node_ids]
    try:
        place(records, num_layers, spec.boundaries, spec.placement)
    except PlacementError as exc:
        raise MeshStartError(f"the orchestrator could not make the first plan: {exc}") from exc
    if spec.orchestrator_port and port_taken(spec.orchestrator_port):
        raise MeshStartError(f"127.0.0.1:{spec.orchestrator_port} is already in use (another mesh? try "
                             f"`splitmesh status --address 127.0.0.1:{spec.orchestrator_port}`); "
                             "choose another port with --address")
    if spec.metrics_port and port_taken(spec.metrics_port):
        raise MeshStartError(f"metrics port {spec.metrics_port} is already in use")


def log_tail(path: Path, lines: int = 6) -> str:
    """The last lines of a process log: where an exited process said why."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])


def ensure_local_pki(directory: Path, node_ids: Sequence[str]) -> TlsConfig:
    """A CA plus orchestrator, node, client and operator certificates (kept if present); returns the client's."""
    if not (directory / "ca.crt").exists():
        certs.init_ca(directory)
    wanted = [(DEFAULT_ORCHESTRATOR_ID, "orchestrator"), (DEFAULT_CLIENT_ID, "client"),
              (DEFAULT_OPERATOR_ID, "operator")]
    for name, kind in [*wanted, *((n, "node") for n in node_ids)]:
        if not (directory / f"{name}.crt").exists():
            certs.issue(directory, name, kind)
    return TlsConfig.from_dir(directory, DEFAULT_CLIENT_ID)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) between a fork and its bookkeeping would orphan the child, which stop() would then
    not know: such a signal is held and delivered, to the handler it was meant for, once the block is done.
    (A blocked signal mask would be inherited by the child and keep it from ever stopping.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run in the main thread only: no signal interrupts this one
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for held in pending:
            signal.raise_signal(held)


class LocalMesh:
    def __init__(self, spec: MeshSpec) -> None:
        self.spec = spec
        self.store = spec.store.expanduser()
        self.workdir = spec.workdir.expanduser()
        port = spec.orchestrator_port or free_port()
        self.address = f"127.0.0.1:{port}"
        self.node_ids = [f"node-{i}" for i in range(spec.nodes)]
        self.node_addresses = {n: f"127.0.0.1:{free_port()}" for n in self.node_ids}  # where each node listens
        self.advertise = dict(spec.advertise)  # set before start_node to put something in front of a node
        # With orchestrator metrics on, every node exports its own too, on a port of its own.
        self.node_metrics_ports = {n: free_port() if spec.metrics_port else 0 for n in self.node_ids}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []
        self.tls_dir = self.workdir / "tls"
        self.client_tls: TlsConfig | None = ensure_local_pki(self.tls_dir, self.node_ids) if spec.tls else None
        self.operator_tls = TlsConfig.from_dir(self.tls_dir, DEFAULT_OPERATOR_ID) if spec.tls else None

    def _tls_args(self) -> list[str]:
        return ["--tls-dir", str(self.tls_dir)] if self.spec.tls else []

    def client(self, timeout_s: float = 600.0, *, operator: bool = False) -> Client:
        """An SDK client for this mesh, with the mesh's client (or operator) certificate when TLS is on."""
        return Client(self.address, timeout_s, tls=self.operator_tls if operator else self.client_tls)

    def _spawn(self, name: str, module: str, args: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log_file)
        # The mesh's own flags decide TLS: settings from the caller's environment must not leak into it.
        inherited = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
        env = {**inherited, "PYTHONUNBUFFERED": "1", **self.spec.extra_env}
        with _signals_deferred():
            self.processes[name] = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log_file,
                                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def start_orchestrator(self, nodes_booting: bool = False) -> None:
        """``nodes_booting``: the nodes start with it (``start``), so plan nodes get the long rejoin grace."""
        s = self.spec
        args = ["--listen", self.address, "--state-dir", str(self.workdir / "orchestrator"), "--store", str(self.store),
                "--model", s.model, "--min-nodes", str(s.nodes), "--trusted-nodes", ",".join(s.trusted),
                "--adaptive" if s.adaptive else "--no-adaptive", "--metrics-port", str(s.metrics_port),
                *(self._rejoin_args() if nodes_booting else []),
                *self._tls_args()]
        if s.boundaries:
            args += ["--boundaries", ",".join(map(str, s.boundaries))]
        if s.placement:
            args += ["--placement", ",".join(s.placement)]
        self._spawn("orchestrator", "orchestrator", args)

    def _rejoin_args(self) -> list[str]:
        from orchestrator.state_store import StateStore

        path = self.workdir / "orchestrator" / "state.sqlite"
        if not path.exists():
            return []
        store = StateStore(path)
        try:
            saved = store.committed_plan()
        finally:
            store.close()
        if saved is None:
            return []
        plan = pb.Plan()
        plan.ParseFromString(saved.plan_bytes)
        if not {seg.node_id for seg in plan.segments} <= set(self.node_ids):
            return []
        return ["--rejoin-grace-s", str(self.spec.rejoin_grace_s)]

    def start_node(self, node_id: str) -> None:
        store = self.workdir / "node-stores" / node_id if self.spec.node_stores_empty else self.store
        args = ["--node-id", node_id, "--listen", self.node_addresses[node_id], "--orchestrator", self.address,
                "--store", str(store), "--state-dir", str(self.workdir / "nodes"),
                "--threads", str(self.spec.threads), *self._tls_args(),
                "--encrypt-activations" if self.spec.encrypt_activations else "--no-encrypt-activations",
                "--metrics-port", str(self.node_metrics_ports[node_id])]
        if node_id in self.advertise:
            args += ["--advertise", self.advertise[node_id]]
        self._spawn(node_id, "node_agent", args)

    def start(self, timeout_s: float = 180.0) -> pb.StatusReply:
        """Start every process and return the first status that says the mesh is serving."""
        self.start_orchestrator(nodes_booting=True)
        for node_id in self.node_ids:
            self.start_node(node_id)
        return self.wait_serving(timeout_s)

    def status(self) -> pb.StatusReply | None:
        orchestrator = Identity("orchestrator", DEFAULT_ORCHESTRATOR_ID)
        with sync_channel(self.address, self.client_tls, orchestrator) as channel:
            try:
                reply: pb.StatusReply = pb_grpc.AdminStub(channel).Status(pb.StatusRequest(), timeout=2)
                return reply
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout_s: float = 180.0, epoch_above: int = 0) -> pb.StatusReply:
        deadline = time.monotonic() + timeout_s
        last_reason = "orchestrator not answering"
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    log_path = self.workdir / f"{name}.log"
                    raise MeshStartError(f"{name} exited with {proc.returncode}:\n{log_tail(log_path)}\n"
                                         f"(full log: {log_path})")
            reply = self.status()
            if reply is not None:
                last_reason = reply.reason
                if reply.serving and reply.plan.epoch > epoch_above:
                    return reply
            time.sleep(0.2)
        raise MeshStartError(f"mesh not serving after {timeout_s:.0f}s: {last_reason} (logs in {self.workdir})")

    def signal(self, name: str, sig: int) -> None:
        self.processes[name].send_signal(sig)

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing it", name, grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for fh in self._logs:
            fh.close()
        self._logs.clear()

    def __enter__(self) -> LocalMesh:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
