"""Prometheus metrics of a node agent: compute per segment, activation traffic per link, sessions,
KV-cache bytes and tokens served. Names use the ``splitmesh_agent_`` prefix so they never collide
with the orchestrator's view of the same node (``splitmesh_node_*``) in one Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node_agent.runtime import NodeRuntime


class AgentCollector(Collector):
    def __init__(self, runtime: NodeRuntime) -> None:
        self.rt = runtime

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily("splitmesh_agent_active_sessions", "Session pipelines open on this node")
        sessions.add_metric([], self.rt.sessions.pipeline_count())
        yield sessions
        kv = GaugeMetricFamily("splitmesh_agent_kv_cache_bytes", "Bytes held in KV caches of open sessions")
        kv.add_metric([], sum(p.cache_bytes() for p in self.rt.sessions.pipelines()))
        yield kv
        epoch = GaugeMetricFamily("splitmesh_agent_plan_epoch", "Committed plan epoch on this node")
        committed = self.rt.plans.committed
        epoch.add_metric([], committed.epoch if committed else 0)
        yield epoch
        layers = GaugeMetricFamily("splitmesh_agent_loaded_layers", "Decoder layers held in memory")
        layers.add_metric([], sum(1 for role in self.rt.pool.loaded_roles() if role.startswith("layer.")))
        yield layers
        weights = GaugeMetricFamily("splitmesh_agent_weight_bytes",
                                    "Bytes of weights held by the segments this node has loaded")
        weights.add_metric([], self.rt.pool.weight_bytes())
        yield weights
        reserve = GaugeMetricFamily("splitmesh_agent_weight_reserve_bytes",
                                    "Bytes of released layers' memory kept (wiped) for the next plan change")
        reserve.add_metric([], self.rt.store.pages.held_bytes())
        yield reserve
