"""Decode rows of many sessions as one forward: each row equals its session run alone; a row alone is exact."""

from __future__ import annotations

import asyncio
import copy
import gc
import time
import weakref

import pytest
import torch
from prometheus_client import REGISTRY
from transformers.cache_utils import DynamicCache, DynamicLayer

from common.config import ConfigError
from common.model_store import StoredModel
from common.spans import Span
from node_agent.admission import BatchAdmission, SessionLimitError
from node_agent.batched_cache import SessionCache, settle
from node_agent.compute import ComputeThread, DueRow
from node_agent.config import NodeConfig
from node_agent.sampler import SamplingConfig
from node_agent.segment import SegmentRunner
from node_agent.step_batcher import Job, StepBatcher, StepJob, StepResult

PROMPT_LENGTHS = (3, 17, 9, 1)


@pytest.fixture(scope="module")
def runners(embedded: StoredModel) -> tuple[SegmentRunner, SegmentRunner]:
    """Two local segments of one node (head with a 4-layer span, then the rest with the head): the whole model."""
    return SegmentRunner(embedded, Span(0, 4)), SegmentRunner(embedded, Span(4, 30))


def _prefilled(runners: tuple[SegmentRunner, ...], length: int, seed: int) -> tuple[SessionCache, ...]:
    caches = tuple(r.new_cache() for r in runners)
    hidden: torch.Tensor = torch.randint(0, 5000, (1, length), generator=torch.Generator().manual_seed(seed))
    for runner, cache in zip(runners, caches, strict=True):
        hidden = runner.run(cache, hidden, 0)
    return caches


def _job(runners: tuple[SegmentRunner, ...], caches: tuple[DynamicCache, ...], token: int, position: int,
         sampling: SamplingConfig | None = None, step: int = 0) -> StepJob:
    job = StepJob(runners, caches, torch.tensor([[token]]), position, sampling, step)
    assert job.future.set_running_or_notify_cancel()
    return job


def _results(jobs: list[StepJob]) -> list[StepResult]:
    return [job.future.result(timeout=0) for job in jobs]


def _sessions(runners: tuple[SegmentRunner, ...]) -> list[tuple[SessionCache, ...]]:
    return [_prefilled(runners, length, seed) for seed, length in enumerate(PROMPT_LENGTHS)]


def test_batched_decode_equals_each_session_alone(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """Rows of different history lengths in one forward: each row's hidden state, logits and grown cache match
    that session run alone (to batched-matmul rounding), and the greedy token is the same."""
    solo, batched = _sessions(runners), _sessions(runners)
    tokens = [11, 222, 3333, 44]
    alone = [StepBatcher(1) for _ in solo]
    solo_jobs = [_job(runners, c, t, n) for c, t, n in zip(solo, tokens, PROMPT_LENGTHS, strict=True)]
    for batcher, job in zip(alone, solo_jobs, strict=True):
        batcher.run_round([job])
    batch_jobs = [_job(runners, c, t, n) for c, t, n in zip(batched, tokens, PROMPT_LENGTHS, strict=True)]
    StepBatcher(8).run_round(list(batch_jobs))
    last = runners[-1]
    for one, many in zip(_results(solo_jobs), _results(batch_jobs), strict=True):
        assert isinstance(one, torch.Tensor) and isinstance(many, torch.Tensor)
        assert many.shape == one.shape == (1, 1, last.hidden_size)
        torch.testing.assert_close(last.last_logits(many), last.last_logits(one), rtol=0, atol=1e-3)
        assert int(last.last_logits(many).argmax()) == int(last.last_logits(one).argmax())
    for one_caches, many_caches, length in zip(solo, batched, PROMPT_LENGTHS, strict=True):
        for one_cache, many_cache in zip(one_caches, many_caches, strict=True):
            assert many_cache.get_seq_length() == one_cache.get_seq_length() == length + 1
            settle(many_cache)  # the decode group held the batch's history: each session holds its own again
            assert many_cache.get_seq_length() == length + 1
            for a, b in zip(one_cache.layers, many_cache.layers, strict=True):
                assert isinstance(a, DynamicLayer) and isinstance(b, DynamicLayer)
                torch.testing.assert_close(b.keys, a.keys, rtol=0, atol=1e-4)
                torch.testing.assert_close(b.values, a.values, rtol=0, atol=1e-4)


def test_waiting_decode_rows_share_forwards_of_at_most_max_rows(
        runners: tuple[SegmentRunner, SegmentRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    """Five decode rows and a prefill waiting together: forwards of 2, 2 and 1 rows, the prefill alone."""
    sizes: list[int] = []
    for runner in runners:
        batched, alone = runner.run_batch_timed, runner.run_timed

        def count_batch(caches: list[DynamicCache], inputs: torch.Tensor, positions: list[int],
                        _run: object = batched, _runner: SegmentRunner = runner) -> tuple[torch.Tensor, float]:
            if _runner is runners[0]:
                sizes.append(len(caches))
            return _run(caches, inputs, positions)  # type: ignore[operator, no-any-return]

        def count_alone(cache: DynamicCache, inputs: torch.Tensor, position: int,
                        _run: object = alone, _runner: SegmentRunner = runner) -> tuple[torch.Tensor, float]:
            if _runner is runners[0]:
                sizes.append(-int(inputs.shape[1]))  # negative: run alone, with this many rows
            return _run(cache, inputs, position)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(runner, "run_batch_timed", count_batch)
        monkeypatch.setattr(runner, "run_timed", count_alone)
    sessions = [_prefilled(runners, 4, seed) for seed in range(6)]
    jobs = [_job(runners, c, 7, 4) for c in sessions[:5]]
    prefill = StepJob(runners, sessions[5], torch.tensor([[5, 6, 7]]), 4)
    assert prefill.future.set_running_or_notify_cancel()
    sizes.clear()  # the prefills above ran alone too
    StepBatcher(2).run_round([jobs[0], prefill, *jobs[1:]])
    assert sizes == [2, -3, 2, -1]
    assert all(isinstance(r, torch.Tensor) for r in _results([*jobs, prefill]))


def test_first_prefill_chunks_that_start_together_share_one_forward_and_equal_each_alone(
        runners: tuple[SegmentRunner, SegmentRunner], monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of 9, 12, 7 and 11 tokens waiting together (and a 40-token one that would pad them too much):
    one right-padded forward for the four, the long one alone; every session's hidden states, caches and next
    decode step match that session run alone (to batched-matmul rounding), and the greedy tokens agree."""
    lengths, long = (9, 12, 7, 11), 40
    prompts = [torch.randint(0, 5000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (*lengths, long)]
    forwards: list[int] = []
    batched = runners[0].run_prefill_batch_timed

    def count(caches: list[DynamicCache], inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        forwards.append(len(caches))
        return batched(caches, inputs)

    monkeypatch.setattr(runners[0], "run_prefill_batch_timed", count)
    alone_caches = [tuple(r.new_cache() for r in runners) for _ in prompts]
    together_caches = [tuple(r.new_cache() for r in runners) for _ in prompts]
    alone = [StepJob(runners, c, p, 0) for c, p in zip(alone_caches, prompts, strict=True)]
    together = [StepJob(runners, c, p, 0) for c, p in zip(together_caches, prompts, strict=True)]
    for job in (*alone, *together):
        assert job.future.set_running_or_notify_cancel()
    for job in alone:
        StepBatcher(1).run_round([job])
    assert forwards == []
    StepBatcher(8).run_round([together[0], together[4], *together[1:4]])
    assert forwards == [4]  # the 40-token prompt (3x the padding it would add) ran alone
    last = runners[-1]
    for one, many, n in zip(_results(alone), _results(together), (*lengths, long), strict=True):
        assert isinstance(one, torch.Tensor) and isinstance(many, torch.Tensor)
        assert many.shape == one.shape == (1, n, last.hidden_size)
        torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-3)  # hidden states reach ~300
        assert int(last.last_logits(many).argmax()) == int(last.last_logits(one).argmax())
    decode_alone = [_job(runners, c, 42, n) for c, n in zip(alone_caches, (*lengths, long), strict=True)]
    decode_together = [_job(runners, c, 42, n) for c, n in zip(together_caches, (*lengths, long), strict=True)]
    for job in decode_alone:
        StepBatcher(1).run_round([job])
    for job in decode_together:  # alone too: the history the batched prefill left is the session's own
        StepBatcher(1).run_round([job])
    for one, many in zip(_results(decode_alone), _results(decode_together), strict=True):
        assert isinstance(one, torch.Tensor) and isinstance(many, torch.Tensor)
        torch.testing.assert_close(last.last_logits(many), last.last_logits(one), rtol=0, atol=1e-3)
        assert int(last.last_logits(many).argmax()) == int(last.last_logits(one).argmax())
    for one_caches, many_caches, n in zip(alone_caches, together_caches, (*lengths, long), strict=True):
        for a_cache, b_cache in zip(one_caches, many_caches, strict=True):
            assert b_cache.get_seq_length() == a_cache.get_seq_length() == n + 1


def test_the_tail_samples_every_session_of_a_batched_prefill(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    prompts = [torch.randint(0, 5000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 6, 4)]
    greedy = SamplingConfig()
    alone = [StepJob(runners, tuple(r.new_cache() for r in runners), p, 0, greedy) for p in prompts]
    together = [StepJob(runners, tuple(r.new_cache() for r in runners), p, 0, greedy) for p in prompts]
    for job in (*alone, *together):
        assert job.future.set_running_or_notify_cancel()
    for job in alone:
        StepBatcher(1).run_round([job])
    StepBatcher(8).run_round(list(together))
    assert _results(together) == _results(alone) and all(isinstance(t, int) for t in _results(together))


def test_a_row_alone_and_strict_mode_keep_the_exact_single_session_path(
        runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """Batch size 1 (a lone row, or max_rows=1 with rows waiting together) is bit-identical to run_timed."""
    sessions = _sessions(runners)
    reference = copy.deepcopy(sessions)
    jobs = [_job(runners, c, 99, n) for c, n in zip(sessions, PROMPT_LENGTHS, strict=True)]
    StepBatcher(1).run_round(list(jobs[:3]))
    StepBatcher(16).run_round([jobs[3]])
    for job, caches, length in zip(jobs, reference, PROMPT_LENGTHS, strict=True):
        hidden: torch.Tensor = torch.tensor([[99]])
        for runner, cache in zip(runners, caches, strict=True):
            hidden = runner.run(cache, hidden, length)
        result = job.future.result(timeout=0)
        assert isinstance(result, torch.Tensor) and torch.equal(result, hidden)


def test_seeded_sampling_is_the_same_whoever_shares_the_batch(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    sampling = SamplingConfig(temperature=0.8, top_p=0.95, top_k=50, seed=1234)

    def sampled(companions: int) -> list[int]:
        mine = _prefilled(runners, 12, seed=77)
        others = [_prefilled(runners, 5 + 9 * i, seed=i) for i in range(companions)]
        token, out = 42, []
        for step in range(6):
            job = _job(runners, mine, token, 12 + step, sampling, step)
            other_jobs = [_job(runners, c, 3 + i, 5 + 9 * i + step, SamplingConfig(temperature=1.0, seed=i), step)
                          for i, c in enumerate(others)]
            StepBatcher(8).run_round([*other_jobs, job])
            result = job.future.result(timeout=0)
            assert isinstance(result, int)
            token = result
            out.append(token)
        return out

    alone = sampled(0)
    assert sampled(3) == alone
    assert sampled(1) == alone


def test_a_decode_group_persists_across_steps_and_sessions_leave_and_rejoin(
        runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """Six decode steps of four sessions, rows in a new order each step, one session running alone at step 3:
    every row stays equal to its session run alone throughout, the group is kept while its members are the
    same, and it is freed with its sessions."""
    solo, batched = _sessions(runners), _sessions(runners)
    feed = [[11 + 97 * step + 13 * s for step in range(6)] for s in range(len(PROMPT_LENGTHS))]
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 0, 3, 1], [1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]]
    groups = []
    for step, order in enumerate(orders):
        expected = {}
        for s, (caches, length) in enumerate(zip(solo, PROMPT_LENGTHS, strict=True)):
            job = _job(runners, caches, feed[s][step], length + step)
            StepBatcher(1).run_round([job])
            expected[s] = job.future.result(timeout=0)
        jobs = {s: _job(runners, batched[s], feed[s][step], PROMPT_LENGTHS[s] + step) for s in order}
        if step == 3:
            jobs[0] = _job(runners, batched[0], feed[0][step], PROMPT_LENGTHS[0] + step)
            StepBatcher(1).run_round([jobs[0]])  # alone: its group is dissolved first
        StepBatcher(8).run_round([jobs[s] for s in order])
        for s, job in jobs.items():
            got, want = job.future.result(timeout=0), expected[s]
            assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
        groups.append(batched[1][0].group)
    assert groups[0] is not None and groups[0] is groups[1] is groups[2]  # same members: kept, in any order
    assert groups[3] is not groups[2] and groups[4] is not groups[3] and groups[4] is groups[5]
    for caches, length in zip(batched, PROMPT_LENGTHS, strict=True):
        assert caches[0].get_seq_length() == length + 6
    freed = weakref.ref(groups[5])
    del groups, batched, jobs, job, caches
    gc.collect()
    assert freed() is None


def test_a_grouped_session_keeps_its_history_once(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """While sessions decode in a group, the group's buffers are their only copy of the history (the stale own
    copy would double KV memory); settling gives each session its whole history back."""
    solo, batched = _sessions(runners), _sessions(runners)
    own_before = [c.kv_bytes() for c in batched[0]]
    jobs = [_job(runners, caches, 8, n) for caches, n in zip(batched, PROMPT_LENGTHS, strict=True)]
    StepBatcher(8).run_round(list[Job](jobs))
    for caches in batched:
        for cache in caches:
            assert cache.group is not None
            assert all(_own(layer)[0].numel() == 0 and _own(layer)[1].numel() == 0 for layer in cache.layers)
            assert cache.kv_bytes() >= own_before[0] // 2  # its row of the group's buffers, headroom included
    for caches, n in zip(solo, PROMPT_LENGTHS, strict=True):
        StepBatcher(1).run_round([_job(runners, caches, 8, n)])
    for grouped, alone in zip(batched, solo, strict=True):
        for cache, reference in zip(grouped, alone, strict=True):
            settle(cache)
            assert cache.group is None and cache.get_seq_length() == reference.get_seq_length()
            for layer, want in zip(cache.layers, reference.layers, strict=True):
                torch.testing.assert_close(_own(layer), _own(want), rtol=1e-3, atol=1e-3)


def _own(layer: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A session cache layer's own keys and values."""
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def test_sessions_whose_first_step_is_one_token_decode_together(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """One-token prompts: empty caches batched from position 0, two steps, then each alone: equal to solo."""
    solo = [tuple(r.new_cache() for r in runners) for _ in range(3)]
    batched = [tuple(r.new_cache() for r in runners) for _ in range(3)]
    for step in range(3):
        expected = []
        for s, caches in enumerate(solo):
            job = _job(runners, caches, 100 + 7 * s + step, step)
            StepBatcher(1).run_round([job])
            expected.append(job.future.result(timeout=0))
        jobs = [_job(runners, caches, 100 + 7 * s + step, step) for s, caches in enumerate(batched)]
        StepBatcher(8 if step < 2 else 1).run_round(list[Job](jobs))  # the third step runs each session alone
        for job, want in zip(jobs, expected, strict=True):
            got = job.future.result(timeout=0)
            assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert all(c.get_seq_length() == 3 and c.group is None for caches in batched for c in caches)


def test_compute_thread_batches_steps_waiting_together(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """Steps submitted while the thread is busy form one round and share a forward; a cancelled one never runs."""
    compute = ComputeThread(max_batch_rows=8)
    sessions = [_prefilled(runners, n, seed) for seed, n in enumerate(PROMPT_LENGTHS)]
    solo = copy.deepcopy(sessions)
    dropped_caches = _prefilled(runners, 2, 9)
    forwards_before = REGISTRY.get_sample_value("splitmesh_agent_batch_rows_count") or 0.0

    async def scenario() -> list[StepResult]:
        blocker = asyncio.ensure_future(compute.run(time.sleep, 0.3))
        await asyncio.sleep(0.05)  # the thread is busy: everything below waits for the same round
        steps = [asyncio.ensure_future(compute.step(StepJob(runners, c, torch.tensor([[8]]), n)))
                 for c, n in zip(sessions, PROMPT_LENGTHS, strict=True)]
        dropped = asyncio.ensure_future(compute.step(StepJob(runners, dropped_caches, torch.tensor([[8]]), 2)))
        await asyncio.sleep(0)
        dropped.cancel()
        await blocker
        return list(await asyncio.gather(*steps))

    try:
        results = asyncio.run(scenario())
    finally:
        compute.shutdown()
    assert (REGISTRY.get_sample_value("splitmesh_agent_batch_rows_count") or 0.0) == forwards_before + 1
    assert dropped_caches[0].get_seq_length() == 2  # the cancelled step never touched its cache
    for result, caches, length in zip(results, solo, PROMPT_LENGTHS, strict=True):
        expected = _job(runners, caches, 8, length)
        StepBatcher(1).run_round([expected])
        alone = expected.future.result(timeout=0)
        assert isinstance(result, torch.Tensor) and isinstance(alone, torch.Tensor)
        torch.testing.assert_close(result, alone, rtol=1e-3, atol=1e-3)  # hidden states reach ~1e2


def test_an_idle_compute_thread_keeps_nothing_of_its_last_round(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """A node taken out of the plan runs no further round: its last round's jobs (their caches, and through
    their runners the weights of segments it released) must be freed all the same."""
    compute = ComputeThread(max_batch_rows=8)
    caches: list[tuple[SessionCache, ...]] = [_prefilled(runners, n, seed) for seed, n in enumerate(PROMPT_LENGTHS)]
    refs = [weakref.ref(cache) for session in caches for cache in session]

    async def scenario() -> None:
        await asyncio.gather(*(compute.step(StepJob(runners, c, torch.tensor([[8]]), n))
                               for c, n in zip(caches, PROMPT_LENGTHS, strict=True)))

    try:
        asyncio.run(scenario())
        caches.clear()
        deadline = time.monotonic() + 5
        while any(ref() is not None for ref in refs) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert [ref() for ref in refs if ref() is not None] == []
    finally:
        compute.shutdown()


def _staggered(jobs: list[StepJob], gather_s: float) -> int:
    """``jobs`` reaching an idle compute thread 3 ms apart (sessions putting their rows a few ms apart):
    how many forwards they took."""
    compute = ComputeThread(max_batch_rows=8, gather_s=gather_s, expected_rows=lambda: len(jobs))
    forwards: list[int] = []

    async def scenario() -> None:
        steps = []
        for job in jobs:
            job.on_done = lambda *_: forwards.append(1)
            steps.append(asyncio.ensure_future(compute.step(job)))
            await asyncio.sleep(0.003)
        await asyncio.gather(*steps)

    try:
        asyncio.run(scenario())
    finally:
        compute.shutdown()
    return len(forwards)


def _staggered_forwards(runners: tuple[SegmentRunner, SegmentRunner], gather_s: float) -> int:
    """Four decode rows, 3 ms apart."""
    return _staggered([StepJob(runners, caches, torch.tensor([[8]]), length) for caches, length in
                       zip((_prefilled(runners, n, seed) for seed, n in enumerate(PROMPT_LENGTHS)), PROMPT_LENGTHS,
                           strict=True)], gather_s)


def test_rows_arriving_apart_are_gathered_into_one_forward(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    """With a gather window the staggered rows share one round; without it the first runs alone."""
    assert _staggered_forwards(runners, gather_s=0.2) == 1
    assert _staggered_forwards(runners, gather_s=0.0) >= 2


def _staggered_prefill_forwards(runners: tuple[SegmentRunner, SegmentRunner], gather_s: float) -> int:
    """Four first prefill chunks of 6-9 tokens, 3 ms apart (a batched prefill upstream, sent on per session)."""
    prompts = [torch.randint(0, 5000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (6, 9, 7, 8)]
    return _staggered([StepJob(runners, tuple(r.new_cache() for r in runners), p, 0) for p in prompts], gather_s)


def test_first_prefill_chunks_arriving_apart_are_gathered_into_one_forward(
        runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    assert _staggered_prefill_forwards(runners, gather_s=0.2) == 1
    assert _staggered_prefill_forwards(runners, gather_s=0.0) >= 2


def _head_sessions(runners: tuple[SegmentRunner, SegmentRunner]) -> tuple[StepJob, StepJob, StepJob, DueRow]:
    """Session A's decode row, and two consecutive decode rows of a merging session B (one DueRow)."""
    a_caches, b_caches = _prefilled(runners, 3, 0), _prefilled(runners, 5, 1)
    due = DueRow()
    b1, b2 = (StepJob(runners, b_caches, torch.tensor([[8]]), position) for position in (5, 6))
    b1.due = b2.due = due
    return StepJob(runners, a_caches, torch.tensor([[8]]), 3), b1, b2, due


def _merged_forwards(runners: tuple[SegmentRunner, SegmentRunner], merge_s: float) -> int:
    """B's step runs (then its token is in the ring); A's row waits; B's token comes home 60 ms later, far past
    the gather window, and B puts its next row: how many forwards A's and B's next rows took."""
    compute = ComputeThread(max_batch_rows=8, gather_s=0.008, expected_rows=lambda: 2, merge_s=merge_s)
    a, b1, b2, due = _head_sessions(runners)
    forwards: list[int] = []

    async def scenario() -> None:
        await compute.step(b1)
        a.on_done = b2.on_done = lambda *_: forwards.append(1)
        first = asyncio.ensure_future(compute.step(a))
        await asyncio.sleep(0.06)
        compute.row_back(due)
        await asyncio.gather(first, compute.step(b2))

    try:
        asyncio.run(scenario())
    finally:
        compute.shutdown()
    return len(forwards)


def test_a_merging_head_waits_for_rows_still_in_the_ring(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    assert _merged_forwards(runners, merge_s=1.0) == 1
    assert _merged_forwards(runners, merge_s=0.0) == 2


@pytest.mark.parametrize("token_home", [False, True])
def test_a_merge_wait_ends_when_the_due_row_will_not_come(runners: tuple[SegmentRunner, SegmentRunner],
                                                          token_home: bool) -> None:
    """B ends while its step is in the ring; or its token is home but its client reads slowly, so its next row is
    late: the others wait at most a gather window, not the 30 s merge bound."""
    compute = ComputeThread(max_batch_rows=8, gather_s=0.05, expected_rows=lambda: 2, merge_s=30.0)
    a, b1, _, due = _head_sessions(runners)

    async def scenario() -> float:
        await compute.step(b1)
        if token_home:
            compute.row_back(due)  # and its row never comes
        started = time.monotonic()
        step = asyncio.ensure_future(compute.step(a))
        await asyncio.sleep(0.1)
        if not token_home:
            compute.forget(due)  # the session ended
        await step
        return time.monotonic() - started

    try:
        assert asyncio.run(scenario()) < 5.0
    finally:
        compute.shutdown()


def test_merging_follows_the_setting_and_the_plan_hosts() -> None:
    assert NodeConfig().merges(shared_host=True) and not NodeConfig().merges(shared_host=False)
    assert NodeConfig(merge_micro_batches="on").merges(shared_host=False)
    assert not NodeConfig(merge_micro_batches="off").merges(shared_host=True)
    assert not NodeConfig(strict_batching=True).merges(shared_host=True)
    with pytest.raises(ConfigError):
        NodeConfig(merge_micro_batches="sometimes")


def test_a_lone_session_never_waits_for_company(runners: tuple[SegmentRunner, SegmentRunner]) -> None:
    compute = ComputeThread(max_batch_rows=8, gather_s=5.0, expected_rows=lambda: 1)
    caches = _prefilled(runners, 3, 0)
    try:
        started = time.monotonic()
        asyncio.run(compute.step(StepJob(runners, caches, torch.tensor([[8]]), 3)))
        assert time.monotonic() - started < 2.0  # far below the 5 s window
    finally:
        compute.shutdown()


def test_head_admission_limits_generations_and_pending_prefill_tokens() -> None:
    admission = BatchAdmission("node-0", max_rows=2, max_queued=1, max_pending_tokens=100)
    for session in ("a", "b", "c"):
        admission.admit(session)
    with pytest.raises(SessionLimitError, match="3 generations"):
        admission.admit("d")
    admission.owe("a", 60)
    with pytest.raises(SessionLimitError, match="max_batch_tokens"):
        admission.owe("b", 41)
    admission.owe("b", 40)
    admission.prefilled("a")
    admission.owe("c", 60)
    assert admission.pending_tokens() == 100
    admission.leave("b")
    admission.admit("d")
    assert len(admission) == 3 and admission.pending_tokens() == 60


def test_strict_batching_overrides_rows_and_chunks() -> None:
    assert (NodeConfig().batch_rows, NodeConfig().prefill_chunk) == (32, 256)
    strict = NodeConfig(strict_batching=True, max_batch_rows=16, prefill_chunk_tokens=64)
    assert (strict.batch_rows, strict.prefill_chunk) == (1, 0)
    with pytest.raises(ConfigError, match="max_batch_rows"):
        NodeConfig(max_batch_rows=0)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        NodeConfig(max_batch_tokens=100)
