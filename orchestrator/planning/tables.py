"""Dense numpy tables of the Phi contributions, so the DP never calls back into Python per candidate.

``seg[i, j, v]``   Phi of segment [i, j) on node v (inf when i >= j or it cannot fit in v's memory)
``link[u, v]``     Phi of one activation boundary u -> v (inf when u == v or the link is missing)
``ring[t, h]``     Phi of returning tokens tail t -> head h (0 when t == h, inf when the link is missing)
``allowed[v, l]``  whether layer l may sit on node v (hard privacy, a pinned head); ``seg`` is already masked with it
``stage[i, j, v]`` seconds one decode forward (at the load's rows) of [i, j) occupies node v: the bottleneck caps
Each entry is the same formula as ``costs.evaluate_plan`` split into additive parts, with each decode token
charged the round trip; the throughput bound under load is not additive (see ``bottleneck``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .costs import idle_inflation, reference_time
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
    stage: FloatArr  # (L+1, L+1, N) decode seconds per forward of a segment on a node
    decode: FloatArr  # (L+1, L+1, N) the part of ``seg`` that charges decode tokens the segment's compute

    @property
    def num_layers(self) -> int:
        return int(self.allowed.shape[1])


def build_tables(problem: Problem) -> Tables:
    cluster, m, w, wt = problem.cluster, problem.model, problem.workload, problem.weights
    nodes = cluster.nodes
    n_nodes, n_layers = len(nodes), m.num_layers
    infl = np.array([idle_inflation(n) for n in nodes])
    rows = w.rows  # decode rows per forward at the load: a decode step's layers, hops and ring carry that many
    cd1 = np.array([n.decode_s_per_layer for n in nodes]) * infl  # one row: the prompt's last position
    cd = np.array([n.layer_s_at(rows) for n in nodes]) * infl
    cp = np.array([n.prefill_s_per_layer_token for n in nodes]) * infl
    untrusted = np.array([not n.trusted for n in nodes])
    capacity = np.array([n.memory_bytes for n in nodes], dtype=np.int64)

    idx = np.arange(n_layers + 1)
    count = (idx[None, :] - idx[:, None]).astype(np.float64)  # layers in [i, j)
    valid = count > 0
    is_last = idx[None, :] == n_layers
    head = np.where(is_last, m.head_layer_equiv, 0.0) * valid  # lm_head runs on the last segment
    steps = w.decode_tokens - 1
    # seg = alpha*(pre + steps*dec) + beta*dec^2/T_ref + gamma*priv, expanded per node so each term is one
    # outer product: pre = n*P*cp + head*cd1, dec = (n + head)*cd.
    per_layer = wt.alpha * (w.prompt_tokens * cp + steps * cd)
    per_head = wt.alpha * (cd1 + steps * cd)
    per_sq = wt.beta * cd**2 / reference_time(problem)
    seg = np.multiply.outer(count, per_layer)
    seg += np.multiply.outer(head, per_head)
    seg += np.multiply.outer((count + head) ** 2, per_sq)
    critical = problem.privacy.critical_layers(n_layers)
    crit_cum = np.concatenate([[0], np.cumsum([1 if i in critical else 0 for i in range(n_layers)])])
    crit = crit_cum[None, :] - crit_cum[:, None]
    if wt.privacy_hard:
        banned = (crit > 0)[:, :, None] & untrusted[None, None, :]
    else:
        seg += np.multiply.outer(crit.astype(np.float64), wt.gamma * untrusted)
        banned = np.zeros(seg.shape, dtype=bool)

    per_layer_mem = m.layer_bytes + m.kv_bytes_per_token_layer * w.kv_budget_tokens
    mem = (np.maximum(count, 0).astype(np.int64) * per_layer_mem
           + np.where(idx[:, None] == 0, m.embed_bytes, 0) + np.where(is_last, m.head_bytes, 0))
    fits = mem[:, :, None] <= capacity[None, None, :]
    seg[~(valid[:, :, None] & fits) | banned] = np.inf

    ids = [n.node_id for n in nodes]
    bw = np.full((n_nodes, n_nodes), np.nan)
    rtt = np.full((n_nodes, n_nodes), np.nan)
    pos = {node_id: i for i, node_id in enumerate(ids)}
    for (src, dst), lk in cluster.links.items():
        if src in pos and dst in pos and src != dst:
            bw[pos[src], pos[dst]] = lk.bandwidth_bps
            rtt[pos[src], pos[dst]] = lk.rtt_s
    act = float(m.hidden_size * m.act_bytes) * 8.0
    with np.errstate(invalid="ignore"):
        hop = (act * w.prompt_tokens / bw + rtt) + steps * (act * rows / bw + rtt)  # as costs.hop_costs
        token = m.token_msg_bytes * 8.0 / bw
        back = (token + rtt) + steps * (token * rows + rtt)  # as costs.ring_costs
    link = np.where(np.isnan(bw), np.inf, wt.alpha * hop)
    ring = np.where(np.isnan(bw), np.inf, wt.alpha * back)
    np.fill_diagonal(ring, 0.0)

    allowed = np.ones((n_nodes, n_layers), dtype=bool)
    if wt.privacy_hard:
        for i in critical:
            allowed[untrusted, i] = False
    if problem.head is not None:
        others = np.array([n.node_id != problem.head for n in nodes], dtype=bool)
        seg[0, :, others] = np.inf
        allowed[others, 0] = False
    stage = np.multiply.outer(count + head, cd)
    return Tables(tuple(ids), seg, link, ring, allowed, mem, capacity, stage, wt.alpha * steps * stage)
