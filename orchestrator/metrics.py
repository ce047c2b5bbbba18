"""Prometheus metrics of the orchestrator: E(t) as measured, the plan, and what the loop decided.

Gauges about nodes and links are read from the registry at scrape time, so monitoring adds no work
to the decision loop; decisions and failed control ticks are counted as they happen (orchestrator.controller).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.controller import Controller
from orchestrator.coordinator import Coordinator


class MeshCollector(Collector):
    def __init__(self, co: Coordinator, controller: Controller) -> None:
        self.co = co
        self.controller = controller
        self.adapter = controller.adapter

    def collect(self) -> Iterator[Metric]:
        epoch = GaugeMetricFamily("splitmesh_plan_epoch", "Epoch of the committed plan")
        epoch.add_metric([], self.co.view.epoch if self.co.view else 0)
        yield epoch
        segments = GaugeMetricFamily("splitmesh_plan_segment_layers", "Layers per segment of the committed plan",
                                     labels=["segment", "node"])
        for s in self.co.view.segments if self.co.view else ():
            segments.add_metric([str(s.index), s.node_id], len(s.span))
        yield segments
        latency = GaugeMetricFamily("splitmesh_latency_ewma_ms", "EWMA of end-to-end per-token latency")
        if self.adapter.engine.ewma_ms is not None:  # absent, not 0, until a token is measured on this plan
            latency.add_metric([], self.adapter.engine.ewma_ms)
        yield latency
        alive = GaugeMetricFamily("splitmesh_node_alive", "1 while the node reports", labels=["node"])
        util = GaugeMetricFamily("splitmesh_node_utilisation", "CPU or GPU busy fraction", labels=["node"])
        memory = GaugeMetricFamily("splitmesh_node_memory_available_bytes", "Free memory", labels=["node"])
        layer = GaugeMetricFamily("splitmesh_node_layer_decode_ms", "Measured ms per layer, one decode row alone",
                                  labels=["node"])
        row = GaugeMetricFamily("splitmesh_node_layer_decode_row_ms", "Fitted ms per layer for each further row of a "
                                "batched decode forward (0 = not measured)", labels=["node"])
        rows = GaugeMetricFamily("splitmesh_node_decode_rows_per_forward", "Decode rows per forward lately",
                                 labels=["node"])
        sessions = GaugeMetricFamily("splitmesh_node_active_sessions", "Sessions open on the node", labels=["node"])
        bandwidth = GaugeMetricFamily("splitmesh_link_bandwidth_bps", "Measured link bandwidth", labels=["src", "dst"])
        rtt = GaugeMetricFamily("splitmesh_link_rtt_ms", "Measured link round-trip time", labels=["src", "dst"])
        for r in self.co.registry.nodes.values():
            alive.add_metric([r.node_id], 1.0 if self.co.registry.alive(r.node_id) else 0.0)
            util.add_metric([r.node_id], max([r.capacity.cpu_utilisation, *(g.utilisation for g in r.capacity.gpus)]))
            memory.add_metric([r.node_id], r.capacity.memory_available_bytes)
            layer.add_metric([r.node_id], r.capacity.layer_decode_ms)
            row.add_metric([r.node_id], r.capacity.layer_decode_row_ms)
            rows.add_metric([r.node_id], r.capacity.decode_rows_mean)
            sessions.add_metric([r.node_id], r.active_sessions)
            for link in r.links:
                bandwidth.add_metric([r.node_id, link.peer_id], link.bandwidth_bps)
                rtt.add_metric([r.node_id, link.peer_id], link.rtt_ms)
        refused = CounterMetricFamily("splitmesh_node_refused_reports", "Registrations and reports refused as "
                                      "implausible (NaN, negative, out of bounds); their figures were dropped",
                                      labels=["node"])
        for node_id, flag in self.co.registry.refused.items():
            refused.add_metric([node_id], flag.count)
        yield from (alive, util, memory, layer, row, rows, sessions, bandwidth, rtt, refused)
        loop_up = GaugeMetricFamily("splitmesh_control_loop_up", "1 while the control loop ticks (gRPC health SERVING)")
        loop_up.add_metric([], 1.0 if self.controller.health()[0] else 0.0)
        yield loop_up
        triggers = GaugeMetricFamily("splitmesh_trigger_fired", "1 when a trigger fired at the last decision",
                                     labels=["trigger"])
        fired = {t.name for t in self.adapter.last.triggers} if self.adapter.last else set()
        for name in ("latency", "utilisation", "bandwidth", "lost_node"):
            triggers.add_metric([name], 1.0 if name in fired else 0.0)
        yield triggers
