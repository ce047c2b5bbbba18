"""Why a hop to another node failed, as the gRPC status the session passes upstream or recovers from."""

from __future__ import annotations

import grpc


class HopError(Exception):
    """The next node failed or broke the protocol; carries the status to pass upstream."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def broken_hop_code(code: grpc.StatusCode) -> grpc.StatusCode:
    """No splitmesh node ends a stream with INTERNAL on purpose; gRPC's core reports it when the connection
    breaks mid-message (a reset link, a proxy that drops the stream). That is a broken hop, as retryable
    as UNAVAILABLE, not a bug of the request: the session replays on the next plan instead of failing."""
    return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.INTERNAL else code


def hop_failure(exc: grpc.aio.AioRpcError, peer: str) -> HopError:
    """What a failed call to the next node means for the session (see :func:`broken_hop_code`)."""
    code = exc.code()
    if code == grpc.StatusCode.INTERNAL:
        return HopError(broken_hop_code(code), f"{peer}: the stream broke ({exc.details()})")
    return HopError(code, f"{peer}: {exc.details()}")
