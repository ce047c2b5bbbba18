"""The one owner of the plan state machine: it runs the control loop, installs every plan and records every
change (adaptive decisions, recoveries and operator actions alike). The gRPC servicers only translate.

The loop cannot die quietly: an exception in a tick is logged with its traceback, counted
(``splitmesh_control_tick_errors_total``) and the next tick runs. :meth:`Controller.health` is what the
gRPC health service reports: NOT_SERVING when the loop task has ended, when the last ``FAILED_TICKS`` ticks
all failed, or when no tick has finished for longer than an install may take.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence

import grpc
from prometheus_client import Counter

from common.proto import splitmesh_pb2 as pb
from orchestrator.adaptation import Adapter
from orchestrator.coordinator import Coordinator
from orchestrator.forecast import resplit_forecast
from orchestrator.planning import ClusterState, Decision, Plan
from orchestrator.replanning import best_plan
from orchestrator.static_placement import PlacementError, place

log = logging.getLogger(__name__)

DECISIONS = Counter("splitmesh_decisions_total", "Decisions of the adaptive loop and operator actions", ["kind"])
TICK_ERRORS = Counter("splitmesh_control_tick_errors_total", "Control-loop ticks that raised (logged with traceback)")
FAILED_TICKS = 10  # this many failed ticks in a row, or this many periods without a finished tick: NOT_SERVING
COMMIT_TIMEOUT_S = 10.0  # what Coordinator allows each node's COMMIT
REPEAT_RECORD_S = 60.0  # a "keep" with the same triggers on the same plan is recorded at most this often


class ControlError(Exception):
    """An operator request the controller refuses; ``code`` is the gRPC status the servicer returns."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Controller:
    def __init__(self, co: Coordinator, adapter: Adapter) -> None:
        self.co = co
        self.adapter = adapter
        self.stale_nodes: set[str] = set()  # plan nodes that came back without the committed plan
        self.tick_errors = 0
        self.failed_in_a_row = 0
        self.last_error = ""
        self.last_tick_done = time.monotonic()
        self._next_decision = 0.0
        self._last_problem = ""
        self._repeat: tuple[object, float, int] | None = None  # (key, when last recorded, repeats not recorded)
        self._task: asyncio.Task[None] | None = None

    @property
    def period_s(self) -> float:
        return min(0.5, self.adapter.policy.interval_s / 2)

    # -- the loop ----------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="control-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.tick()
            except Exception as exc:
                self.tick_errors += 1
                self.failed_in_a_row += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                TICK_ERRORS.inc()
                log.exception("control tick failed (%d in a row)", self.failed_in_a_row)
            else:
                self.failed_in_a_row = 0
            self.last_tick_done = time.monotonic()

    async def tick(self) -> None:
        """Make the first plan once enough nodes are up, replace a plan that lost a node or a link, re-issue
        the plan to plan nodes that restarted, and run one adaptive decision per monitoring interval."""
        co = self.co
        try:
            if co.view is None:
                alive = self.adapter.schedulable()
                if len(alive) >= co.config.min_nodes:
                    await self.install(place(alive, co.model.num_layers, co.config.boundaries, co.config.placement,
                                             self.adapter.policy.trust_rule()))
            elif lost := co.lost_plan_nodes():
                await self.replace_plan("node-lost", f"lost {', '.join(lost)}")
            elif not all(co.registry.alive(n) for n in co.view.node_ids()):
                pass  # after a restart: plan nodes still have the rejoin grace to register again
            elif self.stale_nodes:
                self.stale_nodes.clear()
                log.info("re-issuing the plan to nodes that restarted")
                current = co.current_plan()
                if current is not None:
                    await self.install(current)
            elif cut := co.down_hops(co.current_plan()):
                await self.replace_plan("link-lost", "links down: " + ", ".join(f"{a}->{b}" for a, b in cut))
            else:
                co.no_plan_reason = ""
                if time.monotonic() >= self._next_decision:
                    self._next_decision = time.monotonic() + self.adapter.policy.interval_s
                    await self.decide()
            self._last_problem = ""
        except PlacementError as exc:
            if str(exc) != self._last_problem:  # say it once, not every tick
                log.warning("cannot plan: %s", exc)
            self._last_problem = str(exc)

    def health(self) -> tuple[bool, str]:
        """(serving, why not) for the gRPC health service."""
        if self._task is None:
            return False, "control loop not started"
        if self._task.done():
            exc = None if self._task.cancelled() else self._task.exception()
            return False, f"control loop stopped: {exc!r}"
        if self.failed_in_a_row >= FAILED_TICKS:
            return False, f"the last {self.failed_in_a_row} control ticks failed: {self.last_error}"
        # A tick may legitimately spend a whole install (PREPARE, then COMMIT) inside it.
        allowed = max(FAILED_TICKS * self.period_s, self.co.config.prepare_timeout_s + COMMIT_TIMEOUT_S + 5.0)
        idle = time.monotonic() - self.last_tick_done
        if idle > allowed:
            return False, f"no control tick finished for {idle:.0f} s"
        return True, ""

    # -- every change goes through here --------------------------------------------
    async def install(self, plan: Plan) -> tuple[bool, str, pb.Plan | None]:
        return await self.co.install(plan, self.adapter.policy.trust_rule())

    def record(self, kind: str, reason: str, cluster: ClusterState | None, epoch_before: int, epoch_after: int, *,
               triggers: str = "", old: float = 0.0, new: float = 0.0, old_ms: float = 0.0,
               new_ms: float = 0.0) -> None:
        self.co.state.record_decision(pb.DecisionRecord(
            at_ms=int(time.time() * 1000), kind=kind, triggers=triggers, reason=reason, predicted_cost_old=old,
            predicted_cost_new=new, epoch_before=epoch_before, epoch_after=epoch_after,
            inputs_json=self.adapter.inputs(cluster), predicted_latency_old_ms=old_ms,
            predicted_latency_new_ms=new_ms))
        DECISIONS.labels(kind=kind).inc()
        log.info("decision %s: %s", kind, reason)

    def _epoch(self) -> int:
        return self.co.view.epoch if self.co.view else 0

    async def decide(self) -> None:
        """One adaptive decision; installs the engine's plan when it decides to change."""
        decided = self.adapter.decide()
        if decided is None:
            return
        decision, cluster = decided
        epoch_before, epoch_after = self._epoch(), 0
        if decision.plan is not None and decision.kind in ("migrate", "resplit"):
            committed, reason, plan = await self.install(decision.plan)
            if committed and plan is not None:
                epoch_after = plan.epoch
            else:
                log.warning("adaptive %s not installed: %s", decision.kind, reason)
        note = self._repeat_note(decision, epoch_before) if decision.kind != "keep" or decision.triggers else None
        if note is not None:
            self.record(decision.kind, decision.reason + note, cluster, epoch_before, epoch_after,
                        triggers=", ".join(map(str, decision.triggers)),
                        old=decision.old_cost.phi if decision.old_cost else 0.0,
                        new=decision.new_cost.phi if decision.new_cost else 0.0,
                        old_ms=decision.old_cost.token_ms if decision.old_cost else 0.0,
                        new_ms=decision.new_cost.token_ms if decision.new_cost else 0.0)

    def _repeat_note(self, decision: Decision, epoch: int) -> str | None:
        """None when this "keep" repeats the last recorded one (same triggers, same plan) too soon to record;
        else what to add to its reason.

        While a trigger stays fired the loop keeps the plan every interval; one row per second would
        bury every other decision in the history, so repeats are counted and summarised once a minute.
        """
        if decision.kind != "keep":
            self._repeat = None
            return ""
        key = (epoch, tuple(sorted(t.name for t in decision.triggers)))
        now = time.monotonic()
        if self._repeat is not None and self._repeat[0] == key and now - self._repeat[1] < REPEAT_RECORD_S:
            self._repeat = (key, self._repeat[1], self._repeat[2] + 1)
            DECISIONS.labels(kind=decision.kind).inc()
            log.debug("decision keep (repeat): %s", decision.reason)
            return None
        repeats = self._repeat[2] if self._repeat is not None and self._repeat[0] == key else 0
        self._repeat = (key, now, 0)
        return f" (and {repeats} times since the last record)" if repeats else ""

    async def replace_plan(self, kind: str, why: str) -> bool:
        """Install the best plan for what is left after a loss (``kind`` "node-lost" or "link-lost").

        When there is none, the reason is kept in ``Coordinator.no_plan_reason`` (clients asking for a
        route get UNAVAILABLE with it) and recorded once per distinct reason; the loop calls again every
        tick, so service resumes by itself as soon as a feasible plan exists again.
        """
        co = self.co
        epoch = self._epoch()
        head = co.view.head.node_id if co.view is not None else None
        try:
            plan, how = best_plan(self.adapter, None if head is None or co.registry.lost(head) else head)
            if co.down_hops(plan):  # the static fallback knows nothing of links
                raise PlacementError("every placement found crosses a link reported down")
        except PlacementError as exc:
            if str(exc) != co.no_plan_reason:
                log.warning("%s; no feasible plan: %s", why, exc)
                self.record(kind, f"{why}; no feasible plan: {exc}", None, epoch, 0)
            co.no_plan_reason = str(exc)
            return False
        committed, reason, installed = await self.install(plan)
        self.record(kind, f"{why}; {how}: {reason}", None, epoch, installed.epoch if committed and installed else 0)
        return committed

    def note_registration(self, request: pb.RegisterRequest) -> None:
        """A plan node that registers without the committed plan, or at a new address, gets the plan again."""
        view = self.co.view
        if view is not None and request.node_id in view.node_ids() and (
                request.plan_epoch != view.epoch or request.address != view.addresses[request.node_id]):
            self.stale_nodes.add(request.node_id)

    # -- operator actions ------------------------------------------------------------
    async def resplit(self, boundaries: Sequence[int], placement: Sequence[str], dry_run: bool) -> pb.ResplitReply:
        drained = sorted(set(placement) & self.adapter.drained)
        if drained:
            raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, f"{', '.join(drained)} is drained: return it "
                               f"first with `splitmesh drain {drained[0]} --undo`")
        try:
            if boundaries or placement:
                plan = place(self.adapter.schedulable(), self.co.model.num_layers, list(boundaries), list(placement),
                             self.adapter.policy.trust_rule())
                how = "operator"
            else:
                plan, how = best_plan(self.adapter)
        except PlacementError as exc:
            raise ControlError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        forecast = resplit_forecast(self.adapter.workload(), self.adapter.forecast(self.co.current_plan()),
                                    self.adapter.forecast(plan))
        before, after = forecast.predicted_ms_old, forecast.predicted_ms_new
        if dry_run:
            reply = pb.ResplitReply(committed=False, reason=f"dry run: {how}")
            reply.MergeFrom(forecast)
            reply.plan.CopyFrom(self.co.build_plan(plan, 0, self.adapter.policy.trust_rule()))
            return reply
        epoch_before = self._epoch()
        committed, reason, installed = await self.install(plan)
        self.record("operator", f"resplit requested ({how}): {reason}", None, epoch_before,
                    installed.epoch if committed and installed else 0, old_ms=before, new_ms=after)
        if not committed:
            raise ControlError(grpc.StatusCode.ABORTED, f"plan aborted, previous plan stays: {reason}")
        reply = pb.ResplitReply(committed=True, reason=reason)
        reply.MergeFrom(forecast)
        if installed is not None:
            reply.plan.CopyFrom(installed)
        return reply

    async def drain(self, node_id: str, undo: bool) -> pb.DrainReply:
        if node_id not in self.co.registry.nodes:
            raise ControlError(grpc.StatusCode.NOT_FOUND, f"unknown node {node_id!r}")
        self.adapter.set_drained(node_id, not undo)
        if undo or self.co.view is None or node_id not in self.co.view.node_ids():
            return pb.DrainReply(committed=False, reason="no plan change needed")
        try:
            plan, how = best_plan(self.adapter)
        except PlacementError as exc:
            self.adapter.set_drained(node_id, False)
            raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot drain {node_id}: {exc}") from exc
        epoch_before = self._epoch()
        committed, reason, installed = await self.install(plan)
        self.record("operator", f"drain {node_id} ({how}): {reason}", None, epoch_before,
                    installed.epoch if committed and installed else 0)
        if not committed:
            self.adapter.set_drained(node_id, False)
            raise ControlError(grpc.StatusCode.ABORTED, f"drain aborted, previous plan stays: {reason}")
        reply = pb.DrainReply(committed=True, reason=reason)
        if installed is not None:
            reply.plan.CopyFrom(installed)
        return reply

    def set_policy(self, updates: dict[str, str]) -> dict[str, str]:
        """Validated as a whole (PolicyError changes and persists nothing), then recorded."""
        values = self.adapter.set_policy(updates)
        self.record("operator", f"policy set: {json.dumps(updates, sort_keys=True)}", None, self._epoch(), 0)
        return values
