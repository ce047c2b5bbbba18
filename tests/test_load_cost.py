"""The cost model knows about load: batched decode is reported as the rows it ran, nodes fit a per-forward and a
per-row part, and plans are predicted at the measured sessions and rows per forward (throughput from the slowest
node or link), down to the ms/token and tok/s that `splitmesh resplit --dry-run` prints."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import cast

import pytest
import torch
from rich.console import Console

from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.spans import Span
from node_agent.decode_fit import DecodeFit
from node_agent.runtime import LiveStats
from node_agent.segment import SegmentRunner
from node_agent.step_batcher import StepBatcher, StepJob
from orchestrator.adaptation import Adapter
from orchestrator.config import OrchestratorConfig
from orchestrator.controller import Controller
from orchestrator.coordinator import Coordinator
from orchestrator.environment import cluster_state, current_load
from orchestrator.planning import (
    DecisionConfig,
    DecisionEngine,
    Plan,
    Problem,
    Workload,
    evaluate_plan,
    solve_resplit,
)
from orchestrator.planning.bruteforce import brute_force_resplit
from orchestrator.planning.profiles import ModelProfile, NodeProfile
from orchestrator.planning.synthetic import full_mesh, random_problem
from orchestrator.policy import Policy
from orchestrator.registry import NodeRecord
from splitmesh.tables import forecast_table
from tests.conftest import STORE


class _FakeRunner:
    """Just what run_one/run_batch call: a fixed compute time per forward, hidden states passed through."""

    def run_timed(self, cache: object, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, float]:
        return hidden, 0.004

    def run_batch_timed(self, caches: list[object], hidden: torch.Tensor,
                        positions: list[int]) -> tuple[torch.Tensor, float]:
        return hidden, 0.004


RUNNER = cast(SegmentRunner, _FakeRunner())  # one segment object: its decode rows may share a forward


def _job(rows: int, seen: list[tuple[int, bool]]) -> StepJob:
    return StepJob((RUNNER,), (object(),), torch.zeros(1, rows, 8), 5,  # type: ignore[arg-type]
                   on_done=lambda r, decode, _layers, _all: seen.append((r, decode)))


def test_a_batched_forward_reports_all_its_rows_as_decode() -> None:
    seen: list[tuple[int, bool]] = []
    jobs = [_job(1, seen) for _ in range(16)]
    StepBatcher(32).run_round(list(jobs))
    assert seen == [(16, True)]  # it said (1, ...): one row, so 16 rows' time read as one row's
    results = [j.future.result(timeout=0) for j in jobs]
    assert all(isinstance(r, torch.Tensor) and r.shape == (1, 1, 8) for r in results)


def test_a_lone_step_says_whether_it_is_decode_or_prompt() -> None:
    seen: list[tuple[int, bool]] = []
    StepBatcher(32).run_round([_job(1, seen)])
    StepBatcher(32).run_round([_job(7, seen)])
    assert seen == [(1, True), (7, False)]


def test_live_stats_fit_a_fixed_and_a_per_row_part() -> None:
    stats = LiveStats()
    for rows in (1, 4, 16, 1, 4, 16):  # per layer: 1.0 ms fixed + 0.2 ms a row
        stats.record_compute(10, rows, True, 10 * (1.0 + 0.2 * rows) / 1000.0)
    stats.record_compute(10, 100, False, 10 * 100 * 0.3 / 1000.0)
    cost = stats.decode_cost()
    assert cost.one_row_ms == pytest.approx(1.2) and cost.row_ms == pytest.approx(0.2)
    assert stats.prefill_layer_ms == pytest.approx(0.3)  # decode batches never enter the prefill cost
    assert 1.0 < cost.rows_mean < 16.0


def test_one_batch_size_splits_with_the_prefill_cost_per_token() -> None:
    fit = DecodeFit()
    fit.record(16, 4.0)
    cost = fit.cost(prior_row_ms=0.2)
    assert cost.row_ms == pytest.approx(0.2) and cost.one_row_ms == pytest.approx(4.0 - 15 * 0.2)
    assert DecodeFit().cost().one_row_ms == 0.0  # nothing measured: nothing claimed


MODEL = ModelProfile(num_layers=30, hidden_size=576, layer_bytes=10 << 20, embed_bytes=50 << 20,
                     head_bytes=50 << 20, kv_bytes_per_token_layer=1024, act_bytes=4)


def _two_nodes(slow_row_s: float) -> Problem:
    nodes = (NodeProfile("a", True, 8 << 30, 1e-3, 1e-4, decode_row_s_per_layer=1e-4),
             NodeProfile("b", True, 8 << 30, 2e-3, 2e-4, decode_row_s_per_layer=slow_row_s))
    return Problem(full_mesh(nodes, 1e9, 1e-3), MODEL, Workload(32, 64, 1024))


def test_a_plan_at_16_sessions_predicts_throughput_from_its_slowest_stage() -> None:
    problem = _two_nodes(slow_row_s=4e-4)
    plan = Plan.of([(Span(0, 10), "a"), (Span(10, 30), "b")])
    idle = evaluate_plan(problem, plan)
    assert idle.token_s == idle.decode_step_s and idle.tokens_per_s == pytest.approx(1 / idle.decode_step_s)
    loaded = Problem(problem.cluster, MODEL, Workload(32, 64, 1024, sessions=16, batch_rows=4))
    cost = evaluate_plan(loaded, plan)
    b = loaded.cluster.node("b")
    stage_b = (20 + MODEL.head_layer_equiv) * b.layer_s_at(4)
    assert cost.stage_decode_s[1] == pytest.approx(stage_b)
    assert cost.bottleneck == "b compute"
    assert cost.token_s == pytest.approx(4 * stage_b)  # 16 sessions in forwards of 4 rows: 4 forwards a token
    assert cost.tokens_per_s == pytest.approx(16 / (4 * stage_b))
    assert cost.token_s > cost.decode_step_s > idle.decode_step_s
    together = evaluate_plan(Problem(problem.cluster, MODEL, Workload(32, 64, 1024, sessions=16)), plan)
    assert together.bottleneck == "round trip"  # one forward of 16 rows: stages wait on each other
    assert together.tokens_per_s == pytest.approx(16 / together.decode_step_s)


def test_the_solver_under_load_is_near_brute_force() -> None:
    """Phi is no longer additive under load: the bottleneck caps find brute force's optimum on most small
    instances and come within a few percent on the rest (8 of 204 missed, at most 3%, in the README's run)."""
    rng = random.Random(13)
    ratios = []
    for _ in range(40):
        base = random_problem(rng, num_layers=rng.choice([4, 5, 6]), num_nodes=rng.choice([3, 4]), trusted=3)
        workload = Workload(512, 128, 4096, sessions=rng.choice([4, 16, 64]), batch_rows=rng.choice([1, 2, 4, 8]))
        problem = Problem(base.cluster, base.model, workload)
        dp, brute = solve_resplit(problem), brute_force_resplit(problem)
        assert (dp.cost is None) == (brute.cost is None)
        if dp.cost is not None and brute.cost is not None:
            ratios.append(dp.cost.phi / brute.cost.phi)
    assert len(ratios) >= 10 and min(ratios) >= 1 - 1e-9
    assert max(ratios) < 1.05 and sum(r < 1 + 1e-9 for r in ratios) >= 0.9 * len(ratios)


def test_load_moves_the_best_split_toward_cheap_rows() -> None:
    """Node b has a fast one-row step but an expensive row: alone it wins the big span; at 32 sessions it loses it."""
    nodes = (NodeProfile("a", True, 8 << 30, 2e-3, 1e-4, decode_row_s_per_layer=2e-5),
             NodeProfile("b", True, 8 << 30, 1e-3, 1e-4, decode_row_s_per_layer=5e-4))
    cluster = full_mesh(nodes, 1e9, 1e-4)

    def b_layers(workload: Workload) -> int:
        plan = solve_resplit(Problem(cluster, MODEL, workload)).plan
        assert plan is not None
        return sum(len(s.span) for s in plan.segments if s.node_id == "b")

    assert b_layers(Workload(32, 64, 1024)) > b_layers(Workload(32, 64, 1024, sessions=32))


def test_under_load_the_adaptive_loop_splits_what_one_session_keeps_whole() -> None:
    """Two equal nodes: one session is fastest on one box (no hop); 16 sessions in forwards of 4 rows are
    bound by that box's compute, and a split halves it."""
    nodes = (NodeProfile("a", True, 8 << 30, 1e-3, 1e-4, decode_row_s_per_layer=1e-4),
             NodeProfile("b", True, 8 << 30, 1e-3, 1e-4, decode_row_s_per_layer=1e-4))
    cluster = full_mesh(nodes, 1e9, 1e-3)
    whole = Plan.of([(Span(0, 30), "a")])
    for sessions, kinds in ((1, {"keep"}), (16, {"migrate", "resplit"})):
        engine = DecisionEngine(DecisionConfig(latency_max_ms=1.0))
        engine.observe_latency(500.0)  # the latency trigger fires
        load = Workload(32, 64, 1024, sessions=sessions, batch_rows=4)
        decision = engine.decide(0.0, cluster, MODEL, load, whole)
        assert decision.kind in kinds, decision.reason
        if sessions > 1:
            assert decision.plan is not None and set(decision.plan.node_ids) == {"a", "b"}
            assert decision.old_cost is not None and decision.new_cost is not None
            assert decision.new_cost.tokens_per_s > 1.5 * decision.old_cost.tokens_per_s


def _record(node_id: str, sessions: int, rows: float, row_ms: float) -> NodeRecord:
    return NodeRecord(node_id=node_id, address=f"{node_id}:1", trusted=True, model_digests=set(),
                      capacity=pb.Capacity(memory_available_bytes=8 << 30, layer_decode_ms=1.0,
                                           layer_prefill_ms_per_token=0.3, layer_decode_row_ms=row_ms,
                                           decode_rows_mean=rows), active_sessions=sessions)


def test_the_environment_reads_the_load_and_the_per_row_cost() -> None:
    nodes = [_record("a", 16, 5.5, 0.1), _record("b", 12, 4.0, 0.0)]
    load = current_load(nodes, Workload(32, 64, 1024))
    assert (load.sessions, load.rows) == (16, 5.5) and load.forwards == pytest.approx(16 / 5.5)
    cluster = cluster_state(nodes, Policy())
    assert cluster.node("a").row_s_per_layer == pytest.approx(1e-4)
    assert cluster.node("b").row_s_per_layer == pytest.approx(3e-4)  # unmeasured: the prefill cost per token
    assert current_load([], Workload(32, 64, 1024)).sessions == 1


def _loaded_controller(tmp_path: Path) -> Controller:
    co = Coordinator(OrchestratorConfig(state_dir=str(tmp_path), store=str(STORE), trusted_nodes=["node-0", "node-1"]))
    for node_id in ("node-0", "node-1"):
        co.registry.register(pb.RegisterRequest(node_id=node_id, address="127.0.0.1:1", capacity=pb.Capacity(
            memory_available_bytes=16 << 30, layer_decode_ms=1.0)))
        co.registry.report(pb.NodeReport(node_id=node_id, active_sessions=16, capacity=pb.Capacity(
            memory_available_bytes=16 << 30, layer_decode_ms=1.0, layer_prefill_ms_per_token=0.2,
            layer_decode_row_ms=0.1, decode_rows_mean=4.0)))
    co.view = PlanView.parse(co.build_plan(Plan.of([(Span(0, co.model.num_layers), "node-0")]), 1))
    return Controller(co, Adapter(co, Policy()))


def test_dry_run_predicts_ms_per_token_and_tokens_per_s_at_the_load(tmp_path: Path) -> None:
    controller = _loaded_controller(tmp_path)
    reply = asyncio.run(controller.resplit([], [], True))
    assert not reply.committed and reply.load_sessions == 16 and reply.load_batch_rows == 4.0
    assert reply.predicted_ms_old > 0 and reply.predicted_ms_new > 0
    assert reply.predicted_tokens_per_s_old == pytest.approx(16_000 / reply.predicted_ms_old)
    assert reply.predicted_tokens_per_s_new >= reply.predicted_tokens_per_s_old  # two nodes beat one at load
    assert reply.bottleneck_old == "node-0 compute"
    console = Console(width=80, record=True)
    console.print(forecast_table(reply))
    out = console.export_text()
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out
    assert "ms/token" in out and "tok/s" in out and "16 sessions" in out
    current = next(line.split() for line in out.splitlines() if line.split()[:1] == ["current"])
    assert current[1] == f"{reply.predicted_ms_old:.2f}" and current[2] == f"{reply.predicted_tokens_per_s_old:.1f}"
    asyncio.run(controller.co.close())
