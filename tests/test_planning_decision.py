"""The decision loop: each trigger, cool-down, hysteresis, migrate-before-resplit, lost nodes, the EWMA."""

from __future__ import annotations

import math

import pytest

from common.spans import Span
from orchestrator.planning import (
    ClusterState,
    DecisionConfig,
    DecisionEngine,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    Plan,
    Workload,
)
from orchestrator.planning.synthetic import full_mesh

MODEL = ModelProfile(num_layers=8, hidden_size=4096, layer_bytes=1000, embed_bytes=500, head_bytes=500,
                     kv_bytes_per_token_layer=1, act_bytes=2)
WORK = Workload(prompt_tokens=128, decode_tokens=32, kv_budget_tokens=100)
HALF = 4 * 1100 + 500  # memory for four layers plus embed or head: nobody holds the whole model


def node(name: str, util: float = 0.0, memory: int = HALF, decode: float = 1e-3) -> NodeProfile:
    return NodeProfile(name, True, memory, decode, decode / 50, util)


def plan_ab() -> Plan:
    return Plan.of([(Span(0, 4), "a"), (Span(4, 8), "b")])


def cluster(util_b: float = 0.0, bw: float = 1e9, extra: tuple[NodeProfile, ...] = ()) -> ClusterState:
    return full_mesh([node("a"), node("b", util_b), node("c"), *extra], bw, 1e-3)


def test_no_trigger_keeps() -> None:
    d = DecisionEngine().decide(0.0, cluster(), MODEL, WORK, plan_ab())
    assert d.kind == "keep" and d.triggers == () and d.reason == "no trigger fired"
    assert d.old_cost is not None


def test_latency_trigger_fires_from_ewma() -> None:
    eng = DecisionEngine(DecisionConfig(hysteresis=1.0))  # huge hysteresis: watch the trigger, not the move
    eng.observe_latency(100.0)
    assert eng.decide(0.0, cluster(), MODEL, WORK, plan_ab()).triggers == ()
    for _ in range(10):
        eng.observe_latency(400.0)
    d = eng.decide(0.0, cluster(), MODEL, WORK, plan_ab())
    assert [t.name for t in d.triggers] == ["latency"] and d.triggers[0].value > 150


def test_ewma_smoothing() -> None:
    eng = DecisionEngine(DecisionConfig(ewma_alpha=0.25))
    eng.observe_latency(100.0)
    eng.observe_latency(200.0)
    assert eng.ewma_ms is not None and math.isclose(eng.ewma_ms, 125.0)


def test_utilisation_trigger_and_migration_off_the_busy_node() -> None:
    d = DecisionEngine().decide(0.0, cluster(util_b=0.9), MODEL, WORK, plan_ab())
    assert [t.name for t in d.triggers] == ["utilisation"] and math.isclose(d.triggers[0].value, 0.9)
    assert d.kind == "migrate" and d.plan is not None
    assert d.plan.spans == plan_ab().spans and "b" not in d.plan.node_ids
    assert d.new_cost is not None and d.old_cost is not None and d.new_cost.phi < d.old_cost.phi


def test_busy_node_outside_the_plan_does_not_fire() -> None:
    d = DecisionEngine().decide(0.0, full_mesh([node("a"), node("b"), node("c", 0.99)], 1e9, 1e-3), MODEL, WORK,
                                plan_ab())
    assert d.kind == "keep" and d.triggers == ()


def test_bandwidth_trigger_plan_scope_vs_all() -> None:
    links = dict(cluster().links)
    links[("a", "c")] = LinkProfile(10e6, 1e-3)  # slow, but the plan a->b->a never uses it
    cl = ClusterState(cluster().nodes, links)
    assert DecisionEngine().decide(0.0, cl, MODEL, WORK, plan_ab()).triggers == ()
    d = DecisionEngine(DecisionConfig(bandwidth_scope="all", hysteresis=1.0)).decide(0.0, cl, MODEL, WORK, plan_ab())
    assert [t.name for t in d.triggers] == ["bandwidth"] and d.triggers[0].value == 10e6
    links[("b", "a")] = LinkProfile(10e6, 1e-3)  # the ring return of the plan
    d = DecisionEngine(DecisionConfig(hysteresis=1.0)).decide(0.0, ClusterState(cl.nodes, links), MODEL, WORK,
                                                                plan_ab())
    assert [t.name for t in d.triggers] == ["bandwidth"]


def test_cooldown_blocks_then_releases() -> None:
    eng = DecisionEngine(DecisionConfig(cooldown_s=30.0))
    first = eng.decide(0.0, cluster(util_b=0.9), MODEL, WORK, plan_ab())
    assert first.kind == "migrate" and first.plan is not None
    moved = first.plan
    busy = moved.node_ids[1]
    hot = full_mesh([node(n, 0.9 if n == busy else 0.0) for n in ("a", "b", "c")], 1e9, 1e-3)
    blocked = eng.decide(10.0, hot, MODEL, WORK, moved)
    assert blocked.kind == "keep" and blocked.reason.startswith("cool-down") and blocked.triggers
    released = eng.decide(31.0, hot, MODEL, WORK, moved)
    assert released.kind in ("migrate", "resplit")


def test_hysteresis_keeps_small_gains() -> None:
    # b is slightly busy (trigger threshold lowered to fire); moving to c gains only a little
    cfg_high = DecisionConfig(utilisation_max=0.05, hysteresis=0.5)
    d = DecisionEngine(cfg_high).decide(0.0, cluster(util_b=0.1), MODEL, WORK, plan_ab())
    assert d.kind == "keep" and "hysteresis" in d.reason and d.new_cost is not None
    cfg_low = DecisionConfig(utilisation_max=0.05, hysteresis=0.0)
    d = DecisionEngine(cfg_low).decide(0.0, cluster(util_b=0.1), MODEL, WORK, plan_ab())
    assert d.kind == "migrate"


def test_migration_tried_before_resplit() -> None:
    # A re-split onto a very fast big node would win on Phi, but migrating b's span to c already meets targets.
    big = NodeProfile("big", True, 100_000, 1e-5, 1e-7, 0.0)
    cl = cluster(util_b=0.9, extra=(big,))
    d = DecisionEngine().decide(0.0, cl, MODEL, WORK, plan_ab())
    assert d.kind == "migrate" and d.plan is not None and d.plan.spans == plan_ab().spans


def test_resplit_when_migration_misses_targets() -> None:
    # Every 4-layer span is too slow for L_max on any node; only a re-split onto "big" meets it.
    slow = [node(n, decode=0.05) for n in ("a", "b", "c")]
    big = NodeProfile("big", True, 100_000, 1e-4, 1e-6, 0.0)
    cl = full_mesh([*slow, big], 1e9, 1e-3)
    eng = DecisionEngine(DecisionConfig(latency_max_ms=150.0))
    eng.observe_latency(500.0)
    d = eng.decide(0.0, cl, MODEL, WORK, plan_ab())
    assert d.kind == "resplit" and d.plan is not None and d.plan.node_ids == ("big",)


def test_lost_node_forces_decision_inside_cooldown() -> None:
    eng = DecisionEngine(DecisionConfig(cooldown_s=30.0, hysteresis=0.99))
    eng.decide(0.0, cluster(util_b=0.9), MODEL, WORK, plan_ab())  # starts the cool-down
    gone_b = full_mesh([node("a"), node("c")], 1e9, 1e-3)
    d = eng.decide(1.0, gone_b, MODEL, WORK, plan_ab())
    assert d.triggers[0].name == "lost_node"
    assert d.kind == "migrate" and d.plan is not None and d.plan.node_ids == ("a", "c")
    assert d.old_cost is None


def test_no_feasible_plan_is_infeasible_with_reason() -> None:
    lonely = full_mesh([node("a")], 1e9, 1e-3)  # a alone cannot hold the model
    d = DecisionEngine().decide(0.0, lonely, MODEL, WORK, plan_ab())
    assert d.kind == "infeasible" and d.plan is None and "no chain" in d.reason


def test_no_current_plan_plans_from_scratch() -> None:
    d = DecisionEngine().decide(0.0, cluster(), MODEL, WORK, None)
    assert d.kind == "resplit" and d.plan is not None and d.triggers[0].name == "no_plan"


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_config_rejects_bad_smoothing(alpha: float) -> None:
    with pytest.raises(ValueError):
        DecisionConfig(ewma_alpha=alpha)
