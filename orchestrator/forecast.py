"""The prediction a resplit reply carries: ms/token and tokens/s of the plan before and after, at the load
the nodes report now, with what bounds each (the operator sees why a split is faster, not just that it is)."""

from __future__ import annotations

from common.proto import splitmesh_pb2 as pb
from orchestrator.planning import CostBreakdown, Workload


def resplit_forecast(load: Workload, old: CostBreakdown | None, new: CostBreakdown | None) -> pb.ResplitReply:
    """Only the prediction fields of a ResplitReply (merge it into the reply); a plan that cannot be costed
    (none yet, or a node of it is gone) predicts 0."""
    reply = pb.ResplitReply(load_sessions=load.sessions, load_batch_rows=load.rows)
    if old is not None:
        reply.predicted_ms_old, reply.predicted_tokens_per_s_old = old.token_ms, old.tokens_per_s
        reply.bottleneck_old = old.bottleneck
    if new is not None:
        reply.predicted_ms_new, reply.predicted_tokens_per_s_new = new.token_ms, new.tokens_per_s
        reply.bottleneck_new = new.bottleneck
    return reply
