"""The node agent's configuration: one object, from file, environment and flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import field


@dataclass(frozen=True)
class NodeConfig:
    node_id: str = field("node-0", "unique id of this node in the cluster")
    listen: str = field("127.0.0.1:50061", "host:port the node's gRPC server binds")
    advertise: str = field("", "host:port peers use to reach this node (default: listen)")
    orchestrator: str = field("127.0.0.1:50051", "orchestrator host:port")
    store: str = field("~/.cache/splitmesh/store", "model store folder")
    state_dir: str = field("~/.cache/splitmesh/node", "folder for this node's persistent state")
    threads: int = field(0, "torch intra-op threads (0 = all cores)")
    max_sessions: int = field(64, "concurrent sessions this node serves before RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = field(4096, "longest prompt accepted, in tokens")
    max_new_tokens: int = field(2048, "largest max_new_tokens a request may ask for")
    chunk_bytes: int = field(1 << 20, "activation bytes per wire message")
    hop_timeout_s: float = field(30.0, "deadline for one step's reply from the next node")
    recovery_timeout_s: float = field(20.0, "how long a session waits for a replacement plan after a failure")
    report_interval_ms: int = field(1000, "capacity report period (overridden by the orchestrator)")
    plan_public_key: str = field("", "pinned orchestrator Ed25519 public key (hex); empty = learn at registration")
    log_level: str = field("INFO", "logging level")

    @property
    def advertised_address(self) -> str:
        return self.advertise or self.listen
