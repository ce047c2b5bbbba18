"""A link's report is the best of its recent probe readings: one reading spoiled by shared traffic does not
move it, a real change does once the window has seen it, and a link that went down starts afresh."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest

from common.proto import splitmesh_pb2 as pb
from node_agent.config import NodeConfig
from node_agent.link_estimate import LinkEstimate, probe_bandwidth
from node_agent.link_probe import LinkProber, down_status
from node_agent.runtime import NodeRuntime

MBIT = 1e6


def test_one_low_bandwidth_reading_is_ignored_two_in_a_row_are_reported() -> None:
    est = LinkEstimate(bandwidth_window=2, rtt_window=5)
    assert est.add(200 * MBIT, 0.4) is None  # one reading is not enough to report
    assert est.add(43 * MBIT, 0.5) == (200 * MBIT, 0.4)  # a probe that shared the link with a prefill
    assert _bandwidth(est.add(198 * MBIT, 0.4)) == 198 * MBIT
    assert _bandwidth(est.add(20 * MBIT, 0.4)) == 198 * MBIT  # the link really dropped: not yet sure
    assert _bandwidth(est.add(21 * MBIT, 0.4)) == 21 * MBIT  # every reading in the window sees it


def test_a_spoiled_first_reading_is_never_reported() -> None:
    est = LinkEstimate(bandwidth_window=2, rtt_window=5)
    assert est.add(8 * MBIT, 30.0) is None  # the first probe overlapped a prefill on a 200 Mbit/s link
    assert est.add(200 * MBIT, 0.4) == (200 * MBIT, 0.4)


def _bandwidth(estimate: tuple[float, float] | None) -> float:
    assert estimate is not None
    return estimate[0]


def _rtt(estimate: tuple[float, float] | None) -> float:
    assert estimate is not None
    return estimate[1]


def test_rtt_is_the_lowest_of_the_window_and_a_lasting_rise_shows_after_it() -> None:
    est = LinkEstimate(bandwidth_window=2, rtt_window=3)
    est.add(50 * MBIT, 0.5)
    assert _rtt(est.add(50 * MBIT, 25.0)) == 0.5  # queued behind a prefill in the shaper
    assert _rtt(est.add(50 * MBIT, 30.0)) == 0.5
    assert _rtt(est.add(50 * MBIT, 20.0)) == 20.0  # three high readings: the path itself is slower now


def test_windows_of_one_report_the_latest_reading() -> None:
    est = LinkEstimate(bandwidth_window=1, rtt_window=1)
    assert est.add(100 * MBIT, 1.0) == (100 * MBIT, 1.0)
    assert est.add(10 * MBIT, 9.0) == (10 * MBIT, 9.0)


def test_empty_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LinkEstimate(bandwidth_window=0)
    with pytest.raises(ValueError, match="at least 1"):
        NodeConfig(probe_rtt_window=0)


def _prober(view: SimpleNamespace | None = None) -> LinkProber:
    """A prober of node a whose committed plan is ``view`` (default: a and b)."""
    view = view or SimpleNamespace(addresses={"a": "-", "b": "addr-b"})
    runtime = SimpleNamespace(node_id="a", plans=SimpleNamespace(committed=view),
                              config=SimpleNamespace(probe_bytes=1024, probe_bandwidth_window=2, probe_rtt_window=5))
    return LinkProber(cast(NodeRuntime, runtime))


def _reading(mbps: float, rtt_ms: float) -> pb.LinkStatus:
    return pb.LinkStatus(peer_id="b", bandwidth_bps=mbps * MBIT, rtt_ms=rtt_ms)


def test_the_prober_reports_the_estimate_not_the_latest_reading() -> None:
    async def run() -> None:  # the prober's change event needs a running loop
        prober = _prober()
        prober._record("b", "addr-b", _reading(200, 0.4))
        assert "b" not in prober.links  # one round is not enough: the orchestrator keeps its default link
        prober._record("b", "addr-b", _reading(43, 12.0))
        assert prober.links["b"].bandwidth_bps == 200 * MBIT and prober.links["b"].rtt_ms == pytest.approx(0.4)
        assert not prober.changed.is_set()  # no early report for a spoiled reading
    asyncio.run(run())


def test_a_link_that_went_down_forgets_its_old_readings() -> None:
    async def run() -> None:
        prober = _prober()
        prober._record("b", "addr-b", _reading(200, 0.4))
        prober._record("b", "addr-b", down_status("b"))
        assert prober.links["b"].bandwidth_bps == 0 and "b" in prober.down  # down is reported at once
        prober._record("b", "addr-b", _reading(20, 3.0))  # it came back over a slower path
        assert "b" not in prober.down and "b" not in prober.links  # back (not down), not measured enough yet
        prober._record("b", "addr-b", _reading(21, 3.5))
        assert prober.links["b"].bandwidth_bps == 21 * MBIT and prober.links["b"].rtt_ms == pytest.approx(3.0)
    asyncio.run(run())


def test_a_peer_that_left_the_plan_starts_afresh() -> None:
    async def run() -> None:
        view = SimpleNamespace(addresses={"a": "-", "b": "addr-b"})
        prober = _prober(view)
        prober._record("b", "addr-b", _reading(200, 0.4))
        view.addresses = {"a": "-"}
        assert prober.targets() == {}
        view.addresses = {"a": "-", "b": "addr-b2"}
        prober._record("b", "addr-b2", _reading(30, 2.0))
        assert "b" not in prober.links  # the 200 Mbit/s of its old path does not count
        prober._record("b", "addr-b2", _reading(31, 2.0))
        assert prober.links["b"].bandwidth_bps == 31 * MBIT
    asyncio.run(run())


def _through_shaper(size: int, rate_bps: float, burst: int, rtt_s: float) -> float:
    """Seconds a transfer of ``size`` bytes takes through a token bucket that starts full."""
    return rtt_s + max(0, size - burst) * 8 / rate_bps


def test_two_transfers_cancel_a_shapers_burst_where_one_reads_high() -> None:
    rate, burst, rtt, full = 50 * MBIT, 64 * 1024, 0.4e-3, 256 * 1024
    small_s, full_s = _through_shaper(full // 2, rate, burst, rtt), _through_shaper(full, rate, burst, rtt)
    single = full * 8 / (full_s - rtt)  # what one padded probe reads
    assert single > 1.3 * rate
    assert probe_bandwidth(full // 2, small_s, full, full_s, rtt) == pytest.approx(rate)


def test_too_close_to_time_apart_falls_back_to_the_larger_transfer() -> None:
    # a fast link: 128 KiB more takes 0.1 ms, well inside scheduling noise
    assert probe_bandwidth(128 * 1024, 1.0e-3, 256 * 1024, 1.1e-3, 0.5e-3) == pytest.approx(256 * 1024 * 8 / 0.6e-3)
    # the larger transfer came back first (noise): never a negative or infinite bandwidth
    assert probe_bandwidth(128 * 1024, 30e-3, 256 * 1024, 20e-3, 1e-3) == pytest.approx(256 * 1024 * 8 / 19e-3)
