"""Plain, frozen descriptions of the cluster, the model and the workload: the solver's only inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.dtypes import activation_bytes, weight_bytes
from common.privacy import TrustRule


@dataclass(frozen=True)
class NodeProfile:
    """What the orchestrator knows about one box, as measured by its capacity reporter."""

    node_id: str  # unique id, bound to the node's certificate
    trusted: bool  # set by the orchestrator's configuration, never by the node itself
    memory_bytes: int  # bytes available for weights plus KV cache
    decode_s_per_layer: float  # seconds for one decoder layer on one token (decode step), idle node
    prefill_s_per_layer_token: float  # seconds per layer per prompt token during prefill, idle node
    utilisation: float = 0.0  # current busy fraction 0..1 from other work; inflates compute time
    gpu: bool = False  # informational: the node runs layers on an accelerator
    decode_row_s_per_layer: float | None = None  # each further row of a batched decode forward; None: prefill's

    def __post_init__(self) -> None:
        if self.memory_bytes < 0:
            raise ValueError(f"node {self.node_id}: negative memory")
        if not (self.decode_s_per_layer > 0 and self.prefill_s_per_layer_token > 0):
            raise ValueError(f"node {self.node_id}: per-layer costs must be positive")
        if not 0.0 <= self.utilisation <= 1.0:
            raise ValueError(f"node {self.node_id}: utilisation {self.utilisation} outside [0, 1]")
        if self.decode_row_s_per_layer is not None and not self.decode_row_s_per_layer >= 0:
            raise ValueError(f"node {self.node_id}: negative per-row decode cost")

    @property
    def row_s_per_layer(self) -> float:
        """Per-row part of a batched decode forward; unmeasured, a prompt token's cost (a batched row is one
        in all but attention), never more than a row alone."""
        if self.decode_row_s_per_layer is not None:
            return self.decode_row_s_per_layer
        return min(self.prefill_s_per_layer_token, self.decode_s_per_layer)

    def layer_s_at(self, rows: float) -> float:
        """Seconds of one decoder layer for a decode forward of ``rows`` rows, idle node."""
        return self.decode_s_per_layer + max(0.0, rows - 1.0) * self.row_s_per_layer


@dataclass(frozen=True)
class LinkProfile:
    """One directed node-to-node path as measured by probes."""

    bandwidth_bps: float  # usable bandwidth in bit/s
    rtt_s: float  # round-trip time in seconds; a one-way message is charged one full rtt (conservative)

    def __post_init__(self) -> None:
        if self.bandwidth_bps <= 0 or self.rtt_s < 0 or math.isnan(self.rtt_s):
            raise ValueError(f"bad link: {self.bandwidth_bps} bit/s, rtt {self.rtt_s} s")


@dataclass(frozen=True)
class ClusterState:
    """A snapshot of the nodes and the directed links between them; a missing link is unusable."""

    nodes: tuple[NodeProfile, ...]  # the nodes currently reachable
    links: Mapping[tuple[str, str], LinkProfile] = field(default_factory=dict)  # (src, dst) -> link

    def __post_init__(self) -> None:
        ids = [n.node_id for n in self.nodes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate node ids in {ids}")

    def node(self, node_id: str) -> NodeProfile:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def has_node(self, node_id: str) -> bool:
        return any(n.node_id == node_id for n in self.nodes)

    def link(self, src: str, dst: str) -> LinkProfile | None:
        return self.links.get((src, dst))


@dataclass(frozen=True)
class ModelProfile:
    """Sizes of a decoder-only model that drive memory and transfer costs."""

    num_layers: int  # decoder layers L
    hidden_size: int  # width of the activation sent across a boundary, per token
    layer_bytes: int  # weight bytes of one decoder layer
    embed_bytes: int  # token embedding table, held by the first segment's node
    head_bytes: int  # final norm + lm_head, held by the last segment's node (= embed size when tied)
    kv_bytes_per_token_layer: int  # K and V cache bytes for one token in one layer
    act_bytes: int  # bytes per activation element on the wire (2 for fp16/bf16)
    token_msg_bytes: int = 64  # size of the tail->head message carrying one sampled token id plus framing

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.hidden_size < 1:
            raise ValueError("model needs at least one layer and a positive hidden size")

    @property
    def head_layer_equiv(self) -> float:
        """lm_head cost in decoder-layer units: decode is memory bound, so cost scales with bytes read."""
        return self.head_bytes / self.layer_bytes if self.layer_bytes else 0.0

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any], dtype_bytes: int = 4, *,
                         weight_dtype: str | None = None) -> ModelProfile:
        """Shapes of a Llama-family HF ``config.json`` (GQA, SwiGLU MLP, RMSNorm; ties recorded by the store).

        ``weight_dtype`` (a store dtype, see :mod:`common.dtypes`) sizes weights, KV cache and activations as
        that dtype stores and computes them: int8 weights take 1 byte plus a 2-byte scale per matrix row,
        while activations and KV stay in its bfloat16 compute dtype. Without it, ``dtype_bytes`` is a float
        dtype's size for all three.
        """
        if weight_dtype is None:
            weight_dtype = {4: "float32", 2: "bfloat16"}.get(dtype_bytes, "")
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
        bias = bool(config.get("attention_bias", False))
        q_o = 2 * hidden * heads * head_dim
        k_v = 2 * hidden * kv_heads * head_dim
        attn_bias = (heads * head_dim + 2 * kv_heads * head_dim) if bias else 0
        mlp = 3 * hidden * inter
        norms = 2 * hidden
        layer_rows = heads * head_dim + 2 * kv_heads * head_dim + hidden + 2 * inter + hidden
        act = activation_bytes(weight_dtype)
        return cls(
            num_layers=layers,
            hidden_size=hidden,
            layer_bytes=weight_bytes(weight_dtype, q_o + k_v + mlp, layer_rows, attn_bias + norms),
            embed_bytes=weight_bytes(weight_dtype, vocab * hidden, vocab),
            # The head is a separate store file even when tied: a tail on another box needs its own copy.
            head_bytes=weight_bytes(weight_dtype, vocab * hidden, vocab, hidden),
            kv_bytes_per_token_layer=2 * kv_heads * head_dim * act,
            act_bytes=act,
        )


@dataclass(frozen=True)
class Workload:
    """The request shape the plan is optimised for."""

    prompt_tokens: int  # tokens in a typical prompt (prefill length)
    decode_tokens: int  # tokens generated per request; the first comes out of the prefill pass
    kv_budget_tokens: int  # KV-cache tokens every hosting node must reserve per layer it hosts
    sessions: int = 1  # the load: sessions decoding at once
    batch_rows: float = 0.0  # decode rows per forward at that load (measured); 0 = every session in one forward

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.decode_tokens < 1 or self.kv_budget_tokens < 0:
            raise ValueError(f"bad workload {self}")
        if self.sessions < 1 or not self.batch_rows >= 0:
            raise ValueError(f"bad load in workload {self}")

    @property
    def rows(self) -> float:
        """Decode rows in one forward: what was measured, within [1, sessions]."""
        return min(float(self.sessions), max(1.0, self.batch_rows or float(self.sessions)))

    @property
    def forwards(self) -> float:
        """Forwards each stage runs per token of every session (sessions split into groups of ``rows``)."""
        return self.sessions / self.rows


@dataclass(frozen=True)
class CostWeights:
    """Weights of the objective Phi = alpha*L + beta*U + gamma*P."""

    alpha: float = 1.0  # per second of predicted per-request latency
    beta: float = 0.1  # per second of imbalance U (sum of squared stage times over the reference time)
    gamma: float = 10.0  # per privacy-critical layer on an untrusted node (only when privacy_hard is False)
    privacy_hard: bool = True  # True: critical layers may only sit on trusted nodes; False: penalise with gamma

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError("cost weights must be non-negative")


@dataclass(frozen=True)
class PrivacyPolicy:
    """Which layers see raw tokens or produce them: the trusted depth at both ends (at least the first and
    the last layer) and any extra layers."""

    extra_critical_layers: frozenset[int] = frozenset()  # further layer indices that must stay trusted
    leading: int = 1  # layers [0, leading) stay trusted
    trailing: int = 1  # the last ``trailing`` layers stay trusted

    @property
    def rule(self) -> TrustRule:
        return TrustRule(self.leading, self.trailing, self.extra_critical_layers)

    def critical_layers(self, num_layers: int) -> frozenset[int]:
        return self.rule.critical_layers(num_layers)


@dataclass(frozen=True)
class Problem:
    """Everything one solve needs, bundled so callers pass one object."""

    cluster: ClusterState  # nodes and links now
    model: ModelProfile  # model sizes
    workload: Workload  # request shape
    weights: CostWeights = CostWeights()  # objective weights and privacy mode
    privacy: PrivacyPolicy = PrivacyPolicy()  # privacy-critical layers
    head: str | None = None  # pin the first segment to this node (a recovery keeps the sessions it heads)
