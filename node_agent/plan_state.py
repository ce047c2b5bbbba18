"""Which plans this node accepted, which one is committed, and the highest epoch ever accepted.

A signed plan is verified over its exact bytes before it is parsed; the highest accepted epoch is
persisted with fsync so a restart can never be rolled back to an older plan.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from common.model_store import ModelStore
from common.plan_signing import PlanSignatureError, verify_signature
from common.plan_view import PlanError, PlanView
from common.proto import splitmesh_pb2 as pb
from node_agent.segment_pool import SegmentPool

log = logging.getLogger(__name__)
MAX_PLAN_BYTES = 1 << 20


class PlanRejected(Exception):
    """A plan failed verification; ``code`` names the gRPC status to answer with."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class PlanState:
    def __init__(self, node_id: str, state_dir: Path, store: ModelStore, pool: SegmentPool) -> None:
        self.node_id = node_id
        self._store = store
        self._pool = pool
        self._epoch_file = state_dir / "highest_epoch"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.highest_accepted = int(self._epoch_file.read_text()) if self._epoch_file.exists() else 0
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.committed: PlanView | None = None
        self._accepted_bytes: dict[int, bytes] = {}
        self._pending: dict[int, PlanView] = {}
        self._known: dict[int, PlanView] = {}  # committed plans sessions may still run under
        self._lock = threading.Lock()

    def trust_key(self, key_id: str, public: Ed25519PublicKey) -> None:
        self.keys[key_id] = public

    def plan(self, epoch: int) -> PlanView | None:
        return self._known.get(epoch)

    def verify(self, signed: pb.SignedPlan) -> PlanView | None:
        """The plan if new, None if it repeats an accepted epoch byte for byte; else PlanRejected."""
        if len(signed.plan_bytes) > MAX_PLAN_BYTES:
            raise PlanRejected("INVALID_ARGUMENT", f"plan of {len(signed.plan_bytes)} bytes exceeds the limit")
        try:
            verify_signature(signed, self.keys)
        except PlanSignatureError as exc:
            raise PlanRejected("UNAUTHENTICATED", str(exc)) from exc
        plan = pb.Plan()
        try:
            plan.ParseFromString(signed.plan_bytes)
        except DecodeError as exc:
            raise PlanRejected("INVALID_ARGUMENT", f"plan bytes do not parse: {exc}") from exc
        if plan.epoch in self._accepted_bytes:
            if self._accepted_bytes[plan.epoch] == signed.plan_bytes:
                return None
            log.error("ALARM: two different plans signed for epoch %d", plan.epoch)
            raise PlanRejected("FAILED_PRECONDITION", f"epoch {plan.epoch} already accepted with other contents")
        if plan.epoch <= self.highest_accepted:
            raise PlanRejected("FAILED_PRECONDITION",
                               f"stale plan epoch {plan.epoch}: already accepted {self.highest_accepted}")
        try:
            view = PlanView.parse(plan)
        except PlanError as exc:
            raise PlanRejected("INVALID_ARGUMENT", f"malformed plan: {exc}") from exc
        for segment in view.segments_on(self.node_id):
            if segment.privacy_critical and not view.trusted.get(self.node_id, False):
                raise PlanRejected("PERMISSION_DENIED", f"untrusted node asked to host privacy-critical {segment.span}")
        return view

    def _persist_highest(self, epoch: int) -> None:
        tmp = self._epoch_file.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(str(epoch))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._epoch_file)
        self.highest_accepted = epoch

    def prepare_blocking(self, view: PlanView, plan_bytes: bytes) -> None:
        """Load this node's segments of ``view`` (runs on the compute thread), then mark it pending."""
        acquired = []
        try:
            for segment in view.segments_on(self.node_id):
                self._pool.acquire(view.model_digest, segment.span)
                acquired.append(segment.span)
        except BaseException:
            for span in acquired:
                self._pool.release(view.model_digest, span)
            raise
        with self._lock:
            self._persist_highest(view.epoch)
            self._accepted_bytes[view.epoch] = plan_bytes
            self._pending[view.epoch] = view

    def commit(self, epoch: int) -> bool:
        """Make a prepared plan current; False if ``epoch`` was never prepared here."""
        with self._lock:
            if self.committed is not None and self.committed.epoch == epoch:
                return True
            view = self._pending.pop(epoch, None)
            if view is None:
                return False
            old, self.committed = self.committed, view
            self._known[epoch] = view
            for stale in [e for e in self._pending if e < epoch]:
                self._release(self._pending.pop(stale))
        if old is not None:
            self._release(old)
            if len(self._known) > 8:
                self._known.pop(min(self._known))
        log.info("committed plan epoch %d: %s", epoch, view.describe())
        return True

    def abort(self, epoch: int) -> None:
        with self._lock:
            view = self._pending.pop(epoch, None)
        if view is not None:
            self._release(view)
            log.info("aborted plan epoch %d", epoch)

    def _release(self, view: PlanView) -> None:
        for segment in view.segments_on(self.node_id):
            self._pool.release(view.model_digest, segment.span)
