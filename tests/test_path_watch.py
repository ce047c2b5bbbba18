"""The head's verdict on a waiting step's path: busy is not stuck, silent or idle too long is."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc

from node_agent.path_watch import PathWatch, PeerProbes, PeerReading

VIEW = SimpleNamespace(segments=[SimpleNamespace(node_id=n) for n in ("head", "mid", "tail", "head")],
                       addresses={"head": "h:1", "mid": "m:1", "tail": "t:1"})


def _watch(timeout_s: float, own: list[int]) -> PathWatch:
    return PathWatch(VIEW, "head", lambda: own[0], timeout_s)  # type: ignore[arg-type]


def test_a_path_whose_counts_move_is_never_stuck() -> None:
    own = [0]
    watch = _watch(0.2, own)
    assert watch.peers == ["mid", "tail"]
    deadline = time.monotonic() + 0.8
    rounds = 0
    while time.monotonic() < deadline:  # four timeouts long, but the tail finishes a round now and then
        rounds += 1
        now = time.monotonic()
        watch.observe({"mid": PeerReading(7, now), "tail": PeerReading(rounds, now)})
        assert watch.stuck() is None
        time.sleep(0.05)
    assert watch.silent == []


def test_a_path_that_finishes_no_work_for_the_timeout_is_stuck() -> None:
    own = [3]
    watch = _watch(0.2, own)
    watch.observe({"mid": PeerReading(7, time.monotonic()), "tail": PeerReading(9, time.monotonic())})
    time.sleep(0.1)
    own[0] = 4  # the head's own round counts as progress
    watch.observe({"mid": PeerReading(7, time.monotonic()), "tail": PeerReading(9, time.monotonic())})
    time.sleep(0.15)
    assert watch.stuck() is None
    time.sleep(0.1)
    reason = watch.stuck()
    assert reason is not None and "finished any work" in reason
    error = PathWatch.error(reason, 1.5)
    assert error.code == grpc.StatusCode.UNAVAILABLE and "no token from the ring after 1.5s" in error.details


def test_a_silent_node_is_named_at_once_and_fails_the_step_after_the_timeout() -> None:
    own = [0]
    watch = _watch(0.2, own)
    assert watch.silent is None  # no verdict before every peer was read
    watch.observe({"mid": PeerReading(None, time.monotonic())})
    assert watch.silent is None
    rounds = 0
    while True:
        rounds += 1  # the tail keeps working for other sessions: progress, but mid stays silent
        watch.observe({"mid": PeerReading(None, time.monotonic()), "tail": PeerReading(rounds, time.monotonic())})
        assert watch.silent == ["mid"]
        reason = watch.stuck()
        if reason is not None:
            break
        time.sleep(0.05)
    assert reason.startswith("mid has not answered")
    watch.observe({"mid": PeerReading(5, time.monotonic()), "tail": PeerReading(rounds + 1, time.monotonic())})
    assert watch.silent == [] and watch.stuck() is None  # it answers again


def test_probes_are_shared_by_every_waiting_step() -> None:
    calls: list[tuple[str, str]] = []

    async def probe(peer: str, address: str) -> int | None:
        calls.append((peer, address))
        await asyncio.sleep(0.05)
        return None if peer == "mid" else 11

    async def main() -> None:
        probes = PeerProbes(probe, interval_s=0.3)
        readings = await asyncio.gather(*(probes.read_all(VIEW, ["mid", "tail"]) for _ in range(50)))  # type: ignore[arg-type]
        assert sorted(calls) == [("mid", "m:1"), ("tail", "t:1")]  # one probe per peer for 50 waiting steps
        assert all(r["mid"].rounds is None and r["tail"].rounds == 11 for r in readings)
        await probes.read_all(VIEW, ["tail"])  # type: ignore[arg-type]
        assert len(calls) == 2  # a fresh reading is reused within the interval
        await asyncio.sleep(0.35)
        waiter = asyncio.ensure_future(probes.read("tail", "t:1"))
        await asyncio.sleep(0.01)
        waiter.cancel()  # one step giving up does not cancel the probe others may wait on
        assert (await probes.read("tail", "t:1")).rounds == 11
        assert len(calls) == 3

    asyncio.run(main())
