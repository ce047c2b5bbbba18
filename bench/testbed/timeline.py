"""Background threads of a timeline run: apply scenario events on time, sample the plan epoch."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from splitmesh.client import Client, SplitmeshError

from .scenario import Event
from .testbed import Testbed

log = logging.getLogger(__name__)


class EventPlayer(threading.Thread):
    """Applies each event (link rate, CPU hog) at its ``t`` after ``start()``; ``stop()`` ends it early."""

    def __init__(self, tb: Testbed, events: Sequence[Event]) -> None:
        super().__init__(daemon=True, name="timeline-events")
        self.tb = tb
        self.events = list(events)
        self.applied: list[tuple[float, str]] = []  # (actual t, description)
        self._halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            for ev in self.events:
                if self._halt.wait(max(0.0, t0 + ev.t - time.monotonic())):
                    return
                for host, mbps in ev.rate.items():
                    self.tb.set_rate(host, mbps)
                for host, on in ev.hog.items():
                    self.tb.set_hog(host, on)
                self.applied.append((time.monotonic() - t0, ev.describe()))
        except BaseException as exc:  # reported by the caller; a dead event thread must not go unnoticed
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


class EpochSampler(threading.Thread):
    """Polls the orchestrator's status: (t, committed epoch, plan text) every ``period_s``."""

    def __init__(self, address: str, period_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="epoch-sampler")
        self.address = address
        self.period_s = period_s
        self.samples: list[tuple[float, int, str]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        with Client(self.address, 3.0) as client:
            while not self._halt.is_set():
                try:
                    plan = client.status().plan
                    text = " ".join(f"[{s.start},{s.end})@{s.node_id}" for s in plan.segments)
                    self.samples.append((time.monotonic() - t0, int(plan.epoch), text))
                except SplitmeshError as exc:
                    log.debug("status poll failed: %s", exc)
                self._halt.wait(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
