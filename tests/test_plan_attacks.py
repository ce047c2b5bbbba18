"""Forged, replayed and malformed plans are refused, and the node stays on its last good plan,
also after a crash and restart (the highest epoch and the committed plan are persisted with fsync)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.model_import import import_random
from common.model_store import ModelStore
from common.plan_signing import key_id, sign_plan
from common.plan_view import PLAN_KIND
from common.proto import splitmesh_pb2 as pb
from node_agent.plan_state import PlanRejected, PlanState
from node_agent.segment_pool import SegmentPool

CLUSTER = "cluster-a"
KEY = Ed25519PrivateKey.generate()


def _plan(digest: str, epoch: int, segments: list[tuple[int, int, str]] | None = None,
          trusted: tuple[str, ...] = ("me", "peer"), **fields: object) -> pb.Plan:
    now = int(time.time() * 1000)
    segments = segments or [(0, 3, "me"), (3, 6, "peer")]
    plan = pb.Plan(kind=PLAN_KIND, cluster_id=CLUSTER, epoch=epoch, model_digest=digest, num_layers=6,
                   issued_at_ms=now, expires_at_ms=now + 3_600_000,
                   segments=[pb.PlanSegment(start=a, end=b, node_id=n) for a, b, n in segments],
                   nodes=[pb.PlanNode(node_id=n, address=f"{n}:1", trusted=n in trusted) for n in ("me", "peer")])
    for name, value in fields.items():
        setattr(plan, name, value)
    return plan


@pytest.fixture
def setup(tmp_path: Path) -> tuple[ModelStore, str, Path]:
    store = ModelStore(tmp_path / "store")
    digest = import_random(store, "tiny-llama", "tiny", seed=0)
    return store, digest, tmp_path / "state"


def _node(store: ModelStore, state: Path) -> PlanState:
    plans = PlanState("me", state, store, SegmentPool(store))
    plans.trust_key(key_id(KEY.public_key()), KEY.public_key(), CLUSTER)
    return plans


def _accept(plans: PlanState, signed: pb.SignedPlan) -> None:
    view = plans.verify(signed)
    assert view is not None
    plans.prepare_blocking(view, signed)
    assert plans.commit(view.epoch)


def _attacks(digest: str, good: pb.SignedPlan) -> dict[str, tuple[pb.SignedPlan, str]]:
    other_key = Ed25519PrivateKey.generate()
    now = int(time.time() * 1000)
    unsigned = sign_plan(_plan(digest, 10), KEY)
    unsigned.signature = b""
    other_bytes = sign_plan(_plan(digest, 11), KEY)
    other_bytes.plan_bytes = _plan(digest, 12).SerializeToString()
    equivocation = sign_plan(_plan(digest, 5, [(0, 2, "me"), (2, 6, "peer")]), KEY)
    return {
        "rollback": (sign_plan(_plan(digest, 4), KEY), "FAILED_PRECONDITION"),
        "equivocation": (equivocation, "FAILED_PRECONDITION"),
        "expired": (sign_plan(_plan(digest, 20, expires_at_ms=now - 1), KEY), "FAILED_PRECONDITION"),
        "issued in the future": (sign_plan(_plan(digest, 21, issued_at_ms=now + 3_600_000), KEY),
                                 "FAILED_PRECONDITION"),
        "wrong type": (sign_plan(_plan(digest, 22, kind="splitmesh.other/1"), KEY), "INVALID_ARGUMENT"),
        "wrong cluster": (sign_plan(_plan(digest, 23, cluster_id="cluster-b"), KEY), "PERMISSION_DENIED"),
        "no signature": (unsigned, "UNAUTHENTICATED"),
        "unknown key": (sign_plan(_plan(digest, 24), other_key), "UNAUTHENTICATED"),
        "signature over other bytes": (other_bytes, "UNAUTHENTICATED"),
        "trust violation": (sign_plan(_plan(digest, 25, trusted=("me",)), KEY), "INVALID_ARGUMENT"),
        "overlapping segments": (sign_plan(_plan(digest, 26, [(0, 4, "me"), (3, 6, "peer")]), KEY),
                                 "INVALID_ARGUMENT"),
        "gap": (sign_plan(_plan(digest, 27, [(0, 3, "me"), (4, 6, "peer")]), KEY), "INVALID_ARGUMENT"),
        "oversized": (pb.SignedPlan(plan_bytes=b"\0" * (2 << 20), signature=b"x", key_id="k"), "INVALID_ARGUMENT"),
        "garbage bytes": (sign_plan_bytes(b"\xff\xff\xff\x00garbage"), "INVALID_ARGUMENT"),
    }


def sign_plan_bytes(raw: bytes) -> pb.SignedPlan:
    return pb.SignedPlan(plan_bytes=raw, signature=KEY.sign(raw), key_id=key_id(KEY.public_key()))


def _assert_all_refused(plans: PlanState, attacks: dict[str, tuple[pb.SignedPlan, str]], good_epoch: int) -> None:
    for name, (signed, code) in attacks.items():
        with pytest.raises(PlanRejected) as caught:
            plans.verify(signed)
        assert caught.value.code == code, f"{name}: {caught.value.code} {caught.value.reason}"
        assert plans.committed is not None and plans.committed.epoch == good_epoch, name


def test_attacks_are_refused_before_and_after_restart(setup: tuple[ModelStore, str, Path]) -> None:
    store, digest, state = setup
    plans = _node(store, state)
    good = sign_plan(_plan(digest, 5), KEY)
    _accept(plans, good)
    assert plans.verify(good) is None  # the same epoch with the same bytes is an idempotent ACK
    attacks = _attacks(digest, good)
    assert len(attacks) >= 12
    _assert_all_refused(plans, attacks, 5)

    restarted = PlanState("me", state, store, SegmentPool(store))  # as after kill -9: only disk survives
    view = restarted.restore_blocking()
    assert view is not None and restarted.committed is not None and restarted.committed.epoch == 5
    assert restarted.highest_accepted == 5
    _assert_all_refused(restarted, attacks, 5)


def test_a_node_refuses_a_different_orchestrator_key(setup: tuple[ModelStore, str, Path]) -> None:
    store, _, state = setup
    _node(store, state)
    restarted = PlanState("me", state, store, SegmentPool(store))
    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(PermissionError, match="not the key this node trusts"):
        restarted.trust_key(key_id(impostor.public_key()), impostor.public_key(), CLUSTER)


def test_untrusted_node_refuses_privacy_critical_segment(setup: tuple[ModelStore, str, Path]) -> None:
    store, digest, state = setup
    plans = _node(store, state)
    plan = _plan(digest, 7, [(0, 3, "peer"), (3, 5, "me"), (5, 6, "peer")], trusted=("peer",))
    plan.segments[1].privacy_critical = True  # the policy marked a middle span critical too
    with pytest.raises(PlanRejected) as caught:
        plans.verify(sign_plan(plan, KEY))
    assert caught.value.code in ("PERMISSION_DENIED", "INVALID_ARGUMENT")



def test_untrusted_node_refuses_a_segment_within_the_recorded_trusted_depth(
        setup: tuple[ModelStore, str, Path]) -> None:
    """The plan records the trusted depth; the node applies it even to a segment the plan did not mark."""
    store, digest, state = setup
    plans = _node(store, state)
    segments = [(0, 2, "peer"), (2, 5, "me"), (5, 6, "peer")]
    shallow = _plan(digest, 8, segments, trusted=("peer",), trusted_leading_layers=2)
    assert plans.verify(sign_plan(shallow, KEY)) is not None  # [2, 5) lies outside a depth of 2
    deep = _plan(digest, 9, segments, trusted=("peer",), trusted_leading_layers=3)
    with pytest.raises(PlanRejected, match="untrusted node 'me'") as caught:
        plans.verify(sign_plan(deep, KEY))
    assert caught.value.code == "INVALID_ARGUMENT"
    tail_deep = _plan(digest, 10, segments, trusted=("peer",), trusted_trailing_layers=2)
    with pytest.raises(PlanRejected, match="untrusted node 'me'"):
        plans.verify(sign_plan(tail_deep, KEY))
