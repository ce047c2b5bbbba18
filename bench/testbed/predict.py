"""The orchestrator's own cost model applied to what the live mesh reports, to check predictions against reality.

The cluster state is built exactly as the orchestrator builds it (orchestrator.environment.cluster_state over
the alive nodes' capacity and link reports, with the live policy), so a mismatch between predicted and
measured latency is a mismatch of the cost model or of its inputs, not of this benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.model_store import ModelStore
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from orchestrator.environment import cluster_state, model_profile
from orchestrator.planning import ClusterState, ModelProfile, Plan, Problem, Workload, evaluate_plan
from orchestrator.policy import Policy, apply_policy
from orchestrator.registry import NodeRecord
from splitmesh.client import Client


@dataclass(frozen=True)
class Prediction:
    """Cost-model figures for one request on one plan (seconds)."""

    ttft_s: float  # prefill pass until the first token is back at the head
    per_token_s: float  # one decode step
    request_s: float  # ttft + (tokens - 1) * per_token


@dataclass(frozen=True)
class Snapshot:
    """What the orchestrator knew at one moment: cluster state, policy and the committed plan."""

    cluster: ClusterState
    policy: Policy
    plan: Plan | None
    epoch: int


def plan_of(proto: pb.Plan) -> Plan | None:
    if not proto.segments:
        return None
    return Plan.of([(Span(s.start, s.end), s.node_id) for s in proto.segments])


class Predictor:
    def __init__(self, store: Path, model: str) -> None:
        stored = ModelStore(store.expanduser()).open(model)
        self.model: ModelProfile = model_profile(stored)
        self.vocab_size = int(stored.manifest.config["vocab_size"])

    def snapshot(self, client: Client) -> Snapshot:
        status = client.status()
        records = [NodeRecord(node_id=n.node_id, address=n.address, trusted=n.trusted, model_digests=set(),
                              capacity=n.capacity, links=list(n.links)) for n in status.nodes if n.alive]
        policy = apply_policy(Policy(), client.policy())
        return Snapshot(cluster_state(records, policy), policy, plan_of(status.plan), status.plan.epoch)

    def predict(self, snap: Snapshot, prompt_tokens: int, new_tokens: int) -> Prediction | None:
        """None when there is no plan or the cost model cannot evaluate it (a node or link missing)."""
        if snap.plan is None:
            return None
        p = snap.policy
        problem = Problem(snap.cluster, self.model, Workload(prompt_tokens, new_tokens, p.kv_budget_tokens),
                          p.decision.weights, p.decision.privacy)
        try:
            cost = evaluate_plan(problem, snap.plan)
        except (KeyError, ValueError):
            return None
        return Prediction(cost.prefill_s, cost.decode_step_s, cost.request_s)

    @staticmethod
    def inputs(snap: Snapshot) -> dict[str, object]:
        """The cost model's inputs as reported at ``snap``: what a wrong prediction must be traced back to."""
        nodes = {n.node_id: {"decode_ms_per_layer": round(n.decode_s_per_layer * 1e3, 3),
                             "prefill_ms_per_layer_token": round(n.prefill_s_per_layer_token * 1e3, 4),
                             "utilisation": round(n.utilisation, 3),
                             "memory_mb": round(n.memory_bytes / 2**20)} for n in snap.cluster.nodes}
        links = {f"{a}->{b}": {"mbps": round(link.bandwidth_bps / 1e6, 2), "rtt_ms": round(link.rtt_s * 1e3, 2)}
                 for (a, b), link in sorted(snap.cluster.links.items())}
        return {"epoch": snap.epoch, "nodes": nodes, "links": links}

    def bytes_per_token(self) -> int:
        """Activation bytes one token carries across one segment boundary."""
        return self.model.hidden_size * self.model.act_bytes
