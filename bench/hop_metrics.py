"""Per-boundary hop overhead read from the nodes' own Prometheus histograms.

The head observes, per step, its wait for the tail's token minus the compute every node after it
reported for the same step (``ActivationFrame.compute_s``, summed along the chain and passed on in
``TokenFrame.compute_s``), divided by the chain's node boundaries: what crossing one boundary cost per
token, the token's direct way back to the head included, with every node's compute taken out. That is
far steadier on a shared box than subtracting two end-to-end token times.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families

HISTOGRAM = "splitmesh_agent_hop_overhead_seconds"
Buckets = dict[float, float]  # upper bound -> cumulative count


def scrape(ports: Mapping[str, int], kind: str = "decode") -> dict[tuple[str, str], Buckets]:
    """Cumulative buckets per (sender, receiver) for steps of ``kind`` (decode or prefill)."""
    out: dict[tuple[str, str], Buckets] = {}
    for node, port in ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != HISTOGRAM:
                continue
            for sample in family.samples:
                if sample.name.endswith("_bucket") and sample.labels.get("kind") == kind:
                    key = (node, sample.labels["peer"])
                    out.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    return out


def delta(after: dict[tuple[str, str], Buckets], before: dict[tuple[str, str], Buckets],
          ) -> dict[tuple[str, str], Buckets]:
    return {key: {le: count - before.get(key, {}).get(le, 0.0) for le, count in buckets.items()}
            for key, buckets in after.items()}


def quantile(buckets: Buckets, q: float) -> float:
    """Linear interpolation inside the bucket holding the q-quantile (as Prometheus' histogram_quantile)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            share = (rank - below) / (count - below) if count > below else 0.0
            return lower + (bound - lower) * share
        lower, below = bound, count
    return lower
