"""Per-layer decode time as a function of batch rows: a fixed per-forward part plus a per-row part.

A batched forward of b decode rows costs about ``fixed + b * row`` per layer: the fixed part is reading the
weights (decode is memory bound), the per-row part the arithmetic and attention of each row. One EWMA per
batch-size bucket keeps what each load looked like lately; a weighted least-squares line through the
buckets separates the two parts once forwards of at least two batch sizes were seen. With one batch size
b > 1 only, the per-row part is taken from the prefill cost per token (a batched row is a prompt token in
all but attention); with single rows only it is unknown (0) and the orchestrator fills it in the same way.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # a forward of b rows lands in the first bucket >= b (the last takes the rest)
EWMA_NEW = 0.1  # weight of the newest forward in its bucket
ROWS_NEW = 0.1  # weight of the newest forward in the mean rows per decode forward
MIN_ROW_MS = 1e-6  # the per-row part reported when rows come about free (0 on the wire means "unknown")


@dataclass
class _Bucket:
    rows: float = 0.0  # mean rows of the forwards in it
    ms: float = 0.0  # mean per-layer milliseconds of those forwards
    count: int = 0

    def add(self, rows: int, ms: float) -> None:
        if self.count == 0:
            self.rows, self.ms = float(rows), ms
        else:
            self.rows += EWMA_NEW * (rows - self.rows)
            self.ms += EWMA_NEW * (ms - self.ms)
        self.count += 1


@dataclass(frozen=True)
class DecodeCost:
    """What the capacity report carries: per-layer ms of a forward of b rows = one_row_ms + (b - 1) * row_ms."""

    one_row_ms: float  # one layer, a forward of one decode row (0 = never measured)
    row_ms: float  # one layer, each further row of the same forward (0 = not separable yet)
    rows_mean: float  # decode rows per forward lately (0 = no decode yet)


@dataclass
class DecodeFit:
    """Thread-safe: the compute thread records, the reporter reads."""

    buckets: list[_Bucket] = field(default_factory=lambda: [_Bucket() for _ in BUCKETS])
    rows_mean: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, rows: int, ms_per_layer: float) -> None:
        """One decode forward of ``rows`` rows that took ``ms_per_layer`` per decoder layer."""
        if rows < 1 or ms_per_layer <= 0:
            return
        index = next((i for i, top in enumerate(BUCKETS) if rows <= top), len(BUCKETS) - 1)
        with self.lock:
            self.buckets[index].add(rows, ms_per_layer)
            self.rows_mean = float(rows) if self.rows_mean == 0 else self.rows_mean + ROWS_NEW * (rows - self.rows_mean)

    def cost(self, prior_row_ms: float = 0.0) -> DecodeCost:
        """The fitted parts; with forwards of one batch size b > 1 only, the per-row part is ``prior_row_ms``
        (the prefill cost per token, when known) and the one-row time what is left of the measured forward."""
        with self.lock:
            seen = [(b.rows, b.ms, b.count) for b in self.buckets if b.count]
            rows_mean = self.rows_mean
        if not seen:
            return DecodeCost(0.0, 0.0, 0.0)
        if len(seen) >= 2:
            fixed, row = fit_line(seen)
            row = max(row, MIN_ROW_MS)  # rows about free (a GPU): measured, not unknown
            return DecodeCost(max(fixed + row, row), row, rows_mean)
        rows, ms, _ = seen[0]
        if rows <= 1.0:
            return DecodeCost(ms, 0.0, rows_mean)
        row = min(prior_row_ms, ms / rows) if prior_row_ms > 0 else ms / rows
        return DecodeCost(ms - (rows - 1) * row, row, rows_mean)


def fit_line(points: list[tuple[float, float, int]]) -> tuple[float, float]:
    """Least squares ``ms = fixed + rows * row`` over (rows, ms, weight); (mean, 0) when rows do not vary."""
    total = sum(min(w, 20) for _, _, w in points)  # cap weights: an old busy bucket must not drown a new one
    weights = [min(w, 20) / total for _, _, w in points]
    mean_b = sum(w * b for w, (b, _, _) in zip(weights, points, strict=True))
    mean_t = sum(w * t for w, (_, t, _) in zip(weights, points, strict=True))
    var = sum(w * (b - mean_b) ** 2 for w, (b, _, _) in zip(weights, points, strict=True))
    if var < 1e-9:
        return mean_t, 0.0
    cov = sum(w * (b - mean_b) * (t - mean_t) for w, (b, t, _) in zip(weights, points, strict=True))
    row = cov / var
    return mean_t - row * mean_b, row
