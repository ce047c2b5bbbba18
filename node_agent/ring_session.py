"""One generation's path through the mesh, which moves to a newer plan at a token boundary by replay.

The head keeps the session's token history. When a new plan is committed, or a downstream node
fails, it opens a pipeline on the newest plan and re-sends the whole history in one prefill to
rebuild every KV cache; sampling depends only on (seed, step), so the tokens continue unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from common.log_format import EPOCH, SESSION
from common.plan_view import PlanView
from node_agent.hops import HopError
from node_agent.path_watch import PROBE_TIMEOUT_S, PathWatch, PeerReading
from node_agent.pipeline import SessionPipeline
from node_agent.runtime import NodeRuntime
from node_agent.sampler import SamplingConfig

log = logging.getLogger(__name__)

STALL_POLL_S = 0.1  # how often a waiting step looks for a plan that routes around a stalled peer
RECOVERABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED})


class RingSession:
    def __init__(self, runtime: NodeRuntime, session_id: str, sampling: SamplingConfig, prompt_ids: list[int],
                 recovery_timeout_s: float) -> None:
        self.rt = runtime
        self.session_id = session_id
        self.sampling = sampling
        self.tokens = list(prompt_ids)  # prompt + generated so far: the replay history
        self.cached = 0  # tokens whose keys/values the current pipeline already holds
        self.recovery_timeout_s = recovery_timeout_s
        self.view: PlanView | None = None
        self.pipeline: SessionPipeline | None = None
        self.replays = 0

    async def open(self, view: PlanView) -> None:
        self.close()
        self.pipeline = await self.rt.sessions.open(self.session_id, view, 0, self.sampling)
        self.view = view
        self.cached = 0

    def close(self) -> None:
        if self.pipeline is not None:
            self.rt.sessions.close(self.session_id, 0, self.view.epoch if self.view else None, only=self.pipeline)
            self.pipeline = None

    def _newer_plan(self) -> PlanView | None:
        """The committed plan if it is newer than ours and this node heads it."""
        committed = self.rt.plans.committed
        if committed is None or self.view is None or committed.epoch <= self.view.epoch:
            return None
        if committed.head.node_id != self.rt.node_id:
            return None  # another head: this session finishes on the plan it started with
        return committed

    async def _await_newer_plan(self, error: HopError) -> PlanView:
        deadline = time.monotonic() + self.recovery_timeout_s
        while time.monotonic() < deadline:
            newer = self._newer_plan()
            if newer is not None:
                return newer
            await asyncio.sleep(0.05)
        raise HopError(grpc.StatusCode.UNAVAILABLE,
                       f"{error.details}; no replacement plan within {self.recovery_timeout_s:.0f}s")

    async def next_token(self, step: int) -> int:
        """The token for ``step``; switches plans first if a newer one is committed."""
        SESSION.set(self.session_id)
        EPOCH.set(self.view.epoch if self.view else 0)
        newer = self._newer_plan()
        if newer is not None:
            log.info("session %s moves to epoch %d at step %d by replay", self.session_id[:8], newer.epoch, step)
            await self.open(newer)
        while True:
            assert self.pipeline is not None
            inputs = torch.tensor([self.tokens[self.cached:]], dtype=torch.long)
            if self.cached == 0 and step > 0:
                self.replays += 1
            started = time.perf_counter()
            try:
                token = await self._step_or_reroute(step, inputs, started)
                if token is None:  # a peer stalled and a newer plan routes around it: replay there
                    continue
                if self.cached == 0 and step > 0:
                    log.info("session %s replayed %d tokens on epoch %d in %.0f ms", self.session_id[:8],
                             len(self.tokens), self.view.epoch if self.view else 0,
                             (time.perf_counter() - started) * 1000)
            except HopError as exc:
                if exc.code not in RECOVERABLE:
                    raise
                log.warning("session %s step %d failed (%s: %s); waiting for a new plan", self.session_id[:8], step,
                            exc.code.name, exc.details)
                self.close()
                await self.open(await self._await_newer_plan(exc))
                continue
            self.cached = len(self.tokens)
            self.tokens.append(token)
            return token

    async def _step(self, pipeline: SessionPipeline, step: int, position: int, inputs: torch.Tensor) -> int:
        """One step through the pipeline this node heads: it always ends in the token."""
        token = await pipeline.step(step, position, inputs)
        assert token is not None, "a pipeline from segment 0 returns the token"
        return token

    async def _step_or_reroute(self, step: int, inputs: torch.Tensor, started: float) -> int | None:
        """The step's token, or None after moving to a newer plan because the step stalled.

        A step can be slow because its path is working (a long prompt's prefill, or many sessions
        replaying after a re-split, takes seconds to a minute) or because a node is paused (SIGSTOP, an
        overloaded box) or gone. Once the step is older than the probe lead, the head reads its path
        (node_agent/path_watch.py): every node's answer to an empty probe and its count of finished
        compute rounds. The step fails (UNAVAILABLE, so the session waits for a replacement plan) only when
        a node has been silent, or the whole path has finished no work, for ``hop_timeout_s``; a busy path
        keeps its step however long the work takes. A step older than ``stall_reroute_s`` moves to a newer
        committed plan only if a node on its path is silent: a plan change for speed is no reason to throw
        working prefill away. The probes start one probe timeout before the earlier of the two ages, so a
        verdict is ready when it is needed (a broken hop still fails at once).
        """
        assert self.pipeline is not None and self.view is not None
        task = asyncio.ensure_future(self._step(self.pipeline, step, self.cached, inputs))
        config = self.rt.config
        reroute_s = config.stall_reroute_s
        probe_from = max(0.0, min(reroute_s, config.hop_timeout_s) - PROBE_TIMEOUT_S)
        watch: PathWatch | None = None
        probe: asyncio.Future[dict[str, PeerReading]] | None = None
        kept_logged = False
        try:
            while True:
                await asyncio.wait({task}, timeout=STALL_POLL_S)
                if task.done():
                    return task.result()
                now = time.perf_counter()
                if watch is None:
                    if now - started < probe_from:
                        continue
                    watch = PathWatch(self.view, self.rt.node_id, lambda: self.rt.compute.rounds_done,
                                      config.hop_timeout_s)
                if probe is not None and probe.done():
                    watch.observe(probe.result())
                    probe = None
                if probe is None:
                    probe = asyncio.ensure_future(self.rt.peer_probes.read_all(self.view, watch.peers))
                reason = watch.stuck()
                if reason is not None:
                    raise PathWatch.error(reason, now - started)
                newer = self._newer_plan()
                if newer is None or now - started < reroute_s or watch.silent is None:
                    continue
                if not watch.silent:
                    if not kept_logged:
                        log.info("session %s step %d running for %.1fs on epoch %d; every node on its path "
                                 "answers, so it finishes there", self.session_id[:8], step, now - started,
                                 self.view.epoch)
                        kept_logged = True
                    continue
                log.warning("session %s step %d stalled for %.1fs (%s not answering); moving to epoch %d",
                            self.session_id[:8], step, now - started, ", ".join(watch.silent), newer.epoch)
                task.cancel()
                self.close()
                await self.open(newer)
                return None
        finally:
            for pending in (task, probe):
                if pending is not None and not pending.done():
                    pending.cancel()
            # A failed step's error holds this frame in its traceback, and this frame would hold the task that
            # holds the error (so the wait's result set is not kept either): a cycle, and with it the
            # session's pipeline until a full collection.
            del task, probe, pending
