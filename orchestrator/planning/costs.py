"""The cost model: predicted latency, imbalance and privacy penalty of a plan, and Phi.

Per-request latency = prefill pass + (decode_tokens - 1) tokens at the load (below). A pass is the compute
of every segment, plus one transfer per boundary (bytes / bandwidth + rtt), plus the ring return (the
sampled token id from tail to head) when tail != head. Compute on a busy node is inflated by 1 + utilisation: the kernel
shares a CPU fairly between runnable threads, so a node's compute competes with the other work for its cores
rather than getting only what that work leaves idle (a saturating hog on every core halves the node's speed;
1 / (1 - utilisation) would call it a thousand times slower, which measurements on the testbed refute). The
utilisation trigger U_max still moves work off a busy node when the cost says it pays. The lm_head costs
``head_bytes / layer_bytes`` decoder layers (decode is memory bound) and runs once per pass.

The load (``Workload.sessions`` decoding at once, ``Workload.rows`` decode rows per forward as measured)
sets the decode step: one layer over a forward of b rows costs ``decode_s_per_layer + (b - 1) * row``
(a fixed weight read plus a per-row part, fitted by each node), a boundary carries b rows in one message
and the ring b token ids. ``decode_step_s`` is the round trip of one forward's rows at that load. What a
session sees per token is that round trip or the pipeline's slowest resource, whichever is longer: every
node computes ``forwards = sessions / b`` forwards per token of every session (all of its segments on its
one compute thread), every link carries that many messages; ``token_s`` is the max of the round trip and
the busiest node or link, throughput is ``sessions / token_s``, and the latency term L charges each decode
token ``token_s``. At one session (or all sessions in one forward) ``token_s`` is the round trip and Phi is
additive over segments; under load the max is not, and ``solver`` handles it with bottleneck caps.

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
    rows = problem.workload.rows
    mean = sum(n.layer_s_at(rows) * idle_inflation(n) for n in nodes) / len(nodes)
    return problem.model.num_layers * mean


@dataclass(frozen=True)
class StageCost:
    """Predicted seconds of one segment on its node."""

    decode_s: float  # one decode forward (of the load's rows) through this segment
    prefill_s: float  # the whole prompt through this segment


def stage_cost(problem: Problem, node: NodeProfile, start: int, end: int) -> StageCost:
    m, w = problem.model, problem.workload
    infl = idle_inflation(node)
    head = m.head_layer_equiv if end == m.num_layers else 0.0
    dec = (end - start + head) * node.layer_s_at(w.rows) * infl
    pre = (end - start) * w.prompt_tokens * node.prefill_s_per_layer_token * infl
    pre += head * node.decode_s_per_layer * infl  # lm_head only on the last prompt position
    return StageCost(decode_s=dec, prefill_s=pre)


def transfer_s(link: LinkProfile, payload_bytes: float) -> float:
    return payload_bytes * 8.0 / link.bandwidth_bps + link.rtt_s


def hop_costs(problem: Problem, link: LinkProfile) -> tuple[float, float]:
    """(prefill, decode) seconds for one activation boundary over ``link``; a decode forward's rows cross
    it as one message."""
    m, w = problem.model, problem.workload
    per_token = m.hidden_size * m.act_bytes
    return transfer_s(link, per_token * w.prompt_tokens), transfer_s(link, per_token * w.rows)


def ring_costs(problem: Problem, link: LinkProfile) -> tuple[float, float]:
    """(prefill, decode) seconds for the tail to hand the sampled token ids (one, or one per row) to the head."""
    m = problem.model
    return transfer_s(link, m.token_msg_bytes), transfer_s(link, m.token_msg_bytes * problem.workload.rows)


def wire_s(link: LinkProfile, payload_bytes: float) -> float:
    """Seconds a message occupies ``link`` (no rtt: messages of different forwards overlap in flight)."""
    return payload_bytes * 8.0 / link.bandwidth_bps


@dataclass(frozen=True)
class CostBreakdown:
    """Predicted cost of one plan at the problem's load; Phi is what the solver minimises."""

    prefill_s: float  # prompt through the chain until the first token is back at the head
    decode_step_s: float  # one decode forward's rows through the chain and back (the round trip)
    request_s: float  # prefill_s + (decode_tokens - 1) * token_s: the latency term L, as a session sees it
    imbalance: float  # U, seconds (see module docstring)
    privacy: int  # P, critical layers on untrusted nodes
    phi: float  # alpha*L + beta*U + gamma*P
    stage_decode_s: tuple[float, ...]  # per segment, one forward at the load's rows
    token_s: float = math.inf  # a session's seconds per token: max(round trip, busiest node or link)
    tokens_per_s: float = 0.0  # all sessions together: sessions / token_s
    bottleneck: str = ""  # what sets token_s: "round trip", "NODE compute" or "A->B link"

    @property
    def decode_step_ms(self) -> float:
        return self.decode_step_s * 1e3

    @property
    def token_ms(self) -> float:
        return self.token_s * 1e3


def evaluate_plan(problem: Problem, plan: Plan) -> CostBreakdown:
    """Cost of ``plan``; infinite latency when a node or a link it needs is missing."""
    cluster, m, w, wt = problem.cluster, problem.model, problem.workload, problem.weights
    inf = math.inf
    if any(not cluster.has_node(n) for n in plan.node_ids):
        return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
    stages = [stage_cost(problem, cluster.node(s.node_id), s.span.start, s.span.end) for s in plan.segments]
    pre = sum(s.prefill_s for s in stages)
    dec = sum(s.decode_s for s in stages)
    busy: dict[str, float] = {}  # seconds each node or link is occupied per forward
    for seg, stage in zip(plan.segments, stages, strict=True):
        busy[f"{seg.node_id} compute"] = busy.get(f"{seg.node_id} compute", 0.0) + stage.decode_s
    ids = plan.node_ids
    per_row = m.hidden_size * m.act_bytes
    for a, b in itertools.pairwise(ids):
        if a == b:  # adjacent segments on one node: the activation never leaves the box (no link to price)
            continue
        link = cluster.link(a, b)
        if link is None:
            return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
        p, d = hop_costs(problem, link)
        pre, dec = pre + p, dec + d
        busy[f"{a}->{b} link"] = busy.get(f"{a}->{b} link", 0.0) + wire_s(link, per_row * w.rows)
    if plan.tail != plan.head:
        ring = cluster.link(plan.tail, plan.head)
        if ring is None:
            return CostBreakdown(inf, inf, inf, inf, 0, inf, ())
        rp, rd = ring_costs(problem, ring)
        pre, dec = pre + rp, dec + rd
    token_s, bottleneck = dec, "round trip"
    if w.forwards > 1 and busy:
        name, seconds = max(busy.items(), key=lambda item: item[1])
        if w.forwards * seconds > dec:
            token_s, bottleneck = w.forwards * seconds, name
    request = pre + (w.decode_tokens - 1) * token_s
    t_ref = reference_time(problem)
    imbalance = sum(s.decode_s**2 for s in stages) / t_ref
    critical = problem.privacy.critical_layers(m.num_layers)
    privacy = sum(
        1 for seg in plan.segments if not cluster.node(seg.node_id).trusted for i in critical if i in seg.span
    )
    phi = wt.alpha * request + wt.beta * imbalance + wt.gamma * privacy
    return CostBreakdown(pre, dec, request, imbalance, privacy, phi, tuple(s.decode_s for s in stages),
                         token_s, w.sessions / token_s if token_s > 0 else inf, bottleneck)
