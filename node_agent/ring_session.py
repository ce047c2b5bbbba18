"""One generation's path through the mesh, which moves to a newer plan at a token boundary by replay.

The head keeps the session's token history. When a new plan is committed, or a downstream node
fails, it opens a pipeline on the newest plan and re-sends the whole history in one prefill to
rebuild every KV cache; sampling depends only on (seed, step), so the tokens continue unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc
import torch

from common.log_format import EPOCH, SESSION
from common.plan_view import PlanView
from common.proto import splitmesh_pb2 as pb
from common.proto import splitmesh_pb2_grpc as pb_grpc
from node_agent.hops import HopError
from node_agent.pipeline import SessionPipeline
from node_agent.runtime import NodeRuntime
from node_agent.sampler import SamplingConfig

log = logging.getLogger(__name__)

STALL_POLL_S = 0.1  # how often a waiting step looks for a plan that routes around a stalled peer
STALL_PROBE_TIMEOUT_S = 1.0  # a downstream node that does not answer an empty probe this fast counts as stalled
STALL_PROBE_INTERVAL_S = 0.5  # while a step waits, its path is probed at most this often
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
        self.pipeline = await self.rt.open_session(self.session_id, view, 0, self.sampling)
        self.view = view
        self.cached = 0

    def close(self) -> None:
        if self.pipeline is not None:
            self.rt.close_session(self.session_id, 0, self.view.epoch if self.view else None, only=self.pipeline)
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

        A paused node (SIGSTOP, an overloaded box) neither answers nor breaks the stream; once the
        orchestrator has committed a newer plan, waiting longer only delays the session. But a step can
        also be slow because it is working (a long prompt's prefill takes seconds), and a plan change for
        speed is no reason to throw that work away. So a step older than ``stall_reroute_s`` moves only if
        a node on its downstream path did not answer an empty probe. The probes start one probe timeout
        before that age and repeat while the step waits, so a verdict is ready when the newer plan arrives
        and a paused node costs no more time than before (a broken hop still fails at once).
        """
        assert self.pipeline is not None
        task = asyncio.ensure_future(self._step(self.pipeline, step, self.cached, inputs))
        reroute_s = self.rt.config.stall_reroute_s
        probe: asyncio.Future[list[str]] | None = None
        probe_started = -math.inf
        silent: list[str] | None = None  # the latest probe's verdict: downstream nodes that did not answer
        kept_logged = False
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STALL_POLL_S)
                if done:
                    return task.result()
                now = time.perf_counter()
                if probe is not None and probe.done():
                    silent, probe = probe.result(), None
                if (probe is None and now - started >= reroute_s - STALL_PROBE_TIMEOUT_S
                        and now - probe_started >= STALL_PROBE_INTERVAL_S):
                    probe, probe_started = asyncio.ensure_future(self._silent_downstream()), now
                newer = self._newer_plan()
                if newer is None or now - started < reroute_s or silent is None:
                    continue
                if not silent:
                    if not kept_logged:
                        log.info("session %s step %d running for %.1fs on epoch %d; every node on its path "
                                 "answers, so it finishes there", self.session_id[:8], step, now - started,
                                 self.view.epoch if self.view else 0)
                        kept_logged = True
                    continue
                log.warning("session %s step %d stalled for %.1fs (%s not answering); moving to epoch %d",
                            self.session_id[:8], step, now - started, ", ".join(silent), newer.epoch)
                task.cancel()
                self.close()
                await self.open(newer)
                return None
        finally:
            for pending in (task, probe):
                if pending is not None and not pending.done():
                    pending.cancel()

    async def _silent_downstream(self) -> list[str]:
        """Nodes after this one on the session's plan that do not answer an empty probe in time."""
        view = self.view
        if view is None:
            return []
        peers = sorted({s.node_id for s in view.segments if s.node_id != self.rt.node_id})

        async def answers(peer: str) -> bool:
            stub = pb_grpc.NodeStub(self.rt.channels.get(view.addresses[peer], peer))
            try:
                await stub.Probe(pb.ProbeRequest(), timeout=STALL_PROBE_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return False
            return True

        alive = await asyncio.gather(*(answers(p) for p in peers))
        return [p for p, ok in zip(peers, alive, strict=True) if not ok]
