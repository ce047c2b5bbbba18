"""The solvers against brute force, against the constraints, and on clusters with obvious answers."""

from __future__ import annotations

import math
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.spans import Span, spans_from_boundaries
from orchestrator.planning import (
    ClusterState,
    CostWeights,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    PrivacyPolicy,
    Problem,
    Workload,
    plan_violations,
    solve_migration,
    solve_resplit,
)
from orchestrator.planning.bruteforce import brute_force_migration, brute_force_resplit, chains
from orchestrator.planning.synthetic import full_mesh, random_problem

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw: st.DrawFn, max_layers: int = 8, max_nodes: int = 4) -> Problem:
    """Small random instances where memory, links, trust and utilisation all bind sometimes."""
    n_layers = draw(st.integers(1, max_layers))
    n_nodes = draw(st.integers(1, max_nodes))
    model = ModelProfile(n_layers, 64, 100, draw(st.sampled_from([0, 60, 250])), draw(st.sampled_from([0, 60, 250])),
                         draw(st.integers(0, 2)), 2)
    nodes = tuple(
        NodeProfile(f"n{i}", draw(st.booleans()), draw(st.integers(0, 1300)),
                    draw(st.floats(1e-3, 1e-2)), draw(st.floats(1e-5, 1e-4)), draw(st.sampled_from([0.0, 0.5, 0.95])))
        for i in range(n_nodes)
    )
    links = {}
    for a in nodes:
        for b in nodes:
            if a is not b and draw(st.integers(0, 4)) > 0:
                links[(a.node_id, b.node_id)] = LinkProfile(draw(st.floats(1e5, 1e9)), draw(st.floats(0, 0.03)))
    weights = CostWeights(draw(st.floats(0.1, 2)), draw(st.sampled_from([0.0, 0.5, 5.0])), draw(st.floats(0, 2)),
                          draw(st.booleans()))
    extra = frozenset(draw(st.sets(st.integers(0, n_layers - 1), max_size=2)))
    workload = Workload(draw(st.integers(1, 64)), draw(st.integers(1, 16)), draw(st.integers(0, 50)))
    return Problem(ClusterState(nodes, links), model, workload, weights, PrivacyPolicy(extra))


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _in_space(problem: Problem, node_ids: tuple[str, ...]) -> bool:
    return node_ids in set(chains([n.node_id for n in problem.cluster.nodes]))


@FAST
@given(problems())
def test_resplit_equals_brute_force(problem: Problem) -> None:
    got, want = solve_resplit(problem), brute_force_resplit(problem)
    assert got.feasible == want.feasible, (got.reason, want.plan)
    if got.plan is not None and got.cost is not None and want.cost is not None:
        assert _same(got.cost.phi, want.cost.phi), (str(got.plan), str(want.plan))
        assert plan_violations(problem, got.plan) == []
        assert _in_space(problem, got.plan.node_ids)


@FAST
@given(problems(), st.randoms(use_true_random=False))
def test_migration_equals_brute_force(problem: Problem, rnd: random.Random) -> None:
    n = problem.model.num_layers
    cuts = sorted(rnd.sample(range(1, n), rnd.randint(0, n - 1))) if n > 1 else []
    spans = spans_from_boundaries([0, *cuts, n])
    got, want = solve_migration(problem, spans), brute_force_migration(problem, spans)
    assert got.feasible == want.feasible, (got.reason, want.plan)
    if got.plan is not None and got.cost is not None and want.cost is not None:
        assert got.plan.spans == tuple(spans)
        assert _same(got.cost.phi, want.cost.phi), (str(got.plan), str(want.plan))


def _check_constraints(problem: Problem) -> bool:
    result = solve_resplit(problem)
    if result.plan is None:
        assert result.reason and result.reason != "optimal"
        return False
    assert plan_violations(problem, result.plan) == []
    if problem.weights.privacy_hard:
        assert result.cost is not None and result.cost.privacy == 0
    return True


@settings(max_examples=400, deadline=None)
@given(problems(max_layers=24, max_nodes=8))
def test_never_violates_constraints(problem: Problem) -> None:
    _check_constraints(problem)


def test_never_violates_constraints_on_1500_seeded_clusters() -> None:
    rng = random.Random(20240601)
    feasible = 0
    for _ in range(1500):
        problem = random_problem(rng, rng.randint(2, 16), rng.randint(1, 8), rng.randint(0, 3))
        feasible += _check_constraints(problem)
    assert 300 < feasible < 1500  # the instances are neither all trivial nor all impossible


# ---- hand-built clusters with obvious answers ----

MODEL = ModelProfile(num_layers=8, hidden_size=4096, layer_bytes=1000, embed_bytes=500, head_bytes=500,
                     kv_bytes_per_token_layer=1, act_bytes=2)
WORK = Workload(prompt_tokens=128, decode_tokens=32, kv_budget_tokens=100)


def node(name: str, trusted: bool = True, memory: int = 100_000, decode: float = 1e-3,
         util: float = 0.0) -> NodeProfile:
    return NodeProfile(name, trusted, memory, decode, decode / 50, util)


def test_slow_link_is_avoided() -> None:
    # a cannot hold the model alone; b and c are equal, but a->b crawls at 1 Mbit/s.
    a, b, c = node("a", memory=5000), node("b", memory=5000), node("c", memory=5000)
    cluster = full_mesh([a, b, c], 1e9, 1e-3)
    links = dict(cluster.links)
    links[("a", "b")] = LinkProfile(1e6, 1e-3)
    result = solve_resplit(Problem(ClusterState(cluster.nodes, links), MODEL, WORK))
    assert result.plan is not None
    assert ("a", "b") not in result.plan.hops()


def test_fast_untrusted_node_never_gets_the_ends() -> None:
    home = node("home", decode=5e-3)
    cloud = node("cloud", trusted=False, decode=1e-4)
    cluster = full_mesh([home, cloud], 10e9, 1e-4)
    result = solve_resplit(Problem(cluster, MODEL, WORK))
    assert result.plan is not None
    assert result.plan.head == "home" and result.plan.tail == "home"
    assert "cloud" in result.plan.node_ids  # the middle still goes to the fast node
    soft = solve_resplit(Problem(cluster, MODEL, WORK, CostWeights(gamma=0.0, privacy_hard=False)))
    assert soft.plan is not None and soft.plan.node_ids == ("cloud",)  # free to leak, it takes everything


def test_extra_critical_layers_stay_trusted() -> None:
    home, cloud = node("home", decode=5e-3), node("cloud", trusted=False, decode=1e-4)
    problem = Problem(full_mesh([home, cloud], 10e9, 1e-4), MODEL, WORK, privacy=PrivacyPolicy(frozenset({4})))
    result = solve_resplit(problem)
    assert result.plan is not None
    assert all(seg.node_id == "home" for seg in result.plan.segments if 4 in seg.span)


def test_small_node_never_hosts_too_much() -> None:
    # "tiny" is 10x faster but holds two layers (with their KV) and nothing else.
    home, tiny = node("home", decode=5e-3), node("tiny", decode=5e-4, memory=2 * 1100)
    result = solve_resplit(Problem(full_mesh([home, tiny], 10e9, 1e-4), MODEL, WORK))
    assert result.plan is not None
    hosted = sum(len(s.span) for s in result.plan.segments if s.node_id == "tiny")
    assert hosted == 2


def test_busy_node_is_avoided() -> None:
    a, b = node("a", memory=5000), node("b", memory=5000)
    c = node("c", memory=5000, util=0.95)
    result = solve_resplit(Problem(full_mesh([a, b, c], 1e9, 1e-3), MODEL, WORK))
    assert result.plan is not None and "c" not in result.plan.node_ids


def test_infeasible_reasons_are_specific() -> None:
    cloud = node("cloud", trusted=False)
    r = solve_resplit(Problem(full_mesh([cloud], 1e9, 1e-3), MODEL, WORK))
    assert not r.feasible and r.reason == "no live trusted node for the first segment"
    tiny = node("t", memory=100)
    r = solve_resplit(Problem(full_mesh([tiny], 1e9, 1e-3), MODEL, WORK))
    assert not r.feasible and "no trusted node can hold the first segment" in r.reason
    split = [node("a", memory=5000), node("b", memory=5000)]
    r = solve_resplit(Problem(ClusterState(tuple(split), {}), MODEL, WORK))
    assert not r.feasible and "no chain of linked nodes" in r.reason
    r = solve_migration(Problem(full_mesh([cloud, node("h", memory=2000)], 1e9, 1e-3), MODEL, WORK),
                        [Span(0, 4), Span(4, 8)])
    assert not r.feasible and "segment [0,4)" in r.reason


def test_migration_keeps_boundaries_and_moves_off_lost_capacity() -> None:
    a, b, c = node("a", memory=5000), node("b", memory=5000, util=0.9), node("c", memory=5000)
    spans = [Span(0, 4), Span(4, 8)]
    r = solve_migration(Problem(full_mesh([a, b, c], 1e9, 1e-3), MODEL, WORK), spans)
    assert r.plan is not None and r.plan.spans == tuple(spans) and "b" not in r.plan.node_ids


def test_pinned_head_keeps_the_first_segment() -> None:
    # "fast" would head the best plan; a recovery pins the live head instead, and gets the best plan with it.
    fast, slow = node("fast", decode=1e-4), node("slow", decode=5e-3)
    cluster = full_mesh([fast, slow, node("m", trusted=False)], 1e9, 1e-3)
    free = solve_resplit(Problem(cluster, MODEL, WORK))
    assert free.plan is not None and free.plan.segments[0].node_id == "fast"
    pinned = solve_resplit(Problem(cluster, MODEL, WORK, head="slow"))
    assert pinned.plan is not None and pinned.plan.segments[0].node_id == "slow"
    assert not plan_violations(Problem(cluster, MODEL, WORK), pinned.plan)
    cloud_head = solve_resplit(Problem(cluster, MODEL, WORK, head="m"))  # untrusted: may not hold layer 0
    assert not cloud_head.feasible and "first segment" in cloud_head.reason
