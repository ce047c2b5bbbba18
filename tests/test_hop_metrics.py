"""The histogram quantile the overhead bench reports interpolates like Prometheus does."""

from __future__ import annotations

import math

from bench.hop_metrics import delta, quantile


def test_quantile_interpolates_inside_the_bucket() -> None:
    buckets = {0.001: 10.0, 0.002: 30.0, 0.005: 40.0, float("inf"): 40.0}
    assert quantile(buckets, 0.25) == 0.001  # the 10th of 40 ends the first bucket
    assert math.isclose(quantile(buckets, 0.5), 0.0015)  # the 20th: halfway through (0.001, 0.002]
    assert math.isclose(quantile(buckets, 1.0), 0.005)


def test_empty_histogram_has_no_quantile() -> None:
    assert math.isnan(quantile({0.001: 0.0, float("inf"): 0.0}, 0.5))


def test_delta_removes_what_was_there_before() -> None:
    before = {("node-0", "node-1"): {0.001: 5.0, float("inf"): 6.0}}
    after = {("node-0", "node-1"): {0.001: 9.0, float("inf"): 12.0}, ("node-1", "node-2"): {0.001: 1.0}}
    assert delta(after, before) == {("node-0", "node-1"): {0.001: 4.0, float("inf"): 6.0},
                                    ("node-1", "node-2"): {0.001: 1.0}}
