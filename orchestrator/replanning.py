"""Choosing a whole new plan: the exact solver first, the static placement when it finds nothing; and
replacing a plan that lost a node or a link."""

from __future__ import annotations

import dataclasses
import logging
import time

from common.spans import Span
from orchestrator.adaptation import Adapter
from orchestrator.planning import solve_resplit
from orchestrator.planning.profiles import Problem
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger(__name__)

REPEAT_LOG_S = 30.0  # an unchanged "no feasible plan" is logged again at most this often


class _Throttled:
    """Logs a recurring warning when its text changes, or again after ``every_s``; otherwise at DEBUG."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = ""
        self._at = float("-inf")

    def warning(self, message: str) -> None:
        now = time.monotonic()
        if message != self._last or now - self._at >= self.every_s:
            log.warning("%s", message)
            self._last, self._at = message, now
        else:
            log.debug("%s", message)


_no_solution = _Throttled(REPEAT_LOG_S)


def best_plan(adapter: Adapter, keep_head: str | None = None) -> tuple[list[tuple[Span, str]], str]:
    """Segments for the schedulable nodes and a one-line account of how they were chosen.

    With ``keep_head`` the first segment stays on that node when any plan allows it: in-flight
    sessions live at their head (token history, tokenizer), so a recovery that moved the head would
    fail them all. Raises PlacementError with the solver's reason when neither the solver nor the
    static placement finds a plan (the solver's reason is the more specific, e.g. "no live trusted
    node for the first segment").
    """
    policy = adapter.policy
    problem = Problem(adapter.cluster(), adapter.model, policy.workload(), policy.decision.weights,
                      policy.decision.privacy, head=keep_head)
    result = solve_resplit(problem)
    if result.plan is None and keep_head is not None:
        log.warning("no plan keeps %s as the head (%s); the sessions it heads cannot move", keep_head, result.reason)
        result = solve_resplit(dataclasses.replace(problem, head=None))
    if result.plan is not None:
        return [(s.span, s.node_id) for s in result.plan.segments], f"solver: {result.plan}"
    _no_solution.warning(f"solver found no feasible plan ({result.reason}); falling back to the static placement")
    nodes = [r for r in adapter.co.registry.alive_nodes() if r.node_id not in adapter.drained]
    try:
        return place(nodes, adapter.co.model.num_layers), f"static placement ({result.reason})"
    except PlacementError as exc:
        log.debug("static placement failed too: %s", exc)
        raise PlacementError(result.reason) from exc


async def replace_plan(adapter: Adapter, kind: str, why: str) -> bool:
    """Install the best plan for what is left after a loss (``kind`` "node-lost" or "link-lost").

    When there is none, the reason is kept in ``Coordinator.no_plan_reason`` (clients asking for a
    route get UNAVAILABLE with it) and recorded once per distinct reason; the control loop calls
    again every tick, so service resumes by itself as soon as a feasible plan exists again.
    """
    co = adapter.co
    epoch = co.view.epoch if co.view else 0
    head = co.view.head.node_id if co.view is not None else None
    try:
        segments, how = best_plan(adapter, None if head is None or co.registry.lost(head) else head)
        if co.down_hops(segments):  # the static fallback knows nothing of links
            raise PlacementError("every placement found crosses a link reported down")
    except PlacementError as exc:
        if str(exc) != co.no_plan_reason:
            log.warning("%s; no feasible plan: %s", why, exc)
            adapter.record(kind, f"{why}; no feasible plan: {exc}", None, epoch, 0)
        co.no_plan_reason = str(exc)
        return False
    committed, reason, plan = await co.install(segments)
    adapter.record(kind, f"{why}; {how}: {reason}", None, epoch, plan.epoch if committed and plan else 0)
    return committed
