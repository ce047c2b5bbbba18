"""The soak's memory verdict: a leak lifts what a node holds beyond its weights and caches, a bigger plan does not."""

from __future__ import annotations

from collections.abc import Sequence

from bench.soak import MemorySample, floor_trend, settled_floors

MB = 1_000_000


def _samples(rss_mb: Sequence[float], held_mb: Sequence[float | None]) -> list[MemorySample]:
    return [MemorySample(at=float(i), pid=1, rss=int(r * MB), held=None if h is None else int(h * MB))
            for i, (r, h) in enumerate(zip(rss_mb, held_mb, strict=True))]


def test_a_node_whose_plan_grows_is_stable() -> None:
    # 300 MB of weights and caches, then 600 after the plan gave it more layers: RSS rises, nothing leaks.
    rows = _samples([700] * 6 + [1000] * 6, [300] * 6 + [600] * 6)
    assert settled_floors(rows) == (400.0, 400.0, True)


def test_memory_left_behind_beyond_what_the_node_holds_is_a_leak() -> None:
    rows = _samples([700] * 8 + [900] * 4, [300] * 12)
    assert settled_floors(rows) == (400.0, 600.0, False)


def test_a_restarted_node_is_judged_from_when_it_hosts_again() -> None:
    # Idle after its restart (nothing held), then hosting: the idle samples are not its floor.
    rows = _samples([350] * 4 + [700] * 12, [0] * 4 + [300] * 12)
    assert settled_floors(rows) == (400.0, 400.0, True)
    assert settled_floors(rows[:10]) is None  # six samples of hosting: too short to tell


def test_samples_without_an_answer_are_left_out_and_a_process_without_reports_uses_its_rss() -> None:
    rows = _samples([700, 5000, 700, 700, 700, 700, 700, 5000, 700, 700, 700, 700],
                    [300, None, 300, 300, 300, 300, 300, None, 300, 300, 300, 300])
    floors = settled_floors(rows)
    assert floors is not None and floors[2]
    orchestrator = _samples([80] * 6 + [85] * 6, [None] * 12)
    assert settled_floors(orchestrator) == (80.0, 85.0, True)


def test_the_trend_shows_a_climb_and_not_a_wander() -> None:
    climbing = _samples([700 + 20 * i for i in range(12)], [300] * 12)
    assert floor_trend(climbing) == [400.0, 440.0, 480.0, 520.0, 560.0, 600.0]
    wandering = _samples([700, 760, 720, 700, 740, 700, 760, 700, 700, 740, 700, 760], [300] * 12)
    assert floor_trend(wandering) == [400.0] * 6


def test_the_sample_after_the_load_is_not_judged() -> None:
    """Memory the sessions held and gave back when they ended must not lower the last third's floor."""
    rows = _samples([700] * 6 + [900] * 6 + [450], [300] * 13)
    rows[-1].under_load = False
    assert settled_floors(rows) == (400.0, 600.0, False)
    assert floor_trend(rows) == [400.0, 400.0, 400.0, 600.0, 600.0, 600.0]
