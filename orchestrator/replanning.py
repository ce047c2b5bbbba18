"""Choosing a whole new plan: the exact solver first, the static placement when it finds nothing."""

from __future__ import annotations

import dataclasses
import logging
import time

from orchestrator.adaptation import Adapter
from orchestrator.planning import Plan, solve_resplit
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


def best_plan(adapter: Adapter, keep_head: str | None = None) -> tuple[Plan, str]:
    """A plan for the schedulable nodes and a one-line account of how it was chosen.

    With ``keep_head`` the first segment stays on that node when any plan allows it: in-flight
    sessions live at their head (token history, tokenizer), so a recovery that moved the head would
    fail them all. Raises PlacementError with the solver's reason when neither the solver nor the
    static placement finds a plan (the solver's reason is the more specific, e.g. "no live trusted
    node for the first segment").
    """
    problem = adapter.problem(head=keep_head)
    result = solve_resplit(problem)
    if result.plan is None and keep_head is not None:
        log.warning("no plan keeps %s as the head (%s); the sessions it heads cannot move", keep_head, result.reason)
        result = solve_resplit(dataclasses.replace(problem, head=None))
    if result.plan is not None:
        return result.plan, f"solver: {result.plan}"
    _no_solution.warning(f"solver found no feasible plan ({result.reason}); falling back to the static placement")
    try:
        plan = place(adapter.schedulable(), adapter.co.model.num_layers,
                     rule=adapter.policy.trust_rule())
    except PlacementError as exc:
        log.debug("static placement failed too: %s", exc)
        raise PlacementError(result.reason) from exc
    return plan, f"static placement ({result.reason})"
