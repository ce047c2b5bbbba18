"""What a node may claim about itself: every figure of a registration or report is checked where it arrives.

A NaN or negative layer cost once reached the cost model, raised inside the control loop and stopped it.
Figures outside these bounds are refused (INVALID_ARGUMENT) before anything is stored, so the planner only
ever sees finite, non-negative, physically possible values. The bounds are generous on purpose: they catch
nonsense, not slow boxes.
"""

from __future__ import annotations

import math

from common.certs import validate_node_id
from common.proto import splitmesh_pb2 as pb

MAX_LAYER_MS = 60_000.0  # one decoder layer for one token taking a minute is no working box
MAX_DECODE_ROWS = 1 << 20  # sessions open, or decode rows in one forward: more than any node admits
MAX_BANDWIDTH_BPS = 1e13  # 10 Tbit/s, beyond any link a node can have
MAX_RTT_MS = 600_000.0  # ten minutes
MAX_TOKEN_LATENCY_MS = 3_600_000.0  # an hour per token
MAX_LINKS = 4096  # peers one report may describe
MAX_GPUS = 64
MAX_ADDRESS_CHARS = 512
DOWN_RTT_MS = -1.0  # what a node reports as the RTT of a link whose probe failed (bandwidth 0)


def _bounded(name: str, value: float, low: float, high: float) -> str | None:
    if not math.isfinite(value):
        return f"{name} is {value}, not a finite number"
    if not low <= value <= high:
        return f"{name} = {value:g} is outside [{low:g}, {high:g}]"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


def capacity_problem(cap: pb.Capacity) -> str | None:
    """Why a capacity cannot be true (None when it can)."""
    problem = _first(_bounded("cpu_utilisation", cap.cpu_utilisation, 0.0, 1.0),
                     _bounded("layer_decode_ms", cap.layer_decode_ms, 0.0, MAX_LAYER_MS),
                     _bounded("layer_prefill_ms_per_token", cap.layer_prefill_ms_per_token, 0.0, MAX_LAYER_MS),
                     _bounded("layer_decode_row_ms", cap.layer_decode_row_ms, 0.0, MAX_LAYER_MS),
                     _bounded("decode_rows_mean", cap.decode_rows_mean, 0.0, MAX_DECODE_ROWS))
    if problem is not None:
        return problem
    if cap.memory_available_bytes > cap.memory_total_bytes:
        return (f"memory_available_bytes {cap.memory_available_bytes} exceeds memory_total_bytes "
                f"{cap.memory_total_bytes}")
    if len(cap.gpus) > MAX_GPUS:
        return f"{len(cap.gpus)} GPUs reported, more than {MAX_GPUS}"
    for gpu in cap.gpus:
        problem = _bounded(f"gpus[{gpu.index}].utilisation", gpu.utilisation, 0.0, 1.0)
        if problem is not None:
            return problem
        if gpu.memory_used_bytes > gpu.memory_total_bytes:
            return f"gpus[{gpu.index}] uses more memory than it has"
    return None


def link_problem(link: pb.LinkStatus) -> str | None:
    name = f"link to {link.peer_id!r}"
    try:
        validate_node_id(link.peer_id)
    except ValueError as exc:
        return f"{name}: {exc}"
    problem = _bounded(f"{name} bandwidth_bps", link.bandwidth_bps, 0.0, MAX_BANDWIDTH_BPS)
    if problem is not None:
        return problem
    if link.bandwidth_bps == 0 and link.rtt_ms == DOWN_RTT_MS:
        return None  # a link reported down
    return _bounded(f"{name} rtt_ms", link.rtt_ms, 0.0, MAX_RTT_MS)


def report_problem(report: pb.NodeReport) -> str | None:
    """Why a capacity report cannot be true (None when it can); the node id itself is checked by the caller."""
    if not report.HasField("capacity"):
        return "a report needs a capacity"
    problem = _first(capacity_problem(report.capacity),
                     _bounded("token_latency_ms", report.token_latency_ms, 0.0, MAX_TOKEN_LATENCY_MS),
                     _bounded("active_sessions", report.active_sessions, 0, MAX_DECODE_ROWS))  # the planner's load
    if problem is not None:
        return problem
    if len(report.links) > MAX_LINKS:
        return f"{len(report.links)} links reported, more than {MAX_LINKS}"
    return _first(*(link_problem(link) for link in report.links))


def registration_problem(request: pb.RegisterRequest) -> str | None:
    """Why a registration is malformed (None when it is well formed)."""
    try:
        validate_node_id(request.node_id)
    except ValueError as exc:
        return str(exc)
    if not request.address or len(request.address) > MAX_ADDRESS_CHARS:
        return f"address must be 1-{MAX_ADDRESS_CHARS} characters"
    if len(request.x25519_public_key) not in (0, 32):
        return f"x25519_public_key must be 32 bytes, got {len(request.x25519_public_key)}"
    return capacity_problem(request.capacity)
