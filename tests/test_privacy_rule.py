"""One privacy rule (common/privacy.py) for the solver, the coordinator's plan marks and a node's plan check.

Before: the solver honoured the policy's extra critical layers, but the static placement and the
coordinator knew only "first and last segment", so an operator's placement could put an extra critical
layer on an untrusted node and the signed plan did not mark it for the node to refuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model_store import ModelStore
from common.plan_view import PlanError, PlanView
from common.privacy import TrustRule, critical_layers, segment_is_critical
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from orchestrator.config import OrchestratorConfig
from orchestrator.coordinator import Coordinator
from orchestrator.planning import Plan, PrivacyPolicy
from orchestrator.registry import NodeRecord
from orchestrator.static_placement import PlacementError, place


def _nodes(*specs: tuple[str, bool]) -> list[NodeRecord]:
    return [NodeRecord(node_id=n, address=f"127.0.0.1:{i + 1}", trusted=t, model_digests=set(),
                       capacity=pb.Capacity(), x25519_public_key=bytes(32)) for i, (n, t) in enumerate(specs)]


def test_the_rule() -> None:
    assert critical_layers(30) == {0, 29}
    assert critical_layers(30, [15, 40, -1]) == {0, 15, 29}
    assert PrivacyPolicy(frozenset({15})).critical_layers(30) == critical_layers(30, [15])  # the solver's view
    assert segment_is_critical(Span(0, 10), 30) and segment_is_critical(Span(20, 30), 30)
    assert not segment_is_critical(Span(10, 20), 30) and segment_is_critical(Span(10, 20), 30, [15])


def test_operator_and_automatic_placements_keep_extra_critical_layers_on_trusted_nodes() -> None:
    nodes = _nodes(("a", True), ("b", False), ("c", True))
    assert place(nodes, 30, [0, 10, 20, 30], ["a", "b", "c"]).node_ids == ("a", "b", "c")
    with pytest.raises(PlacementError, match="privacy-critical"):
        place(nodes, 30, [0, 10, 20, 30], ["a", "b", "c"], rule=TrustRule(extra=frozenset({15})))
    with pytest.raises(PlacementError, match="privacy-critical"):
        place(nodes, 30, rule=TrustRule(extra=frozenset({15})))  # the even split puts layer 15 on b


def test_signed_plans_mark_every_critical_segment_and_nodes_refuse_them_untrusted(store: ModelStore,
                                                                                 tmp_path: Path) -> None:
    co = Coordinator(OrchestratorConfig(state_dir=str(tmp_path), store=str(store.root)))
    try:
        for record in _nodes(("a", True), ("b", False), ("c", True)):
            co.registry.nodes[record.node_id] = record
        candidate = Plan.of([(Span(0, 10), "a"), (Span(10, 20), "b"), (Span(20, 30), "c")])
        plain = co.build_plan(candidate, 1)
        assert [s.privacy_critical for s in plain.segments] == [True, False, True]
        PlanView.parse(plain)  # b may host [10, 20) when only the ends are critical
        marked = co.build_plan(candidate, 1, rule=TrustRule(extra=frozenset({15})))
        assert [s.privacy_critical for s in marked.segments] == [True, True, True]
        with pytest.raises(PlanError, match="untrusted node 'b'"):
            PlanView.parse(marked)  # what a node's plan check runs before it prepares anything
        deep = co.build_plan(candidate, 1, rule=TrustRule(12, 1))
        assert (deep.trusted_leading_layers, deep.trusted_trailing_layers) == (12, 1)  # the plan records the depth
        assert [s.privacy_critical for s in deep.segments] == [True, True, True]
        with pytest.raises(PlanError, match="untrusted node 'b'"):
            PlanView.parse(deep)
    finally:
        co.state.close()
