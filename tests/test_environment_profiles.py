"""Nodes that have not measured something yet borrow it from the nodes that have, scaled to their own speed."""

from __future__ import annotations

import pytest

from common.proto import splitmesh_pb2 as pb
from orchestrator.environment import DEFAULT_LAYER_DECODE_S, PREFILL_PER_TOKEN_FRACTION, cluster_state
from orchestrator.policy import Policy
from orchestrator.registry import NodeRecord


def node(node_id: str, decode_ms: float, prefill_ms: float) -> NodeRecord:
    capacity = pb.Capacity(layer_decode_ms=decode_ms, layer_prefill_ms_per_token=prefill_ms,
                           memory_available_bytes=8 << 30)
    return NodeRecord(node_id=node_id, address=f"{node_id}:1", trusted=True, model_digests=set(), capacity=capacity,
                      links=[])


def profiles(*records: NodeRecord) -> dict[str, tuple[float, float]]:
    state = cluster_state(list(records), Policy())
    return {n.node_id: (n.decode_s_per_layer, n.prefill_s_per_layer_token) for n in state.nodes}


def test_prefill_of_a_fresh_node_follows_the_measured_ratio() -> None:
    # edge and cloud prefilled at 1/15 of their decode cost per token; mec has only decoded.
    got = profiles(node("edge", 1.5, 0.1), node("cloud", 3.0, 0.2), node("mec", 1.2, 0.0))
    assert got["mec"][1] == pytest.approx(1.2e-3 / 15)
    assert got["edge"] == pytest.approx((1.5e-3, 0.1e-3))  # measured figures are kept as they are


def test_without_any_prefill_measurement_the_default_fraction_applies() -> None:
    got = profiles(node("a", 2.0, 0.0), node("b", 0.0, 0.0))
    assert got["a"][1] == pytest.approx(2e-3 * PREFILL_PER_TOKEN_FRACTION)
    assert got["b"] == pytest.approx((2e-3, 2e-3 * PREFILL_PER_TOKEN_FRACTION))  # decode borrowed first
    lone = profiles(node("c", 0.0, 0.0))
    assert lone["c"] == pytest.approx((DEFAULT_LAYER_DECODE_S, DEFAULT_LAYER_DECODE_S * PREFILL_PER_TOKEN_FRACTION))
