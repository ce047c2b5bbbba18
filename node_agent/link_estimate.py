"""A link's reported bandwidth and RTT from its last few probe readings, not from the latest alone.

A probe shares the link with the mesh's own traffic, and that traffic can only make a reading worse: a probe
that overlaps a prefill's activations gets a share of the shaper (bandwidth reads low) and waits behind the
queue (RTT reads high). On the testbed one such reading put a 200 Mbit/s link at 43 Mbit/s and fired the
bandwidth trigger; RTTs read under a prefill reached 25 ms on a sub-millisecond link and made the cost
model's decode step 1.4x too slow. So the estimate is the best of the recent readings: the highest bandwidth
of the last ``bandwidth_window`` rounds and the lowest RTT of the last ``rtt_window`` (the propagation delay,
as in TCP's min-RTT filters). A link is reported only once its window is full (until then the orchestrator
assumes its default link); a real drop shows once every reading in the window sees it; a link that went
down forgets its history, since the path that comes back may differ.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class LinkEstimate:
    bandwidth_window: int = 2  # probe rounds whose best bandwidth is reported
    rtt_window: int = 5  # probe rounds whose lowest RTT is reported
    _bandwidths: deque[float] = field(default_factory=deque, init=False, repr=False)
    _rtts: deque[float] = field(default_factory=deque, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.bandwidth_window < 1 or self.rtt_window < 1:
            raise ValueError(f"probe windows must hold at least one reading, got {self.bandwidth_window} "
                             f"and {self.rtt_window}")
        self._bandwidths = deque(maxlen=self.bandwidth_window)
        self._rtts = deque(maxlen=self.rtt_window)

    def add(self, bandwidth_bps: float, rtt_ms: float) -> tuple[float, float] | None:
        """Record one probe round; return the (bandwidth bit/s, RTT ms) to report, or None while the bandwidth
        window is not full yet (a first reading alone may be the spoiled one)."""
        self._bandwidths.append(bandwidth_bps)
        self._rtts.append(rtt_ms)
        if len(self._bandwidths) < self.bandwidth_window:
            return None
        return max(self._bandwidths), min(self._rtts)

    def reset(self) -> None:
        self._bandwidths.clear()
        self._rtts.clear()


MIN_TIMED_DIFFERENCE_S = 2e-3  # below this the two transfers differ by scheduling noise, not by the link


def probe_bandwidth(small_bytes: int, small_s: float, full_bytes: int, full_s: float, rtt_s: float) -> float:
    """Bit/s from two timed transfers of different sizes, each started after the link sat idle.

    A token-bucket shaper (tc tbf, a carrier's policer) sends the first ``burst`` bytes of a transfer at line
    rate, so bytes / time over a single transfer reads high: a 256 KiB probe through a 50 Mbit/s tbf with a
    64 KiB bucket read 66 Mbit/s and kept the bandwidth trigger quiet. The difference of two transfers that
    both start with a full bucket cancels the burst, the RTT and every fixed per-call cost. When the two are
    too close to time apart (a fast link), the larger transfer alone is used.
    """
    extra = full_s - small_s
    if full_bytes > small_bytes and extra >= MIN_TIMED_DIFFERENCE_S:
        return (full_bytes - small_bytes) * 8 / extra
    return full_bytes * 8 / max(full_s - rtt_s, 1e-6)
