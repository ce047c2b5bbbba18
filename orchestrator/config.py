"""The orchestrator's configuration: one object, from file, environment and flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import field
from common.tls import TlsConfig
from common.transport import DEFAULT_ORCHESTRATOR_ID, resolve_tls
from orchestrator.policy import Policy

_P = Policy()  # the policy settings below start from the policy model's defaults and are validated by it


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
    tls_dir: str = field("", "folder with ca.crt, ORCHESTRATOR_ID.crt and .key (from `splitmesh certs`): mutual TLS")
    tls_ca: str = field("", "cluster CA certificate (overrides tls_dir)")
    tls_cert: str = field("", "the orchestrator's certificate (overrides tls_dir)")
    tls_key: str = field("", "the orchestrator's private key (overrides tls_dir)")
    orchestrator_id: str = field(DEFAULT_ORCHESTRATOR_ID, "this orchestrator's certificate name (kind orchestrator)")
    insecure: bool = field(False, "allow plaintext gRPC on a non-loopback address (never in production)")
    report_interval_ms: int = field(1000, "how often nodes report capacity")
    dead_after_reports: int = field(3, "missed report periods before a node counts as dead")
    rejoin_grace_s: float = field(10.0, "after an orchestrator restart, how long plan nodes have to register again "
                                        "before they count as lost and the plan is replaced")
    plan_ttl_s: int = field(86400, "validity of a signed plan")
    prepare_timeout_s: float = field(60.0, "deadline for every node to load and ACK a plan")
    # The policy section: given here (file, environment or flag) it wins over the policy persisted by
    # `splitmesh policy set`; not given, the persisted value wins over these defaults (orchestrator/policy_source.py).
    adaptive: bool = field(_P.adaptive, "run the adaptive decision loop (Algorithm 1)")
    decision_interval_s: float = field(_P.interval_s, "monitoring period: one decision per interval (>= 0.1 s)")
    latency_max_ms: float = field(_P.latency_max_ms, "L_max: EWMA per-token latency that triggers a decision")
    utilisation_max: float = field(_P.utilisation_max, "U_max: node utilisation that triggers a decision, (0, 1]")
    bandwidth_min_mbps: float = field(_P.bandwidth_min_bps / 1e6, "B_min: link bandwidth (Mbit/s) that triggers "
                                                                  "a decision")
    cooldown_s: float = field(_P.cooldown_s, "T_cool: minimum time between voluntary plan changes")
    hysteresis: float = field(_P.hysteresis, "a new plan must cut the predicted cost by more than this fraction, "
                                             "[0, 1)")
    ewma_alpha: float = field(_P.ewma_alpha, "smoothing of the end-to-end latency EWMA, (0, 1]")
    trusted_leading_layers: int = field(_P.trusted_leading_layers, "trusted depth: layers [0, n) run on trusted "
                                                                   "nodes only (>= 1)")
    trusted_trailing_layers: int = field(_P.trusted_trailing_layers, "the last n layers run on trusted nodes only "
                                                                     "(>= 1)")
    metrics_port: int = field(0, "HTTP port for Prometheus /metrics (0 = off)")
    log_level: str = field("INFO", "logging level")
    log_json: bool = field(False, "log one JSON object per line")

    def tls(self) -> TlsConfig | None:
        """The orchestrator's TLS files, or None for plaintext (raises TransportError when incomplete)."""
        return resolve_tls(self.tls_dir, self.orchestrator_id, self.tls_ca, self.tls_cert, self.tls_key)
