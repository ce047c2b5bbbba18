"""A hop that breaks in gRPC's core counts as a lost hop (replayed on the next plan), not as a failed request."""

from __future__ import annotations

import grpc
import pytest

from node_agent.hops import hop_failure
from node_agent.ring_session import RECOVERABLE


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def test_core_internal_error_is_a_broken_hop() -> None:
    error = hop_failure(rpc_error(grpc.StatusCode.INTERNAL, "Internal error from Core"), "node-1")
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.code in RECOVERABLE
    assert "node-1" in error.details and "Internal error from Core" in error.details


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE])
def test_other_statuses_pass_through(code: grpc.StatusCode) -> None:
    error = hop_failure(rpc_error(code, "why"), "node-2")
    assert error.code == code
    assert error.details == "node-2: why"
