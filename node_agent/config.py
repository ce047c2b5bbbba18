"""The node agent's configuration: one object, from file, environment and flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError, field
from common.dtypes import parse_dtypes
from common.frame_crypto import MAX_FRAMES_PER_KEY
from common.tls import TlsConfig
from common.transport import DEFAULT_ORCHESTRATOR_ID, resolve_tls


@dataclass(frozen=True)
class NodeConfig:
    node_id: str = field("node-0", "unique id of this node in the cluster")
    listen: str = field("127.0.0.1:50061", "host:port the node's gRPC server binds")
    advertise: str = field("", "host:port peers use to reach this node (default: listen)")
    orchestrator: str = field("127.0.0.1:50051", "orchestrator host:port")
    store: str = field("~/.cache/splitmesh/store", "model store folder")
    state_dir: str = field("~/.cache/splitmesh/node", "folder for this node's persistent state")
    threads: int = field(0, "torch intra-op threads (0 = all cores)")
    dtypes: str = field("float32,bfloat16,float16,int8", "weight dtypes this node runs (comma-separated); a plan "
                                                         "for a model in another dtype is NACKed with the reason")
    omp_spin_count: int = field(1000, "how long idle OpenMP workers spin before sleeping (GOMP_SPINCOUNT; short, so a "
                                      "waiting node hands its cores to the node computing; -1 = libgomp's default)")
    session_idle_timeout_s: float = field(300.0, "a session whose upstream sends nothing this long is closed")
    frame_timeout_s: float = field(5.0, "a Forward stream must send its first frame this soon after its open, and "
                                        "each chunk of a tensor this soon after the one before, or it is closed")
    max_sessions: int = field(64, "concurrent sessions this node serves before RESOURCE_EXHAUSTED (one per "
                                  "generation, however many of its segments the node hosts)")
    max_batch_rows: int = field(32, "most sessions whose decode steps share one forward of a segment; sessions "
                                    "that are ready together run as one batch")
    max_queued_sessions: int = field(32, "generations a head accepts beyond max_batch_rows (they wait their turn "
                                         "in later batches); one more is refused RESOURCE_EXHAUSTED at once")
    max_batch_tokens: int = field(8192, "prompt tokens a head holds admitted but not yet prefilled; a request "
                                        "that would pass it is refused RESOURCE_EXHAUSTED before any node works")
    batch_gather_ms: float = field(8.0, "while fewer decode rows wait than the node has sessions, a forward waits up "
                                        "to this long for more (ended by a gap of a quarter of it between "
                                        "arrivals), so rows of one batch upstream stay one batch here (0 = off)")
    merge_micro_batches: str = field("auto", "at the head, decode rows wait for the rows of the other sessions "
                                             "still in the ring, so all run as one batch: on (nodes share cores, "
                                             "where one batch uses them best), off (micro-batches pipeline across "
                                             "boxes), auto (on when every node of the plan has the same host)")
    merge_wait_ms: float = field(1000.0, "the longest a head's decode rows wait to merge with rows still in the ring")
    prefill_chunk_tokens: int = field(256, "a longer prompt is prefilled in chunks of this many tokens, so the "
                                           "decode steps of running sessions go on between them (0 = whole)")
    strict_batching: bool = field(False, "run every step alone and every prompt whole: tokens equal single-process "
                                         "generate bit for bit (overrides max_batch_rows and prefill_chunk_tokens)")
    max_buffer_bytes: int = field(256 << 20, "bytes of partly received tensors this node buffers across all its "
                                             "streams; a tensor that does not fit is refused RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = field(4096, "longest prompt accepted, in tokens")
    max_prompt_bytes: int = field(256 << 10, "longest prompt (or all chat messages together) accepted, in UTF-8 "
                                             "bytes, checked before tokenizing")
    max_messages: int = field(1024, "most chat messages one request may carry")
    max_new_tokens: int = field(2048, "largest max_new_tokens a request may ask for")
    chunk_bytes: int = field(1 << 20, "activation bytes per wire message")
    hop_timeout_s: float = field(30.0, "a head's step fails when a node on its path has not answered a probe, or "
                                       "no node on the path has finished any work, for this long (a busy path "
                                       "keeps its step); also how long the next node may take to accept an "
                                       "activation or token")
    stall_reroute_s: float = field(2.0, "a step waiting this long moves to a newer plan if one is committed and a "
                                        "node on its path does not answer a probe (a working node keeps its step)")
    plan_drain_s: float = field(10.0, "a replaced plan keeps its segments (and their weight keys) this long after "
                                      "a COMMIT, so a step already working on it (a long prefill upstream) can "
                                      "still open here and finish on its plan; later it moves to the new plan")
    weight_reserve_s: float = field(0.0, "memory of decrypted layers this node released stays mapped (wiped) this "
                                         "long, for the layers of its next plan change: fresh pages cost about "
                                         "4x the decryption (common.page_reserve); 0 = unmapped at release")
    weight_reserve_mb: int = field(1024, "most released memory the reserve keeps (MiB)")
    recovery_timeout_s: float = field(20.0, "how long a session waits for a replacement plan after a failure")
    probe_interval_s: float = field(5.0, "how often to measure RTT and bandwidth to every plan peer (0 = off)")
    probe_bytes: int = field(1 << 20, "payload of the bandwidth probe (large enough to outlast shaper bursts)")
    probe_bandwidth_window: int = field(2, "probe rounds whose highest bandwidth is reported (one reading shared "
                                           "with a prefill reads low; a real drop shows after this many rounds)")
    probe_rtt_window: int = field(5, "probe rounds whose lowest RTT is reported (a reading behind a queue reads high)")
    report_interval_ms: int = field(1000, "capacity report period (overridden by the orchestrator)")
    plan_public_key: str = field("", "pinned orchestrator Ed25519 public key (hex); empty = learn at registration")
    encrypt_activations: bool = field(True, "seal activation frames per hop and the tail's tokens to the head "
                                            "(AES-256-GCM, HPKE key exchange); when on, plaintext streams are refused")
    rekey_after_frames: int = field(MAX_FRAMES_PER_KEY, "frames sealed under one hop key before a fresh one is sent")
    tls_dir: str = field("", "folder with ca.crt, NODE_ID.crt and NODE_ID.key (from `splitmesh certs`): mutual TLS")
    tls_ca: str = field("", "cluster CA certificate (overrides tls_dir)")
    tls_cert: str = field("", "this node's certificate (overrides tls_dir)")
    tls_key: str = field("", "this node's private key (overrides tls_dir)")
    orchestrator_id: str = field(DEFAULT_ORCHESTRATOR_ID, "the orchestrator's certificate name, pinned when dialling "
                                                          "it and the only identity allowed to install plans")
    insecure: bool = field(False, "allow plaintext gRPC on a non-loopback address (never in production)")
    metrics_port: int = field(0, "HTTP port for Prometheus /metrics (0 = off)")
    log_level: str = field("INFO", "logging level")
    log_json: bool = field(False, "log one JSON object per line")

    def __post_init__(self) -> None:
        if self.probe_bandwidth_window < 1 or self.probe_rtt_window < 1:
            raise ConfigError("probe_bandwidth_window and probe_rtt_window must be at least 1 (probe rounds)")
        if not (self.frame_timeout_s > 0 and self.session_idle_timeout_s > 0):
            raise ConfigError("frame_timeout_s and session_idle_timeout_s must be positive")
        if min(self.max_sessions, self.max_buffer_bytes, self.max_prompt_tokens, self.max_prompt_bytes,
               self.max_messages, self.max_new_tokens) < 1:
            raise ConfigError("max_sessions, max_buffer_bytes, max_prompt_tokens, max_prompt_bytes, max_messages "
                              "and max_new_tokens must be at least 1")
        if min(self.max_batch_rows, self.max_batch_tokens) < 1 or min(self.max_queued_sessions,
                                                                        self.prefill_chunk_tokens,
                                                                        self.batch_gather_ms) < 0:
            raise ConfigError("max_batch_rows and max_batch_tokens must be at least 1, max_queued_sessions, "
                              "prefill_chunk_tokens and batch_gather_ms at least 0")
        if self.merge_micro_batches not in ("auto", "on", "off"):
            raise ConfigError(f"merge_micro_batches must be auto, on or off, not {self.merge_micro_batches!r}")
        if not self.merge_wait_ms >= 0:
            raise ConfigError("merge_wait_ms must be at least 0")
        if not self.plan_drain_s >= 0:
            raise ConfigError("plan_drain_s must be at least 0 (seconds)")
        if not self.weight_reserve_s >= 0 or self.weight_reserve_mb < 0:
            raise ConfigError("weight_reserve_s and weight_reserve_mb must be at least 0")
        if self.max_batch_tokens < self.max_prompt_tokens:
            raise ConfigError(f"max_batch_tokens ({self.max_batch_tokens}) must hold one prompt of "
                              f"max_prompt_tokens ({self.max_prompt_tokens})")
        try:
            parse_dtypes(self.dtypes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def merges(self, shared_host: bool) -> bool:
        """Whether a head merges micro-batches on a plan whose nodes do (or do not) all share one host."""
        if self.strict_batching or self.merge_wait_ms <= 0:
            return False
        return self.merge_micro_batches == "on" or (self.merge_micro_batches == "auto" and shared_host)

    @property
    def batch_rows(self) -> int:
        """Rows per forward in effect (1 in strict mode)."""
        return 1 if self.strict_batching else self.max_batch_rows

    @property
    def prefill_chunk(self) -> int:
        """Prefill chunk in effect (0, whole prompts, in strict mode)."""
        return 0 if self.strict_batching else self.prefill_chunk_tokens

    @property
    def advertised_address(self) -> str:
        return self.advertise or self.listen

    def tls(self) -> TlsConfig | None:
        """This node's TLS files, or None for plaintext (raises TransportError when incomplete)."""
        return resolve_tls(self.tls_dir, self.node_id, self.tls_ca, self.tls_cert, self.tls_key)
