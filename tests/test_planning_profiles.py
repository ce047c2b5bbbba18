"""Model shapes from HF configs and the cost model's arithmetic, checked against hand computation."""

from __future__ import annotations

import math

import pytest

from common.spans import Span
from orchestrator.planning import (
    ClusterState,
    CostWeights,
    LinkProfile,
    ModelProfile,
    NodeProfile,
    Plan,
    Problem,
    Workload,
    evaluate_plan,
    plan_violations,
)

LLAMA3_8B = {
    "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
}
SMOLLM2_135M = {
    "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
}


def test_llama3_8b_shapes() -> None:
    m = ModelProfile.from_config_dict(LLAMA3_8B, dtype_bytes=2)
    assert m.layer_bytes == 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
    assert m.kv_bytes_per_token_layer == 2 * 8 * 128 * 2
    total_params = (m.num_layers * m.layer_bytes + m.embed_bytes + m.head_bytes) / 2
    assert 8.02e9 < total_params < 8.04e9  # Llama-3-8B has 8.03B parameters


def test_smollm2_shapes_tied() -> None:
    m = ModelProfile.from_config_dict(SMOLLM2_135M, dtype_bytes=4)
    assert m.layer_bytes == 4 * 3_540_096
    assert m.embed_bytes == 4 * 49152 * 576
    assert m.head_bytes == m.embed_bytes + 4 * 576  # tied: lm_head is the embedding again, plus the norm
    unique = (30 * m.layer_bytes + m.embed_bytes + 4 * 576) / 4
    assert 134.0e6 < unique < 135.0e6  # SmolLM2-135M: 134.5M parameters
    assert m.kv_bytes_per_token_layer == 2 * 3 * 64 * 4


def _two_nodes(util_b: float = 0.0) -> Problem:
    a = NodeProfile("a", True, 10_000, decode_s_per_layer=0.01, prefill_s_per_layer_token=0.001)
    b = NodeProfile("b", True, 10_000, decode_s_per_layer=0.02, prefill_s_per_layer_token=0.002,
                    utilisation=util_b)
    links = {("a", "b"): LinkProfile(8_000.0, 0.1), ("b", "a"): LinkProfile(16_000.0, 0.2)}
    model = ModelProfile(num_layers=4, hidden_size=10, layer_bytes=100, embed_bytes=0, head_bytes=0,
                         kv_bytes_per_token_layer=1, act_bytes=2, token_msg_bytes=8)
    return Problem(ClusterState((a, b), links), model, Workload(prompt_tokens=5, decode_tokens=3, kv_budget_tokens=10),
                   CostWeights(alpha=1.0, beta=0.0, gamma=0.0))


def test_cost_by_hand_includes_ring_return() -> None:
    p = _two_nodes()
    plan = Plan.of([(Span(0, 2), "a"), (Span(2, 4), "b")])
    c = evaluate_plan(p, plan)
    ring = 8 * 8 / 16_000 + 0.2  # token id back from b to a
    step = 2 * 0.01 + 2 * 0.02 + (10 * 2 * 8 / 8_000 + 0.1) + ring
    prefill = 2 * 5 * 0.001 + 2 * 5 * 0.002 + (5 * 10 * 2 * 8 / 8_000 + 0.1) + ring
    assert math.isclose(c.decode_step_s, step)
    assert math.isclose(c.prefill_s, prefill)
    assert math.isclose(c.request_s, prefill + 2 * step)
    assert math.isclose(c.phi, c.request_s)


def test_utilisation_inflates_compute_by_fair_share() -> None:
    idle = evaluate_plan(_two_nodes(0.0), Plan.of([(Span(0, 4), "b")]))
    busy = evaluate_plan(_two_nodes(0.5), Plan.of([(Span(0, 4), "b")]))
    saturated = evaluate_plan(_two_nodes(1.0), Plan.of([(Span(0, 4), "b")]))
    assert math.isclose(busy.decode_step_s, 1.5 * idle.decode_step_s)
    assert math.isclose(saturated.decode_step_s, 2 * idle.decode_step_s)  # half the CPU, not none of it


def test_violations_memory_sum_head_and_tail() -> None:
    p = _two_nodes()
    small = NodeProfile("a", True, 3 * 110, 0.01, 0.001)  # room for three layers with their KV
    q = Problem(ClusterState((small, p.cluster.nodes[1]), p.cluster.links), p.model, p.workload, p.weights)
    ok = Plan.of([(Span(0, 2), "a"), (Span(2, 3), "b"), (Span(3, 4), "a")])
    assert plan_violations(q, ok) == []
    four_on_a = Plan.of([(Span(0, 3), "a"), (Span(3, 4), "b"), (Span(3, 4), "a")])
    assert plan_violations(q, four_on_a)
    tight = NodeProfile("a", True, 2 * 110, 0.01, 0.001)
    r = Problem(ClusterState((tight, p.cluster.nodes[1]), p.cluster.links), p.model, p.workload, p.weights)
    assert any("needs 330 bytes" in v for v in plan_violations(r, ok))


@pytest.mark.parametrize("bad", [
    Plan.of([(Span(0, 2), "a"), (Span(3, 4), "b")]),
    Plan.of([(Span(0, 2), "a"), (Span(2, 4), "a")]),
    Plan.of([(Span(0, 4), "ghost")]),
])
def test_violations_shape(bad: Plan) -> None:
    assert plan_violations(_two_nodes(), bad)


def test_profile_follows_the_weight_dtype() -> None:
    """Weights, KV and bytes per hop per token as each store dtype holds and sends them."""
    from orchestrator.planning.costs import hop_costs

    fp32, bf16, int8 = (ModelProfile.from_config_dict(SMOLLM2_135M, weight_dtype=d)
                        for d in ("float32", "bfloat16", "int8"))
    assert bf16 == ModelProfile.from_config_dict(SMOLLM2_135M, dtype_bytes=2)
    assert 2 * bf16.layer_bytes == fp32.layer_bytes and 2 * bf16.embed_bytes == fp32.embed_bytes
    rows = 9 * 64 + 2 * 3 * 64 + 576 + 2 * 1536 + 576  # q, k, v, o, gate, up, down output rows
    assert int8.layer_bytes == (3_540_096 - 2 * 576) + 2 * rows + 2 * 2 * 576  # 1 B/weight, bf16 scales and norms
    assert int8.embed_bytes == 49152 * 576 + 2 * 49152
    assert (fp32.act_bytes, bf16.act_bytes, int8.act_bytes) == (4, 2, 2)
    assert int8.kv_bytes_per_token_layer == bf16.kv_bytes_per_token_layer == 2 * 3 * 64 * 2
    link = LinkProfile(bandwidth_bps=8e6, rtt_s=0.0)  # 1 MB/s: seconds = bytes / 1e6
    problem = _two_nodes()
    for model, per_token in ((fp32, 576 * 4), (bf16, 576 * 2), (int8, 576 * 2)):
        _, decode = hop_costs(Problem(problem.cluster, model, problem.workload), link)
        assert decode == pytest.approx(per_token / 1e6)


def test_int8_profile_matches_the_store_files(dtype_store: object) -> None:
    from common.model_store import ModelStore, layer_role

    assert isinstance(dtype_store, ModelStore)
    for dtype in ("bfloat16", "int8"):
        model = dtype_store.open(f"smollm2-135m-instruct-{dtype}")
        profile = ModelProfile.from_config_dict(model.manifest.config, weight_dtype=model.manifest.dtype)
        stored = model.manifest.files[layer_role(0)].size
        assert 0 <= stored - profile.layer_bytes < 4096  # the safetensors header alone
