"""The cost model: predicted latency, imbalance and privacy penalty of a plan, and Phi.

Per-request latency = prefill pass + (decode_tokens - 1) decode steps. A pass is the compute of every
segment, plus one transfer per boundary (bytes / bandwidth + rtt), plus the ring return (the sampled token
id from tail to head) when tail != head. Compute on a busy node is inflated by 1 + utilisation: the kernel
shares a CPU fairly between runnable threads, so a node's compute competes with the other work for its cores
rather than getting only what that work leaves idle (a saturating hog on every core halves the node's speed;
1 / (1 - utilisation) would call it a thousand times slower, which measurements on the testbed refute). The
utilisation trigger U_max still moves work off a busy node when the cost says it pays. The lm_head costs
``head_bytes / layer_bytes`` decoder layers (decode is memory bound) and runs once per pass.

Imbalance U = sum over stages of (stage decode time)^2 / T_ref, with T_ref = L * mean per-layer decode time
over the cluster's nodes. For a fixed total it is smallest when stages are equal, and it is additive over
segments, which keeps the solver exact (a max/mean ratio is not). Privacy P = number of privacy-critical
layers placed on untrusted nodes (forbidden outright when privacy is hard).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from .plan import Plan
from .profiles import LinkProfile, NodeProfile, Problem


def idle_inflation(node: NodeProfile) -> float:
    """How much slower a layer runs on ``node`` than on the same node idle (fair share against other work)."""
    return 1.0 + min(1.0, max(0.0, node.utilisation))


def reference_time(problem: Problem) -> float:
    """T_ref: the whole model's decode time on an average node of this cluster (normalises U)."""
    nodes = problem.cluster.nodes
    if not nodes:
        return 1.0
    mean = sum(n.decode_s_per_layer * idle_inflation(n) for n in nodes) / len(nodes)
    return problem.model.num_layers * mean


@dataclass(frozen=True)
class StageCost:
    """Predicted seconds of one segment on its node."""

    decode_s: float  # one decode step through this segment
    prefill_s: float  # the whole prompt through this segment


def stage_cost(problem: Problem, node: NodeProfile, start: int, end: int) -> StageCost:
    m, w = problem.model, problem.workload
    infl = idle_inflation(node)
    head = m.head_layer_equiv if end == m.num_layers else 0.0
    dec = (end - start + head) * node.decode_s_per_layer * infl
    pre = (end - start) * w.prompt_tokens * node.prefill_s_per_layer_token * infl
    pre += head * node.decode_s_per_layer * infl  # lm_head only on the last prompt position
    return StageCost(decode_s=dec, prefill_s=pre)


def transfer_s(link: LinkProfile, payload_bytes: float) -> float:
    return payload_bytes * 8.0 / link.bandwidth_bps + link.rtt_s


def hop_costs(problem: Problem, link: LinkProfile) -> tuple[float, float]:
    """(prefill, decode) seconds for one activation boundary over ``link``."""
    m = problem.model
    per_token = m.hidden_size * m.act_bytes
    return transfer_s(link, per_token * problem.workload.prompt_tokens), transfer_s(link, per_token)


def ring_cost(problem: Problem, link: LinkProfile) -> float:
    """Seconds for the tail to hand one sampled token id back to the head."""
    return transfer_s(link, problem.model.token_msg_bytes)


@dataclass(frozen=True)
class CostBreakdown:
    """Predicted cost of one plan; Phi is what the solver minimises."""

    prefill_s: float  # prompt through the chain until the first token is back at the head
    decode_step_s: float  # one more token through the chain and back
    request_s: float  # prefill_s + (decode_tokens - 1) * decode_step_s: the latency term L
    imbalance: float  # U, seconds (see module docstring)
    privacy: int  # P, critical layers on untrusted nodes
    phi: float  # alpha*L + beta*U + gamma*P
    stage_decode_s: tuple[float, ...]  # per segment, for display and the imbalance term

    @property
    def decode_step_ms(self) -> float:
        return self.decode_step_s * 1e3


def evaluate_plan(problem: Problem, plan: Plan) -> CostBreakdown:
    """Cost of ``plan``; infinite latency when a node or a link it needs is missing."""
    cluster, m, w, wt = problem.cluster, problem.model, problem.workload, problem.weights
    inf = math.inf
    if any(not cluster.has_node(n) for n in plan.node_ids):
        return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
    stages = [stage_cost(problem, cluster.node(s.node_id), s.span.start, s.span.end) for s in plan.segments]
    pre = sum(s.prefill_s for s in stages)
    dec = sum(s.decode_s for s in stages)
    ids = plan.node_ids
    for a, b in itertools.pairwise(ids):
        if a == b:  # adjacent segments on one node: the activation never leaves the box (no link to price)
            continue
        link = cluster.link(a, b)
        if link is None:
            return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
        p, d = hop_costs(problem, link)
        pre, dec = pre + p, dec + d
    if plan.tail != plan.head:
        ring = cluster.link(plan.tail, plan.head)
        if ring is None:
            return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
        r = ring_cost(problem, ring)
        pre, dec = pre + r, dec + r
    request = pre + (w.decode_tokens - 1) * dec
    t_ref = reference_time(problem)
    imbalance = sum(s.decode_s**2 for s in stages) / t_ref
    critical = problem.privacy.critical_layers(m.num_layers)
    privacy = sum(
        1 for seg in plan.segments if not cluster.node(seg.node_id).trusted for i in critical if i in seg.span
    )
    phi = wt.alpha * request + wt.beta * imbalance + wt.gamma * privacy
    return CostBreakdown(pre, dec, request, imbalance, privacy, phi, tuple(s.decode_s for s in stages))
