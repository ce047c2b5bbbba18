"""Hosts as Linux network namespaces on a private bridge, each link shaped with ``tc tbf``.

Layout (``P`` = the run's prefix, e.g. ``smtb-1234``):
  * ``P-br``: a namespace holding only the bridge ``br0`` and the bridge-side veth end of every host, so
    nothing about the bridge (br_netfilter, forwarding) touches the root namespace;
  * ``P-HOST``: one namespace per host with ``lo`` and ``eth0`` (its end of the veth into the bridge);
  * one veth ``smtbPID`` in the root namespace, also on the bridge, so processes of this run (the benchmark,
    pytest) reach the hosts without entering a namespace. It is the only thing created outside our namespaces.
Every host link is shaped on both ends (egress of ``eth0`` = upload, egress of the bridge-side end = download).
Everything is removed by :meth:`Network.down`, which is idempotent and safe to call from atexit or a signal.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

ROOT_PREFIX = "smtb"  # every name this module creates starts with it


class NetnsError(RuntimeError):
    """A namespace, link or qdisc command failed."""


def ip_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (or ``tc`` when the first arg is "tc"); raise NetnsError with stderr on failure."""
    argv = list(args) if args[0] == "tc" else ["ip", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no ``ip``/``tc``, creation refused), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    name = f"{ROOT_PREFIX}-{os.getpid()}-check"
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network routed or assigned in the root namespace, so ours collides with none."""
    out: list[ipaddress.IPv4Network] = []
    routes = json.loads(ip_cmd("-j", "-4", "route", "show", "table", "all").stdout or "[]")
    for r in routes:
        dst = str(r.get("dst", ""))
        if dst and dst != "default":
            try:
                out.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
    return out


def pick_subnet(seed: int) -> ipaddress.IPv4Network:
    """A free /24 in 10.213.0.0/16 (starting from ``seed``, e.g. the pid, so parallel runs spread out)."""
    used = _used_networks()
    for i in range(256):
        net = ipaddress.IPv4Network(f"10.213.{(seed + i) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError("no free /24 left in 10.213.0.0/16")


@dataclass(frozen=True)
class LinkShape:
    """tbf parameters of one host link (the same on both directions)."""

    mbps: float  # rate in Mbit/s
    burst_bytes: int = 0  # 0 = max(64 KiB, 5 ms at the rate): veth sends up to 64 KiB GSO frames
    latency_ms: float = 200.0  # how long a packet may queue in tbf before it is dropped

    def tbf_args(self) -> list[str]:
        rate_bps = self.mbps * 1e6
        burst = self.burst_bytes or max(64 * 1024, int(rate_bps / 8 * 0.005))
        return ["tbf", "rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", f"{self.latency_ms:g}ms"]


@dataclass
class Network:
    """The namespaces, bridge and veths of one run; ``up`` builds, ``down`` removes everything."""

    hosts: list[str]  # host names (short: letters, digits, '-')
    pid: int = field(default_factory=os.getpid)  # names carry it, so `cleanup` can tell dead runs apart
    subnet: ipaddress.IPv4Network | None = None  # None = pick a free /24
    addresses: dict[str, str] = field(default_factory=dict)  # host -> IPv4 address, filled by up()
    _created: list[str] = field(default_factory=list)  # namespaces we made, for down()
    _root_link: str = ""

    @property
    def prefix(self) -> str:
        return f"{ROOT_PREFIX}-{self.pid}"

    @property
    def root_link(self) -> str:
        return f"{ROOT_PREFIX}{self.pid}"[:15]

    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}-br"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @staticmethod
    def bridge_port(index: int) -> str:
        return f"v{index}"

    def up(self) -> None:
        """Create the bridge namespace, one namespace per host, and the root uplink; on failure undo all."""
        try:
            self._up()
        except BaseException:
            self.down()
            raise

    def _add_ns(self, name: str) -> None:
        ip_cmd("netns", "add", name)
        self._created.append(name)
        ip_cmd("-n", name, "link", "set", "lo", "up")

    def _up(self) -> None:
        net = self.subnet or pick_subnet(self.pid)
        self.subnet = net
        prefix_len = net.prefixlen
        self._add_ns(self.bridge_ns)
        ip_cmd("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip_cmd("-n", self.bridge_ns, "link", "set", "br0", "up")
        hosts_iter = net.hosts()
        root_addr = str(next(hosts_iter))
        for index, host in enumerate(self.hosts):
            ns = self.ns(host)
            self._add_ns(ns)
            port = self.bridge_port(index)
            ip_cmd("-n", self.bridge_ns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip_cmd("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            address = str(next(hosts_iter))
            ip_cmd("-n", ns, "addr", "add", f"{address}/{prefix_len}", "dev", "eth0")
            ip_cmd("-n", ns, "link", "set", "eth0", "up")
            self.addresses[host] = address
        # The uplink into the root namespace: a name of our own (<= 15 chars), created straight into place.
        self._root_link = self.root_link
        ip_cmd("link", "add", self._root_link, "type", "veth", "peer", "name", "vroot", "netns", self.bridge_ns)
        ip_cmd("-n", self.bridge_ns, "link", "set", "vroot", "master", "br0", "up")
        ip_cmd("addr", "add", f"{root_addr}/{prefix_len}", "dev", self._root_link)
        ip_cmd("link", "set", self._root_link, "up")
        self.addresses["root"] = root_addr
        log.info("testbed network %s up: %s", net, self.addresses)

    def shape(self, host: str, shape: LinkShape) -> None:
        """Set (or change, at run time) the rate of ``host``'s link, both directions."""
        index = self.hosts.index(host)
        ip_cmd("tc", "-n", self.ns(host), "qdisc", "replace", "dev", "eth0", "root", *shape.tbf_args())
        ip_cmd("tc", "-n", self.bridge_ns, "qdisc", "replace", "dev", self.bridge_port(index), "root",
               *shape.tbf_args())

    def unshape(self, host: str) -> None:
        index = self.hosts.index(host)
        ip_cmd("tc", "-n", self.ns(host), "qdisc", "del", "dev", "eth0", "root", check=False)
        ip_cmd("tc", "-n", self.bridge_ns, "qdisc", "del", "dev", self.bridge_port(index), "root", check=False)

    def exec_prefix(self, host: str) -> list[str]:
        """argv prefix that runs a command inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host)]

    def down(self) -> None:
        """Remove the root uplink and every namespace we made (their veths go with them). Idempotent."""
        if self._root_link:
            ip_cmd("link", "del", self._root_link, check=False)
            self._root_link = ""
        while self._created:
            name = self._created.pop()
            proc = ip_cmd("netns", "del", name, check=False)
            if proc.returncode != 0 and "No such file" not in proc.stderr:
                log.warning("could not delete namespace %s: %s", name, proc.stderr.strip())


    def remains(self) -> list[str]:
        """Namespaces and root links of this run that still exist (empty after ``down``)."""
        names = [line.split()[0] for line in ip_cmd("netns", "list").stdout.splitlines() if line.strip()]
        links = [e["ifname"] for e in json.loads(ip_cmd("-j", "link", "show").stdout or "[]")]
        return [f"netns:{n}" for n in names if n.startswith(self.prefix + "-")] + [
            f"link:{link}" for link in links if link == self.root_link]


def leftovers(pid_alive: bool = False) -> list[str]:
    """Namespaces and root links named by this module whose creating process is gone (``pid_alive`` = list all)."""
    names = [line.split()[0] for line in ip_cmd("netns", "list").stdout.splitlines() if line.strip()]
    links = [entry["ifname"] for entry in json.loads(ip_cmd("-j", "link", "show").stdout or "[]")]
    found = []
    for name in names:
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == ROOT_PREFIX and parts[1].isdigit() and (
                pid_alive or not _alive(int(parts[1]))):
            found.append(f"netns:{name}")
    for link in links:
        rest = link[len(ROOT_PREFIX):]
        if link.startswith(ROOT_PREFIX) and rest.isdigit() and (pid_alive or not _alive(int(rest))):
            found.append(f"link:{link}")
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete what :func:`leftovers` lists (only names of dead runs of this module)."""
    removed = leftovers()
    for item in removed:
        kind, name = item.split(":", 1)
        if kind == "netns":
            ip_cmd("netns", "del", name, check=False)
        else:
            ip_cmd("link", "del", name, check=False)
    return removed
