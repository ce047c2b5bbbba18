"""Synthetic clusters for tests and benchmarks (seeded, so every run sees the same instances)."""

from __future__ import annotations

import random
from collections.abc import Iterable

from .profiles import ClusterState, LinkProfile, ModelProfile, NodeProfile, Problem, Workload

LLAMA_70B_LIKE = ModelProfile(  # 80 layers of a 70B-class model in fp16 (shapes only)
    num_layers=80, hidden_size=8192, layer_bytes=1_711_276_032, embed_bytes=2_101_346_304,
    head_bytes=2_101_362_688, kv_bytes_per_token_layer=4096, act_bytes=2,
)


def full_mesh(nodes: Iterable[NodeProfile], bandwidth_bps: float, rtt_s: float) -> ClusterState:
    """Every ordered pair linked with the same bandwidth and rtt."""
    ns = tuple(nodes)
    link = LinkProfile(bandwidth_bps, rtt_s)
    return ClusterState(ns, {(a.node_id, b.node_id): link for a in ns for b in ns if a is not b})


def random_cluster(rng: random.Random, num_nodes: int, trusted: int, model: ModelProfile,
                   link_prob: float = 0.9) -> ClusterState:
    """Heterogeneous nodes holding 10-60% of the model each; the first ``trusted`` nodes are trusted."""
    total = model.num_layers * model.layer_bytes + model.embed_bytes + model.head_bytes
    nodes = tuple(
        NodeProfile(
            node_id=f"n{i:02d}",
            trusted=i < trusted,
            memory_bytes=int(rng.uniform(0.1, 0.6) * total),
            decode_s_per_layer=rng.uniform(0.1e-3, 2e-3),
            prefill_s_per_layer_token=rng.uniform(1e-6, 2e-5),
            utilisation=rng.uniform(0.0, 0.9),
            gpu=True,
        )
        for i in range(num_nodes)
    )
    links = {
        (a.node_id, b.node_id): LinkProfile(rng.uniform(20e6, 10e9), rng.uniform(0.1e-3, 30e-3))
        for a in nodes for b in nodes if a is not b and rng.random() < link_prob
    }
    return ClusterState(nodes, links)


def random_problem(rng: random.Random, num_layers: int, num_nodes: int, trusted: int) -> Problem:
    base = LLAMA_70B_LIKE
    scale = base.num_layers / num_layers
    model = ModelProfile(num_layers, base.hidden_size, int(base.layer_bytes * scale), base.embed_bytes,
                         base.head_bytes, base.kv_bytes_per_token_layer, base.act_bytes)
    return Problem(random_cluster(rng, num_nodes, trusted, model), model, Workload(512, 128, 4096))
