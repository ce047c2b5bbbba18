"""Loaded segments, shared by plans and sessions, released when nothing uses them."""

from __future__ import annotations

import logging
import threading
import time

from common.model_store import ModelStore
from common.spans import Span
from node_agent.segment import SegmentRunner, weight_bytes

log = logging.getLogger(__name__)


class SegmentPool:
    """Holds one :class:`SegmentRunner` per (model, span); each holder counts as one reference."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._runners: dict[tuple[str, Span], SegmentRunner] = {}
        self._refs: dict[tuple[str, Span], int] = {}
        self._lock = threading.Lock()
        self._unloaded = False  # a runner was dropped since the last take_unloaded()
        store.keep_resident(set())  # the store may keep decrypted tensors, of loaded segments only

    def acquire(self, model_digest: str, span: Span) -> SegmentRunner:
        """Load (blocking; call from the compute thread) or reuse the runner, adding a reference."""
        key = (model_digest, span)
        with self._lock:
            runner = self._runners.get(key)
            if runner is not None:
                self._refs[key] += 1
                return runner
        try:
            pages = self._store.pages
            reused, fresh, started = pages.reused, pages.fresh, time.perf_counter()
            runner = SegmentRunner(self._store.open(model_digest), span)
            runner.warm_up()
            log.info("loaded segment %s of %s (%.1f MB) in %.0f ms; decrypted blobs: %d into reserved memory, %d "
                     "into new", span, model_digest[:12], runner.parameter_bytes() / 1e6,
                     (time.perf_counter() - started) * 1e3, pages.reused - reused, pages.fresh - fresh)
            with self._lock:
                existing = self._runners.get(key)
                if existing is not None:
                    self._refs[key] += 1
                    return existing
                self._runners[key] = runner
                self._refs[key] = 1
                return runner
        finally:
            self._keep_resident()  # also drops what a failed load decrypted

    def release(self, model_digest: str, span: Span) -> None:
        key = (model_digest, span)
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key], self._runners[key]
                self._unloaded = True
                log.info("released segment %s", span)
        self._keep_resident()

    def _keep_resident(self) -> None:
        """Let the store keep decrypted tensors of exactly the blobs loaded segments hold (no others)."""
        with self._lock:
            held = [(digest, list(r.loaded_roles)) for (digest, _), r in self._runners.items()]
        shas: set[str] = set()
        for digest, roles in held:
            files = self._store.open(digest).manifest.files
            shas.update(files[role].sha256 for role in roles)
        self._store.keep_resident(shas)

    def take_unloaded(self) -> bool:
        """Whether a segment was released since the last call (its memory can be handed back now)."""
        with self._lock:
            unloaded, self._unloaded = self._unloaded, False
            return unloaded

    def loaded_roles(self) -> list[str]:
        with self._lock:
            return sorted({role for r in self._runners.values() for role in r.loaded_roles})

    def weight_bytes(self) -> int:
        """Bytes of weights the loaded segments hold (layers shared by overlapping spans counted once)."""
        with self._lock:
            runners = list(self._runners.values())
        return weight_bytes(runners)

    def spans(self) -> list[Span]:
        with self._lock:
            return sorted(span for _, span in self._runners)
