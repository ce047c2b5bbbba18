"""Plan structure checks, signatures, and the automatic placement's privacy rule."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.plan_signing import PlanSignatureError, key_id, sign_plan, verify_signature
from common.plan_view import PLAN_KIND, PlanError, PlanView
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from orchestrator.planning import Plan
from orchestrator.registry import NodeRecord
from orchestrator.static_placement import PlacementError, place


def _plan(segments: list[tuple[int, int, str]], trusted: set[str]) -> pb.Plan:
    nodes = sorted({n for _, _, n in segments})
    return pb.Plan(kind=PLAN_KIND, epoch=3, num_layers=30, model_digest="d",
                   segments=[pb.PlanSegment(start=a, end=b, node_id=n) for a, b, n in segments],
                   nodes=[pb.PlanNode(node_id=n, address=f"{n}:1", trusted=n in trusted) for n in nodes])


def test_structure_checks() -> None:
    view = PlanView.parse(_plan([(0, 10, "a"), (10, 30, "b"), ], {"a", "b"}))
    assert [s.span for s in view.segments] == [Span(0, 10), Span(10, 30)]
    with pytest.raises(PlanError, match="gap"):
        PlanView.parse(_plan([(0, 10, "a"), (11, 30, "a")], {"a"}))
    with pytest.raises(PlanError, match="overlap"):
        PlanView.parse(_plan([(0, 10, "a"), (9, 30, "a")], {"a"}))
    with pytest.raises(PlanError, match="untrusted"):
        PlanView.parse(_plan([(0, 10, "a"), (10, 30, "b")], {"a"}))
    wrong = _plan([(0, 30, "a")], {"a"})
    wrong.kind = "other"
    with pytest.raises(PlanError, match="kind"):
        PlanView.parse(wrong)


def test_signature_covers_the_exact_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    keys = {key_id(key.public_key()): key.public_key()}
    signed = sign_plan(_plan([(0, 30, "a")], {"a"}), key)
    verify_signature(signed, keys)
    tampered = pb.SignedPlan()
    tampered.CopyFrom(signed)
    tampered.plan_bytes = signed.plan_bytes[:-1] + bytes([signed.plan_bytes[-1] ^ 1])
    with pytest.raises(PlanSignatureError, match="does not verify"):
        verify_signature(tampered, keys)
    other = sign_plan(_plan([(0, 30, "a")], {"a"}), Ed25519PrivateKey.generate())
    with pytest.raises(PlanSignatureError, match="unknown key"):
        verify_signature(other, keys)


def _nodes(*specs: tuple[str, bool]) -> list[NodeRecord]:
    return [NodeRecord(node_id=n, address=f"{n}:1", trusted=t, model_digests=set(), capacity=pb.Capacity())
            for n, t in specs]


def test_automatic_placement_keeps_ends_on_trusted_nodes() -> None:
    plan = place(_nodes(("a", True), ("b", False), ("c", False)), 30)
    assert plan.node_ids == ("a", "b", "c", "a")  # one trusted node: the ring closes at the head
    plan = place(_nodes(("a", True), ("b", False), ("c", True)), 30)
    assert plan.node_ids == ("a", "b", "c")
    assert place(_nodes(("a", True)), 30) == Plan.of([(Span(0, 30), "a")])
    with pytest.raises(PlacementError, match="no trusted node"):
        place(_nodes(("a", False)), 30)
    with pytest.raises(PlacementError, match="not trusted"):
        place(_nodes(("a", True), ("b", False)), 30, [0, 15, 30], ["a", "b"])
    with pytest.raises(PlacementError, match="bad boundaries"):
        place(_nodes(("a", True)), 30, [0, 15, 29])
