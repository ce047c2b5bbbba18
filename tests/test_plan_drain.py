"""A replaced plan drains: its segments and weight keys stay on the node for ``drain_s`` after the COMMIT
(a step already working on it upstream can still open here), then both go."""

from __future__ import annotations

import time
from pathlib import Path

from common.model_import import import_random
from common.model_store import ModelStore
from common.plan_signing import key_id, sign_plan
from common.spans import Span
from node_agent.plan_state import PlanState
from node_agent.segment_pool import SegmentPool
from tests.test_plan_attacks import CLUSTER, KEY, _plan


def _node(tmp_path: Path, drain_s: float) -> tuple[PlanState, SegmentPool, dict[str, bytes]]:
    owner = ModelStore(tmp_path / "store")
    digest = import_random(owner, "tiny-llama", "tiny", seed=0)  # encrypted at rest
    keys: dict[str, bytes] = {}
    store = ModelStore(owner.root, keys=keys)  # as a node opens it: only the keys its plans grant
    pool = SegmentPool(store)
    plans = PlanState("me", tmp_path / "state", store, pool, weight_keys=keys, drain_s=drain_s)
    plans.trust_key(key_id(KEY.public_key()), KEY.public_key(), CLUSTER)

    def accept(epoch: int, segments: list[tuple[int, int, str]]) -> None:
        signed = sign_plan(_plan(digest, epoch, segments), KEY)
        view = plans.verify(signed)
        assert view is not None
        plans.grant(epoch, {sha: owner.keys[sha] for sha in plans.hosted_blobs(view)})
        plans.prepare_blocking(view, signed)
        assert plans.commit(epoch)

    accept(1, [(0, 3, "me"), (3, 6, "peer")])
    accept(2, [(0, 2, "me"), (2, 6, "peer")])
    return plans, pool, keys


def _hosted(plans: PlanState, epoch: int) -> set[str]:
    view = plans.plan(epoch)
    assert view is not None
    return set(plans.hosted_blobs(view))


def test_a_replaced_plan_keeps_segments_and_keys_for_the_drain_then_releases_both(tmp_path: Path) -> None:
    plans, pool, keys = _node(tmp_path, drain_s=0.6)
    assert set(pool.spans()) == {Span(0, 3), Span(0, 2)}  # the old plan's segment can still serve a step
    assert set(keys) == _hosted(plans, 1) | _hosted(plans, 2) and _hosted(plans, 1) - _hosted(plans, 2)
    deadline = time.monotonic() + 10
    while Span(0, 3) in pool.spans():
        assert time.monotonic() < deadline, "the replaced plan was never released"
        time.sleep(0.05)
    assert set(pool.spans()) == {Span(0, 2)}
    assert set(keys) == _hosted(plans, 2)  # the keys of layers only the old plan held are forgotten with it


def test_no_drain_releases_at_the_commit(tmp_path: Path) -> None:
    plans, pool, keys = _node(tmp_path, drain_s=0)
    assert set(pool.spans()) == {Span(0, 2)}
    assert set(keys) == _hosted(plans, 2)
