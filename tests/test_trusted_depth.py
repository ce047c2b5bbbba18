"""Trusted depth: leading and trailing layers that only trusted nodes run, one rule (common/privacy.py) for
the solver, the static placement, the signed plan and a node's plan check.

Before: only the first and the last layer were enforced; an operator could not require more, and a plan
did not record a depth for the nodes to check.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.plan_view import PLAN_KIND, PlanError, PlanView
from common.privacy import TrustRule
from common.proto import splitmesh_pb2 as pb
from common.spans import Span, spans_from_boundaries
from orchestrator.planning import PrivacyPolicy, Problem, plan_violations, solve_resplit
from orchestrator.policy import Policy, PolicyError, apply_policy
from orchestrator.registry import NodeRecord
from orchestrator.static_placement import PlacementError, place
from tests.test_planning_solver import problems

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_rule_covers_both_ends_to_the_depth() -> None:
    assert TrustRule(3, 2).critical_layers(10) == {0, 1, 2, 8, 9}
    assert TrustRule(0, 0).critical_layers(10) == {0, 9}  # the ends are never given up
    assert TrustRule(40, 1).critical_layers(10) == set(range(10))
    assert TrustRule(3, 1).segment_is_critical(Span(2, 5), 10)
    assert not TrustRule(2, 1).segment_is_critical(Span(2, 5), 10)


def test_policy_fields_are_validated_and_feed_the_rule() -> None:
    policy = apply_policy(Policy(), {"trusted_leading_layers": "4", "trusted_trailing_layers": "2"})
    assert policy.trust_rule() == TrustRule(4, 2)
    assert policy.decision.privacy.critical_layers(30) == {0, 1, 2, 3, 28, 29}
    assert apply_policy(policy, {"privacy_hard": "false"}).trust_rule() == TrustRule()  # soft: ends only
    for bad in ("0", "-1", "x"):
        with pytest.raises(PolicyError, match="trusted_leading_layers"):
            apply_policy(Policy(), {"trusted_leading_layers": bad})


@st.composite
def deep_problems(draw: st.DrawFn) -> Problem:
    """A random solver instance whose policy also asks for a trusted depth at both ends."""
    problem = draw(problems(max_layers=16, max_nodes=6))
    n = problem.model.num_layers
    privacy = PrivacyPolicy(problem.privacy.extra_critical_layers, draw(st.integers(1, n + 1)),
                            draw(st.integers(1, n + 1)))
    weights = dataclasses.replace(problem.weights, privacy_hard=True)
    return dataclasses.replace(problem, privacy=privacy, weights=weights)


@FAST
@given(deep_problems())
def test_solver_never_puts_a_layer_within_the_depth_on_an_untrusted_node(problem: Problem) -> None:
    result = solve_resplit(problem)
    if result.plan is None:
        return
    assert plan_violations(problem, result.plan) == []
    trusted = {n.node_id: n.trusted for n in problem.cluster.nodes}
    critical = problem.privacy.critical_layers(problem.model.num_layers)
    for seg in result.plan.segments:
        assert trusted[seg.node_id] or not critical & set(seg.span.layers()), (str(result.plan), critical)


def _records(trust: list[bool]) -> list[NodeRecord]:
    return [NodeRecord(node_id=f"n{i}", address=f"127.0.0.1:{i + 1}", trusted=t, model_digests=set(),
                       capacity=pb.Capacity(), x25519_public_key=bytes(32)) for i, t in enumerate(trust)]


def _wire(spans: list[Span], placement: list[str], nodes: list[NodeRecord], num_layers: int, rule: TrustRule,
          marked: bool) -> pb.Plan:
    """A plan as the orchestrator would sign it (segments marked per ``rule`` when ``marked``)."""
    return pb.Plan(kind=PLAN_KIND, epoch=1, model_digest="d", num_layers=num_layers,
                   trusted_leading_layers=rule.leading, trusted_trailing_layers=rule.trailing,
                   nodes=[pb.PlanNode(node_id=r.node_id, address=r.address, trusted=r.trusted) for r in nodes],
                   segments=[pb.PlanSegment(start=s.start, end=s.end, node_id=n,
                                            privacy_critical=marked and rule.segment_is_critical(s, num_layers))
                             for s, n in zip(spans, placement, strict=True)])


@st.composite
def placements(draw: st.DrawFn) -> tuple[list[NodeRecord], int, list[int], list[str], TrustRule]:
    n_layers = draw(st.integers(1, 24))
    nodes = _records(draw(st.lists(st.booleans(), min_size=1, max_size=5)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n_layers - 1)), max_size=5)) - {n_layers})
    bounds = [0, *cuts, n_layers]
    chosen = [draw(st.sampled_from([r.node_id for r in nodes])) for _ in range(len(bounds) - 1)]
    rule = TrustRule(draw(st.integers(1, n_layers + 1)), draw(st.integers(1, n_layers + 1)))
    return nodes, n_layers, bounds, chosen, rule


@FAST
@given(placements())
def test_placement_and_node_check_refuse_the_same_plans(case: tuple[list[NodeRecord], int, list[int], list[str],
                                                                     TrustRule]) -> None:
    nodes, n_layers, bounds, chosen, rule = case
    spans = spans_from_boundaries(bounds)
    trusted = {r.node_id: r.trusted for r in nodes}
    critical = rule.critical_layers(n_layers)
    exposed = any(not trusted[n] and critical & set(s.layers()) for s, n in zip(spans, chosen, strict=True))
    try:
        plan = place(nodes, n_layers, bounds, chosen, rule)
        assert not exposed
        assert all(trusted[s.node_id] or not critical & set(s.span.layers()) for s in plan.segments)
    except PlacementError:
        assert exposed
    for marked in (True, False):  # the node refuses on the recorded depth even when nothing is marked
        wire = _wire(spans, chosen, nodes, n_layers, rule, marked)
        if exposed:
            with pytest.raises(PlanError, match="untrusted node"):
                PlanView.parse(wire)
        else:
            assert PlanView.parse(wire).trust == rule


@FAST
@given(placements())
def test_automatic_placement_respects_the_depth(case: tuple[list[NodeRecord], int, list[int], list[str],
                                                            TrustRule]) -> None:
    nodes, n_layers, _, _, rule = case
    trusted = {r.node_id: r.trusted for r in nodes}
    critical = rule.critical_layers(n_layers)
    try:
        plan = place(nodes, n_layers, rule=rule)
    except PlacementError:
        return
    assert all(trusted[s.node_id] or not critical & set(s.span.layers()) for s in plan.segments)
