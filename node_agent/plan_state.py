"""Which plans this node accepted, which one is committed, and the highest epoch ever accepted.

A signed plan is verified over its exact bytes before it is parsed; the highest accepted epoch is
persisted with fsync so a restart can never be rolled back to an older plan.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from common.dtypes import WEIGHT_DTYPES
from common.model_store import ModelStore, StoreError
from common.plan_signing import PlanSignatureError, public_bytes, verify_signature
from common.plan_view import PlanError, PlanView
from common.proto import splitmesh_pb2 as pb
from node_agent.dtype_support import dtype_problem
from node_agent.segment_pool import SegmentPool

log = logging.getLogger(__name__)
MAX_PLAN_BYTES = 1 << 20
CLOCK_SKEW_MS = 60_000  # how far in the future an issued-at may be before the plan is refused


def _durable_write(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync, so a crash leaves the old or the new contents, never half."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class PlanRejected(Exception):
    """A plan failed verification; ``code`` names the gRPC status to answer with."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class UnsupportedDtype(ValueError):
    """The plan's model is in a dtype this node cannot (or may not) run; the message says which and why."""


class PlanState:
    def __init__(self, node_id: str, state_dir: Path, store: ModelStore, pool: SegmentPool,
                 dtypes: tuple[str, ...] = WEIGHT_DTYPES) -> None:
        self.node_id = node_id
        self.dtypes = dtypes  # weight dtypes this node runs
        self._store = store
        self._pool = pool
        self._epoch_file = state_dir / "highest_epoch"
        self._key_file = state_dir / "plan_key.json"
        self._committed_file = state_dir / "committed_plan.pb"
        state_dir.mkdir(parents=True, exist_ok=True)
        self.highest_accepted = int(self._epoch_file.read_text()) if self._epoch_file.exists() else 0
        self.keys: dict[str, Ed25519PublicKey] = {}
        self.cluster_id = ""
        if self._key_file.exists():
            saved = json.loads(self._key_file.read_text())
            self.keys[saved["key_id"]] = Ed25519PublicKey.from_public_bytes(bytes.fromhex(saved["public_key"]))
            self.cluster_id = saved["cluster_id"]
        self._signed: dict[int, pb.SignedPlan] = {}
        self.committed: PlanView | None = None
        self._accepted_bytes: dict[int, bytes] = {}
        self._pending: dict[int, PlanView] = {}
        self._known: dict[int, PlanView] = {}  # committed plans sessions may still run under
        self._lock = threading.Lock()

    def trust_key(self, key_id: str, public: Ed25519PublicKey, cluster_id: str = "") -> None:
        """Accept plans signed by this key for this cluster, and remember both across restarts.

        A node that already trusts another key refuses the new one: an orchestrator whose key changed
        (or an impostor) must be re-admitted by an operator clearing the node's state.
        """
        if self.keys and key_id not in self.keys:
            raise PermissionError(f"plan key {key_id} is not the key this node trusts ({', '.join(self.keys)})")
        if self.cluster_id and cluster_id and cluster_id != self.cluster_id:
            raise PermissionError(f"cluster {cluster_id!r} is not this node's cluster {self.cluster_id!r}")
        self.keys[key_id] = public
        self.cluster_id = cluster_id or self.cluster_id
        _durable_write(self._key_file, json.dumps({"key_id": key_id, "public_key": public_bytes(public).hex(),
                                                   "cluster_id": self.cluster_id}).encode())

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
        if self.cluster_id and plan.cluster_id != self.cluster_id:
            raise PlanRejected("PERMISSION_DENIED",
                               f"plan for cluster {plan.cluster_id!r}, this is {self.cluster_id!r}")
        now_ms = int(time.time() * 1000)
        if plan.issued_at_ms > now_ms + CLOCK_SKEW_MS:
            raise PlanRejected("FAILED_PRECONDITION", f"plan issued {(plan.issued_at_ms - now_ms) / 1000:.0f}s "
                                                      "in the future")
        if plan.expires_at_ms <= now_ms:
            raise PlanRejected("FAILED_PRECONDITION", "plan has expired")
        try:
            view = PlanView.parse(plan)
        except PlanError as exc:
            raise PlanRejected("INVALID_ARGUMENT", f"malformed plan: {exc}") from exc
        for segment in view.segments_on(self.node_id):
            if segment.privacy_critical and not view.trusted.get(self.node_id, False):
                raise PlanRejected("PERMISSION_DENIED", f"untrusted node asked to host privacy-critical {segment.span}")
        return view

    def _persist_highest(self, epoch: int) -> None:
        _durable_write(self._epoch_file, str(epoch).encode())
        self.highest_accepted = epoch

    def restore_blocking(self) -> PlanView | None:
        """After a restart, serve the last committed plan again (re-verified, layers reloaded)."""
        if not self._committed_file.exists() or not self.keys:
            return None
        signed = pb.SignedPlan()
        signed.ParseFromString(self._committed_file.read_bytes())
        try:
            verify_signature(signed, self.keys)
        except PlanSignatureError as exc:
            log.error("persisted plan does not verify (%s): not restoring it", exc)
            return None
        plan = pb.Plan()
        plan.ParseFromString(signed.plan_bytes)
        if plan.expires_at_ms <= time.time() * 1000:
            log.info("persisted plan epoch %d has expired: waiting for a new one", plan.epoch)
            return None
        view = PlanView.parse(plan)
        self.load_and_hold(view, signed)
        self.commit(view.epoch)
        log.info("restored committed plan epoch %d after restart", view.epoch)
        return view

    def prepare_blocking(self, view: PlanView, signed: pb.SignedPlan) -> None:
        """Load this node's segments of ``view`` (runs off the event loop), then mark it pending."""
        self.load_and_hold(view, signed)
        with self._lock:
            self._persist_highest(view.epoch)

    def load_and_hold(self, view: PlanView, signed: pb.SignedPlan) -> None:
        if view.segments_on(self.node_id):
            try:
                manifest = self._store.open(view.model_digest).manifest
            except StoreError as exc:
                raise ValueError(str(exc)) from exc
            problem = dtype_problem(manifest, self.dtypes)
            if problem is not None:
                raise UnsupportedDtype(problem)
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
            self._accepted_bytes[view.epoch] = signed.plan_bytes
            self._signed[view.epoch] = signed
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
            signed = self._signed.pop(epoch, None)
            if signed is not None:
                _durable_write(self._committed_file, signed.SerializeToString())
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
