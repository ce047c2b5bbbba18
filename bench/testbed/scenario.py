"""The testbed scenario file (JSON): hosts, links, a timeline of events and the request stream.

Example (see bench/scenarios/testbed_*.json)::

    {"description": "...",
     "hosts": [{"name": "edge", "trusted": true, "cpus": "0", "hog": false, "link_mbps": 1000, "threads": 1},
               {"name": "cloud", "trusted": false, "cpus": "1", "link_mbps": 200}],
     "orchestrator": {"cpus": ""},
     "link": {"latency_ms": 200, "burst_bytes": 0},
     "bottleneck": "cloud", "sweep_mbps": [20, 50, 100, 200],
     "static": {"boundaries": [0, 2, 28, 30], "placement": ["edge", "cloud", "edge"]},
     "policy": {"cooldown_s": "5", "bandwidth_min_bps": "60e6"},
     "node": {"threads": 1, "probe_interval_s": 2, "probe_bytes": 262144},
     "requests": {"count": 6, "prompt_tokens": [1500, 1500], "max_new_tokens": 16, "interarrival_s": 0,
                  "seed": 7, "warmup": 1},
     "sla": {"request_ms": 8000},
     "timeline": {"duration_s": 90, "events": [{"t": 30, "rate": {"cloud": 20}}, {"t": 60, "hog": {"edge": true}}]}}

Every key but ``hosts`` has a default. Timeline event keys: ``rate`` (host -> Mbit/s) and ``hog``
(host -> true to start a CPU hog pinned like the host, false to stop it).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z][a-z0-9]{0,11}$")  # host names end up in namespace names and node ids


class ScenarioError(ValueError):
    """The scenario file is malformed; the message names the field."""


@dataclass(frozen=True)
class HostSpec:
    """One box: a namespace running one node agent."""

    name: str  # also the node id
    trusted: bool = False  # may host privacy-critical segments (first and last)
    cpus: str = ""  # taskset CPU list for the node (and its hog), "" = no pinning
    hog: bool = False  # start with a CPU hog (a busy loop pinned to ``cpus``) running on this host
    link_mbps: float = 1000.0  # initial rate of the host's link, both directions
    threads: int = 0  # torch threads of this host's node (0 = the scenario's node.threads)


@dataclass(frozen=True)
class Event:
    """One timeline step at ``t`` seconds after the stream starts."""

    t: float
    rate: dict[str, float] = field(default_factory=dict)  # host -> new link Mbit/s
    hog: dict[str, bool] = field(default_factory=dict)  # host -> start (True) / stop (False) its CPU hog

    def describe(self) -> str:
        parts = [f"{h} link -> {m:g} Mbit/s" for h, m in self.rate.items()]
        parts += [f"{h} CPU hog {'on' if on else 'off'}" for h, on in self.hog.items()]
        return f"t={self.t:g}s: " + ", ".join(parts)


@dataclass(frozen=True)
class RequestSpec:
    """The request stream: sequential (``interarrival_s`` = 0) or open-loop at a fixed interval."""

    count: int = 6
    prompt_tokens: tuple[int, int] = (1500, 1500)  # uniform range of prompt lengths (random token ids)
    max_new_tokens: int = 16  # generated tokens per request (EOS ignored, so every request makes exactly this many)
    interarrival_s: float = 0.0
    seed: int = 7
    warmup: int = 1  # requests before measuring (not counted): layer timings and link probes settle

    def prompts(self, vocab: int, count: int | None = None) -> list[list[int]]:
        """Deterministic prompts of random token ids (ids 100..vocab-1, clear of special tokens)."""
        rng = random.Random(self.seed)
        lo, hi = self.prompt_tokens
        return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))]
                for _ in range(self.count if count is None else count)]


@dataclass(frozen=True)
class Scenario:
    description: str
    hosts: tuple[HostSpec, ...]
    bottleneck: str  # the host whose link the sweep and the timeline shape
    sweep_mbps: tuple[float, ...] = (20.0, 50.0, 100.0, 200.0)
    boundaries: tuple[int, ...] = ()  # static split (also the adaptive run's starting plan)
    placement: tuple[str, ...] = ()
    policy: dict[str, str] = field(default_factory=dict)  # adaptive run's policy (Client.policy keys)
    static_policy: dict[str, str] = field(default_factory=dict)  # both runs (e.g. default_link_mbps)
    orchestrator_cpus: str = ""
    link_latency_ms: float = 200.0
    link_burst_bytes: int = 0
    node_threads: int = 1
    probe_interval_s: float = 2.0
    probe_bytes: int = 256 * 1024
    requests: RequestSpec = RequestSpec()
    sla_request_ms: float = 10_000.0
    timeline_duration_s: float = 90.0
    timeline_start_mbps: float | None = None  # bottleneck rate at t=0 of the timeline (None = host's link_mbps)
    events: tuple[Event, ...] = ()
    model: str = "smollm2-135m-instruct"

    def host(self, name: str) -> HostSpec:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def trusted(self) -> list[str]:
        return [h.name for h in self.hosts if h.trusted]


def _get(d: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = d.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ScenarioError(f"{where}.{key} must be {kind.__name__}, got {value!r}")
    return value


def parse_scenario(data: dict[str, Any]) -> Scenario:
    """Validate and build a Scenario; ScenarioError names the first bad field."""
    raw_hosts = data.get("hosts")
    if not isinstance(raw_hosts, list) or not raw_hosts:
        raise ScenarioError("hosts must be a non-empty list")
    hosts = []
    for i, h in enumerate(raw_hosts):
        where = f"hosts[{i}]"
        name = _get(h, "name", str, None, where)
        if not NAME.match(name) or name in ("br", "orch", "root"):
            raise ScenarioError(f"{where}.name {name!r}: lowercase letters/digits, <= 12 chars, not br/orch/root")
        hosts.append(HostSpec(name, _get(h, "trusted", bool, False, where), _get(h, "cpus", str, "", where),
                              _get(h, "hog", bool, False, where), _get(h, "link_mbps", float, 1000.0, where),
                              _get(h, "threads", int, 0, where)))
    names = {h.name for h in hosts}
    if len(names) != len(hosts):
        raise ScenarioError("host names must be unique")
    if not any(h.trusted for h in hosts):
        raise ScenarioError("at least one host must be trusted (the head runs the first and last segment)")
    bottleneck = _get(data, "bottleneck", str, hosts[-1].name, "scenario")
    static = data.get("static", {})
    placement = tuple(static.get("placement", ()))
    boundaries = tuple(int(b) for b in static.get("boundaries", ()))
    unknown = (set(placement) | {bottleneck}) - names
    if unknown:
        raise ScenarioError(f"unknown hosts {sorted(unknown)} in static/bottleneck")
    if placement and len(boundaries) != len(placement) + 1:
        raise ScenarioError("static.boundaries needs one more entry than static.placement")
    events = []
    for i, e in enumerate(data.get("timeline", {}).get("events", [])):
        rate = {str(k): float(v) for k, v in e.get("rate", {}).items()}
        hog = {str(k): bool(v) for k, v in e.get("hog", {}).items()}
        if (set(rate) | set(hog)) - names:
            raise ScenarioError(f"timeline.events[{i}] names unknown hosts")
        events.append(Event(float(e["t"]), rate, hog))
    rq = data.get("requests", {})
    lo, hi = rq.get("prompt_tokens", [1500, 1500])
    requests = RequestSpec(int(rq.get("count", 6)), (int(lo), int(hi)), int(rq.get("max_new_tokens", 16)),
                           float(rq.get("interarrival_s", 0.0)), int(rq.get("seed", 7)), int(rq.get("warmup", 1)))
    node = data.get("node", {})
    link = data.get("link", {})
    timeline = data.get("timeline", {})
    start = timeline.get("start_mbps")
    return Scenario(
        description=str(data.get("description", "")), hosts=tuple(hosts), bottleneck=bottleneck,
        sweep_mbps=tuple(float(x) for x in data.get("sweep_mbps", (20, 50, 100, 200))),
        boundaries=boundaries, placement=placement,
        policy={str(k): str(v) for k, v in data.get("policy", {}).items()},
        static_policy={str(k): str(v) for k, v in data.get("static_policy", {}).items()},
        orchestrator_cpus=str(data.get("orchestrator", {}).get("cpus", "")),
        link_latency_ms=float(link.get("latency_ms", 200.0)), link_burst_bytes=int(link.get("burst_bytes", 0)),
        node_threads=int(node.get("threads", 1)), probe_interval_s=float(node.get("probe_interval_s", 2.0)),
        probe_bytes=int(node.get("probe_bytes", 256 * 1024)), requests=requests,
        sla_request_ms=float(data.get("sla", {}).get("request_ms", 10_000.0)),
        timeline_duration_s=float(timeline.get("duration_s", 90.0)),
        timeline_start_mbps=None if start is None else float(start),
        events=tuple(sorted(events, key=lambda e: e.t)), model=str(data.get("model", "smollm2-135m-instruct")))


def load_scenario(path: str | Path) -> Scenario:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: top level must be an object")
    return parse_scenario(data)
