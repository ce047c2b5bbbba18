"""A multi-host splitmesh testbed: one namespace per host, shaped links, orchestrator + one node agent per host.

    with Testbed(scenario) as tb:             # namespaces, bridge, shaped links
        tb.start_mesh(adaptive=True)          # orchestrator in its own namespace, a node agent per host
        with tb.client() as client: ...       # the SDK, straight from this process (root uplink)
        tb.set_rate("cloud", 20)              # reshape a link while the mesh runs
        tb.stop_mesh()                        # a fresh mesh (fresh state) per run; the network stays

Teardown (processes, then namespaces and links) runs on ``__exit__``, at interpreter exit and on
SIGTERM/SIGHUP (turned into SystemExit so ``with`` blocks unwind); nothing outlives the run.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from common.proto import splitmesh_pb2 as pb
from common.transport import TLS_ENV
from orchestrator.policy_source import CONFIG_FIELDS
from splitmesh.client import Client, SplitmeshError

from .netns import LinkShape, Network
from .processes import ProcessGroup, hog_argv, in_namespace, python_argv
from .scenario import Scenario

log = logging.getLogger(__name__)

ORCH_HOST = "orch"  # the orchestrator's namespace; its link is not shaped (control plane only)
ORCH_PORT = 50051
NODE_PORT = 50061
DEFAULT_STORE = Path(os.environ.get("SPLITMESH_STORE", "~/.cache/splitmesh/store"))


# Policy keys the orchestrator also takes as start-up flags (value scale): set them at start, so the adaptive
# loop's first decisions already use them instead of racing a later `policy set`.
# The mapping is the orchestrator's own (orchestrator.policy_source); `adaptive` is start_mesh's argument.
POLICY_FLAGS = {name: ("--" + setting.replace("_", "-"), 1.0 / factor)
                for setting, (name, factor) in CONFIG_FIELDS.items() if name != "adaptive"}


def split_policy(policy: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """(orchestrator flags for the keys that have one, the remaining keys for ``Client.policy``)."""
    flags: list[str] = []
    rest: dict[str, str] = {}
    for key, value in policy.items():
        if key in POLICY_FLAGS:
            flag, scale = POLICY_FLAGS[key]
            flags += [flag, f"{float(value) * scale:g}"]
        else:
            rest[key] = value
    return flags, rest


TESTBED_FRAME_TIMEOUT_S = 30.0


@functools.cache
def node_flags() -> frozenset[str]:
    """The node agent's current ``--flags`` (so the testbed uses link probing once the agent has it)."""
    out = subprocess.run(python_argv("node_agent", ["--help"]), capture_output=True, text=True, timeout=120).stdout
    return frozenset(word.rstrip(",") for word in out.split() if word.startswith("--"))


class Testbed:
    """Owns the network and every process of one run; see the module docstring."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, scenario: Scenario, workdir: Path | None = None, store: Path = DEFAULT_STORE) -> None:
        self.scenario = scenario
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="smtb-"))
        self.store = store.expanduser()
        self.network = Network([h.name for h in scenario.hosts] + [ORCH_HOST])
        self.procs = ProcessGroup(self.workdir / "logs")
        self.rates: dict[str, float] = {}
        self._run = 0
        self._mesh: list[str] = []
        self._old_handlers: dict[int, object] = {}
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    def __enter__(self) -> Testbed:
        self._install_hooks()
        try:
            self.network.up()
            for h in self.scenario.hosts:
                self.set_rate(h.name, h.link_mbps)
                if h.hog:
                    self.start_hog(h.name)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process, then remove namespaces and links. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.procs.stop()
        finally:
            self.network.down()
            self._remove_hooks()

    def _install_hooks(self) -> None:
        atexit.register(self.close)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_exit)

    def _remove_hooks(self) -> None:
        atexit.unregister(self.close)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()

    # -- network -----------------------------------------------------------------
    def address(self, host: str) -> str:
        return self.network.addresses[host]

    @property
    def orchestrator_address(self) -> str:
        return f"{self.address(ORCH_HOST)}:{ORCH_PORT}"

    def set_rate(self, host: str, mbps: float) -> None:
        """Shape ``host``'s link to ``mbps`` both ways (tc qdisc replace: safe while traffic flows)."""
        sc = self.scenario
        self.network.shape(host, LinkShape(mbps, sc.link_burst_bytes, sc.link_latency_ms))
        self.rates[host] = mbps
        log.info("link %s -> %g Mbit/s", host, mbps)

    # -- CPU hogs ------------------------------------------------------------------
    def start_hog(self, host: str) -> None:
        """A busy loop in ``host``'s namespace, pinned to the host's CPUs: another tenant on that box."""
        name = f"hog-{host}"
        if not self.procs.running(name):
            cpus = self.scenario.host(host).cpus
            self.procs.start(name, in_namespace(self.network.exec_prefix(host), hog_argv(), cpus))

    def stop_hog(self, host: str) -> None:
        self.procs.stop_one(f"hog-{host}", grace_s=2.0)

    def set_hog(self, host: str, on: bool) -> None:
        (self.start_hog if on else self.stop_hog)(host)

    # -- the mesh ------------------------------------------------------------------
    def start_mesh(self, adaptive: bool, *, policy: dict[str, str] | None = None,
                   boundaries: tuple[int, ...] | None = None, placement: tuple[str, ...] | None = None,
                   orchestrator_args: tuple[str, ...] = (), node_args: tuple[str, ...] = (),
                   hosts: tuple[str, ...] | None = None, timeout_s: float = 180.0) -> pb.StatusReply:
        """Orchestrator and node agents with fresh state; returns once the orchestrator says serving.

        ``hosts`` names the hosts that run a node agent this time (None = all of the scenario's): one network
        can then carry meshes of different shapes, one after the other.

        ``policy`` (Client.policy keys) is applied as start-up flags where the orchestrator has one and
        through the Admin API right after it serves for the rest.
        """
        if self._mesh:
            raise RuntimeError("a mesh is already running: stop_mesh() first")
        sc = self.scenario
        self._run += 1
        state = self.workdir / f"run{self._run}"
        # The caller's TLS settings must not leak in: the testbed runs plaintext dev mode on its private subnet.
        env = {k: v for k, v in os.environ.items() if k not in TLS_ENV}
        bounds = sc.boundaries if boundaries is None else boundaries
        place = sc.placement if placement is None else placement
        policy_args, policy_rest = split_policy(policy or {})
        members = [h for h in sc.hosts if hosts is None or h.name in hosts]
        if hosts is not None and len(members) != len(set(hosts)):
            raise KeyError(f"unknown hosts {sorted(set(hosts) - {h.name for h in members})}")
        args = ["--listen", self.orchestrator_address, "--insecure", "--state-dir", str(state / "orchestrator"),
                "--store", str(self.store), "--model", sc.model, "--min-nodes", str(len(members)),
                "--trusted-nodes", ",".join(h.name for h in members if h.trusted),
                "--adaptive" if adaptive else "--no-adaptive",
                *policy_args, *orchestrator_args]
        if bounds:
            args += ["--boundaries", ",".join(map(str, bounds))]
        if place:
            args += ["--placement", ",".join(place)]
        self._spawn(ORCH_HOST, "orchestrator", args, sc.orchestrator_cpus, env)
        flags = node_flags()
        for h in members:
            addr = f"{self.address(h.name)}:{NODE_PORT}"
            nargs = ["--node-id", h.name, "--listen", addr, "--advertise", addr, "--insecure",
                     "--orchestrator", self.orchestrator_address, "--store", str(self.store),
                     "--state-dir", str(state / h.name), "--threads", str(h.threads or sc.node_threads), *node_args]
            if "--probe-interval-s" in flags:
                nargs += ["--probe-interval-s", str(sc.probe_interval_s), "--probe-bytes", str(sc.probe_bytes)]
            if "--frame-timeout-s" in flags:  # links shaped to 1 Mbit/s carry a 1 MiB activation chunk in ~8 s
                nargs += ["--frame-timeout-s", str(TESTBED_FRAME_TIMEOUT_S)]
            self._spawn(h.name, "node_agent", nargs, h.cpus, env)
        try:
            status = self.wait_serving(timeout_s)
            if policy_rest:
                with self.client(30.0) as client:
                    client.policy(policy_rest)
            return status
        except BaseException:
            self.stop_mesh()
            raise

    def _spawn(self, host: str, module: str, args: list[str], cpus: str, env: dict[str, str]) -> None:
        name = f"run{self._run}-{host}"
        self.procs.start(name, in_namespace(self.network.exec_prefix(host), python_argv(module, args), cpus), env)
        self._mesh.append(name)

    def stop_mesh(self) -> None:
        for name in self._mesh:
            self.procs.stop_one(name)
        self._mesh.clear()

    def check_mesh(self) -> None:
        """RuntimeError (with the log tail) if a mesh process died."""
        self.procs.check_alive(self._mesh)

    def client(self, timeout_s: float = 600.0) -> Client:
        return Client(self.orchestrator_address, timeout_s)

    def wait_serving(self, timeout_s: float = 180.0, epoch_above: int = 0) -> pb.StatusReply:
        deadline = time.monotonic() + timeout_s
        reason = "orchestrator not answering"
        with Client(self.orchestrator_address, 3.0) as client:
            while time.monotonic() < deadline:
                self.check_mesh()
                try:
                    reply = client.status()
                except SplitmeshError as exc:
                    reason = exc.message or exc.code
                else:
                    reason = reply.reason
                    if reply.serving and reply.plan.epoch > epoch_above:
                        return reply
                time.sleep(0.3)
        raise TimeoutError(f"testbed mesh not serving after {timeout_s:.0f}s: {reason} (logs in {self.procs.logdir})")

    def log_tail(self, host: str, lines: int = 20) -> str:
        return self.procs.log_tail(f"run{self._run}-{host}", lines)


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
