"""The environment state E(t) as the solver sees it, built from what nodes report."""

from __future__ import annotations

import dataclasses
import functools
import statistics

from common.model_store import StoredModel
from orchestrator.planning import ClusterState, LinkProfile, ModelProfile, NodeProfile, Workload
from orchestrator.policy import Policy
from orchestrator.registry import NodeRecord

DEFAULT_LAYER_DECODE_S = 2e-3  # before any node has measured a layer: a small CPU model's layer
PREFILL_PER_TOKEN_FRACTION = 0.25  # prefill amortises weight reads across tokens (when no node has measured it)


def model_profile(model: StoredModel) -> ModelProfile:
    return ModelProfile.from_config_dict(model.manifest.config, weight_dtype=model.manifest.dtype)


def _utilisation(record: NodeRecord) -> float:
    cap = record.capacity
    gpu = max((g.utilisation for g in cap.gpus), default=0.0)
    return min(0.99, max(cap.cpu_utilisation, gpu))


def cluster_state(nodes: list[NodeRecord], policy: Policy) -> ClusterState:
    """Live nodes with their measured layer cost, memory and utilisation, and every directed link.

    A node that has not measured its layer cost yet borrows the median of those that have; one that
    has decoded but never run a prefill (it hosted nothing yet, or only decode steps) gets its decode
    cost times the median prefill/decode ratio the other nodes measured, because a fixed fraction was
    off by 3-4x on this model and made every migration to a fresh node look slower than it is. A link
    not yet probed gets the policy's default bandwidth and RTT. A link its sender reports down (a failed
    probe: bandwidth 0) is left out, so the solver places no hop on it.
    """
    measured = [r.capacity.layer_decode_ms / 1000.0 for r in nodes if r.capacity.layer_decode_ms > 0]
    fallback = statistics.median(measured) if measured else DEFAULT_LAYER_DECODE_S
    ratios = [r.capacity.layer_prefill_ms_per_token / r.capacity.layer_decode_ms for r in nodes
              if r.capacity.layer_prefill_ms_per_token > 0 and r.capacity.layer_decode_ms > 0]
    prefill_ratio = statistics.median(ratios) if ratios else PREFILL_PER_TOKEN_FRACTION
    profiles = []
    for r in nodes:
        decode = r.capacity.layer_decode_ms / 1000.0 or fallback
        prefill = (r.capacity.layer_prefill_ms_per_token / 1000.0) or decode * prefill_ratio
        memory = r.capacity.memory_available_bytes
        row = r.capacity.layer_decode_row_ms / 1000.0 or None  # unmeasured: NodeProfile takes prefill's
        profiles.append(NodeProfile(node_id=r.node_id, trusted=r.trusted, memory_bytes=int(memory),
                                    decode_s_per_layer=decode, prefill_s_per_layer_token=prefill,
                                    utilisation=_utilisation(r), gpu=bool(r.capacity.gpus),
                                    decode_row_s_per_layer=row))
    ids = [r.node_id for r in nodes]
    known = set(ids)
    links: dict[tuple[str, str], LinkProfile] = {}
    down: set[tuple[str, str]] = set()
    for r in nodes:
        for link in r.links:
            if link.peer_id not in known or link.peer_id == r.node_id:
                continue
            if link.bandwidth_bps > 0:
                links[(r.node_id, link.peer_id)] = _link(link.bandwidth_bps, max(link.rtt_ms, 0.0) / 1000.0)
            else:
                down.add((r.node_id, link.peer_id))
    if len(links) + len(down) < len(ids) * (len(ids) - 1):
        default = _link(policy.default_link_mbps * 1e6, policy.default_rtt_ms / 1000.0)
        for a in ids:
            for b in ids:
                if a != b and (a, b) not in down:
                    links.setdefault((a, b), default)
    return ClusterState(nodes=tuple(profiles), links=links)


def current_load(nodes: list[NodeRecord], workload: Workload) -> Workload:
    """``workload`` at the load the nodes report: the most sessions any node has open (every session passes
    its head) and the most decode rows per forward any node measured (0 = none yet: every session in one)."""
    sessions = max((r.active_sessions for r in nodes), default=0)
    rows = max((r.capacity.decode_rows_mean for r in nodes), default=0.0)
    return dataclasses.replace(workload, sessions=max(1, sessions), batch_rows=rows)


@functools.lru_cache(maxsize=1 << 16)
def _link(bandwidth_bps: float, rtt_s: float) -> LinkProfile:
    """Links change slowly: reuse one immutable profile per measured value instead of one per report."""
    return LinkProfile(bandwidth_bps=bandwidth_bps, rtt_s=rtt_s)
