"""Dense numpy tables of the Phi contributions, so the DP never calls back into Python per candidate.

``seg[i, j, v]``   Phi of segment [i, j) on node v (inf when i >= j or it cannot fit in v's memory)
``link[u, v]``     Phi of one activation boundary u -> v (inf when u == v or the link is missing)
``ring[t, h]``     Phi of returning tokens tail t -> head h (0 when t == h, inf when the link is missing)
``allowed[v, l]``  whether layer l may sit on node v (hard privacy; the branch and bound narrows it further)
Each entry is the same formula as ``costs.evaluate_plan`` split into additive parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .costs import hop_costs, idle_inflation, reference_time, ring_cost
from .profiles import Problem

FloatArr = npt.NDArray[np.float64]
BoolArr = npt.NDArray[np.bool_]
IntArr = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Tables:
    """Phi pieces for one problem; node index v follows ``node_ids``."""

    node_ids: tuple[str, ...]  # index -> node id
    seg: FloatArr  # (L+1, L+1, N) segment Phi, memory-infeasible = inf
    link: FloatArr  # (N, N) boundary Phi
    ring: FloatArr  # (N, N) ring-return Phi, [tail, head]
    allowed: BoolArr  # (N, L) base layer/node admissibility (hard privacy)
    mem: npt.NDArray[np.int64]  # (L+1, L+1) bytes a segment needs on its node
    capacity: npt.NDArray[np.int64]  # (N,) memory of each node

    @property
    def num_layers(self) -> int:
        return int(self.allowed.shape[1])


def build_tables(problem: Problem) -> Tables:
    cluster, m, w, wt = problem.cluster, problem.model, problem.workload, problem.weights
    nodes = cluster.nodes
    n_nodes, n_layers = len(nodes), m.num_layers
    infl = np.array([idle_inflation(n) for n in nodes])
    cd = np.array([n.decode_s_per_layer for n in nodes]) * infl
    cp = np.array([n.prefill_s_per_layer_token for n in nodes]) * infl
    untrusted = np.array([not n.trusted for n in nodes])
    capacity = np.array([n.memory_bytes for n in nodes], dtype=np.int64)

    idx = np.arange(n_layers + 1)
    count = (idx[None, :] - idx[:, None]).astype(np.float64)  # layers in [i, j)
    valid = count > 0
    head = np.where(idx[None, :] == n_layers, m.head_layer_equiv, 0.0) * np.ones_like(count)
    dec = (count + head)[:, :, None] * cd[None, None, :]
    pre = (count * w.prompt_tokens)[:, :, None] * cp[None, None, :] + head[:, :, None] * cd[None, None, :]
    critical = problem.privacy.critical_layers(n_layers)
    crit_cum = np.concatenate([[0], np.cumsum([1 if i in critical else 0 for i in range(n_layers)])])
    crit = (crit_cum[None, :] - crit_cum[:, None]).astype(np.float64)
    priv = crit[:, :, None] * untrusted[None, None, :]
    steps = w.decode_tokens - 1
    seg = wt.alpha * (pre + steps * dec) + wt.beta * dec**2 / reference_time(problem) + wt.gamma * priv

    per_layer = m.layer_bytes + m.kv_bytes_per_token_layer * w.kv_budget_tokens
    mem = (np.maximum(count, 0).astype(np.int64) * per_layer
           + np.where(idx[:, None] == 0, m.embed_bytes, 0) + np.where(idx[None, :] == n_layers, m.head_bytes, 0))
    fits = mem[:, :, None] <= capacity[None, None, :]
    seg = np.where(valid[:, :, None] & fits, seg, np.inf)

    ids = [n.node_id for n in nodes]
    link = np.full((n_nodes, n_nodes), np.inf)
    ring = np.full((n_nodes, n_nodes), np.inf)
    for a, src in enumerate(ids):
        ring[a, a] = 0.0
        for b, dst in enumerate(ids):
            lk = cluster.link(src, dst)
            if a == b or lk is None:
                continue
            p, d = hop_costs(problem, lk)
            link[a, b] = wt.alpha * (p + steps * d)
            ring[a, b] = wt.alpha * (1 + steps) * ring_cost(problem, lk)

    allowed = np.ones((n_nodes, n_layers), dtype=bool)
    if wt.privacy_hard:
        for i in critical:
            allowed[untrusted, i] = False
    return Tables(tuple(ids), seg, link, ring, allowed, mem, capacity)


def masked_segments(tables: Tables, allowed: BoolArr) -> FloatArr:
    """``seg`` with every segment touching a disallowed (node, layer) pair set to inf."""
    bad = np.concatenate([np.zeros((allowed.shape[0], 1), dtype=np.int64), np.cumsum(~allowed, axis=1)], axis=1)
    clean = (bad[:, None, :] - bad[:, :, None]) == 0  # (N, i, j)
    return np.where(np.transpose(clean, (1, 2, 0)), tables.seg, np.inf)
