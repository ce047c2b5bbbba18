"""Which plans this node accepted, which one is committed, and the highest epoch ever accepted.

A signed plan is verified over its exact bytes before it is parsed; the highest accepted epoch is
persisted with fsync so a restart can never be rolled back to an older plan. The keys of the encrypted
blobs a plan gives this node are granted with it and forgotten when the plan is aborted or replaced
(kept only while some plan held here needs them); they are never written to disk. A replaced plan keeps
its segments and keys for ``drain_s`` after the COMMIT, so a step already working on it upstream can still
open here and finish on its plan.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from common.dtypes import WEIGHT_DTYPES
from common.model_store import ModelStore, StoreError
from common.plan_signing import PlanSignatureError, public_bytes, verify_signature
from common.plan_view import PlanError, PlanView
from common.proto import splitmesh_pb2 as pb
from common.store_roles import roles_for_span
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
                 dtypes: tuple[str, ...] = WEIGHT_DTYPES, weight_keys: dict[str, bytes] | None = None,
                 drain_s: float = 0.0) -> None:
        self.node_id = node_id
        # How long a replaced plan keeps its segments and keys here after a COMMIT, so that a step already
        # working on it upstream (a long prefill) can still open on this node and finish on its plan.
        self.drain_s = drain_s
        self.weight_keys = {} if weight_keys is None else weight_keys  # the dict the store decrypts with
        self._granted: dict[int, frozenset[str]] = {}  # epoch -> blob hashes whose keys that plan brought
        # A committed plan found on disk after a restart whose encrypted layers wait for their keys (Reporter).
        self.awaiting_keys: tuple[PlanView, pb.SignedPlan] | None = None
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

    def restore_blocking(self, keys: Mapping[str, bytes] | None = None) -> PlanView | None:
        """After a restart, serve the last committed plan again (re-verified, layers reloaded). When its layers
        are encrypted and ``keys`` is None, it only sets ``awaiting_keys``: the keys are in no file here."""
        found = self.awaiting_keys or self._persisted()
        if found is None:
            return None
        view, signed = found
        if keys is None and self.needs_keys(view):
            self.awaiting_keys = found
            log.info("persisted plan epoch %d: waiting for its weight keys from the orchestrator", view.epoch)
            return None
        self.awaiting_keys = None
        self.grant(view.epoch, keys or {})
        try:
            self.load_and_hold(view, signed)
        except BaseException:
            self.forget(view.epoch)
            raise
        self.commit(view.epoch)
        log.info("restored committed plan epoch %d after restart", view.epoch)
        return view

    def _persisted(self) -> tuple[PlanView, pb.SignedPlan] | None:
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
        return PlanView.parse(plan), signed

    def hosted_blobs(self, view: PlanView) -> dict[str, str]:
        """Ciphertext sha256 -> role of every encrypted blob ``view``'s segments on this node read."""
        try:
            manifest = self._store.open(view.model_digest).manifest
        except StoreError:
            return {}
        return {manifest.files[r].sha256: r for seg in view.segments_on(self.node_id)
                for r in roles_for_span(manifest, seg.span) if manifest.files[r].encrypted}

    def needs_keys(self, view: PlanView) -> bool:
        """Whether ``view``'s encrypted blobs here include one whose key the store lacks."""
        return any(sha not in self._store.keys for sha in self.hosted_blobs(view))

    def grant(self, epoch: int, keys: Mapping[str, bytes]) -> None:
        """Hold ``keys`` for plan ``epoch`` (the caller passes only those of blobs it hosts in that plan)."""
        with self._lock:
            self.weight_keys.update(keys)
            self._granted[epoch] = self._granted.get(epoch, frozenset()) | frozenset(keys)

    def forget(self, epoch: int) -> None:
        """Drop the keys plan ``epoch`` brought that no other plan held here still needs."""
        with self._lock:
            self._forget_locked(epoch)

    def _forget_locked(self, epoch: int) -> None:
        dropped = self._granted.pop(epoch, frozenset())
        still = frozenset().union(*self._granted.values())
        for sha in dropped - still:
            self.weight_keys.pop(sha, None)

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
                self._forget_locked(stale)
        if old is not None:
            self._retire(old)
            if len(self._known) > 8:
                self._known.pop(min(self._known))
        log.info("committed plan epoch %d: %s", epoch, view.describe())
        return True

    def _retire(self, old: PlanView) -> None:
        """Release a replaced plan's segments and forget its keys, after ``drain_s`` (at once when 0)."""
        if self.drain_s <= 0:
            self._end_drain(old)
            return
        timer = threading.Timer(self.drain_s, self._end_drain, args=(old,))
        timer.daemon = True
        timer.start()

    def _end_drain(self, old: PlanView) -> None:
        with self._lock:
            self._forget_locked(old.epoch)
        self._release(old)
        if old.segments_on(self.node_id):
            log.info("released plan epoch %d's segments here", old.epoch)

    def abort(self, epoch: int) -> None:
        with self._lock:
            view = self._pending.pop(epoch, None)
            self._forget_locked(epoch)
        if view is not None:
            self._release(view)
            log.info("aborted plan epoch %d", epoch)

    def _release(self, view: PlanView) -> None:
        for segment in view.segments_on(self.node_id):
            self._pool.release(view.model_digest, segment.span)
