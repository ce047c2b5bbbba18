"""The orchestrator's configuration: one object, from file, environment and flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import field


@dataclass(frozen=True)
class OrchestratorConfig:
    listen: str = field("127.0.0.1:50051", "host:port the orchestrator's gRPC server binds")
    state_dir: str = field("~/.cache/splitmesh/orchestrator", "folder for the SQLite state and the signing key")
    store: str = field("~/.cache/splitmesh/store", "model store folder")
    model: str = field("smollm2-135m-instruct", "model name or digest in the store to serve")
    cluster_id: str = field("splitmesh-local", "cluster id written into every plan")
    trusted_nodes: list[str] = field([], "node ids allowed to host privacy-critical segments")
    min_nodes: int = field(1, "nodes that must register before the first plan is made")
    boundaries: list[int] = field([], "initial layer boundaries, e.g. 0,10,20,30 (empty = even split)")
    placement: list[str] = field([], "initial node id per segment (empty = automatic)")
    report_interval_ms: int = field(1000, "how often nodes report capacity")
    dead_after_reports: int = field(3, "missed report periods before a node counts as dead")
    plan_ttl_s: int = field(86400, "validity of a signed plan")
    prepare_timeout_s: float = field(60.0, "deadline for every node to load and ACK a plan")
    ewma_alpha: float = field(0.2, "smoothing of the end-to-end latency EWMA")
    log_level: str = field("INFO", "logging level")
