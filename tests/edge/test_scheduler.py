"""The scheduler on virtual time: jitter bounds, no overlap, run_now, failures, cancellation."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from ems.edge.scheduler import Scheduler


class Job:
    """Records when each run started and ended, and how many ran at once."""

    def __init__(self, duration: float = 0.0, fail: bool = False) -> None:
        self.duration = duration
        self.fail = fail
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.active = 0
        self.most_active = 0
        self.cancelled = 0

    async def __call__(self) -> None:
        self.starts.append(trio.current_time())
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.duration:
                await trio.sleep(self.duration)
            if self.fail:
                raise ValueError(f"run {len(self.starts)} failed")
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
            self.ends.append(trio.current_time())


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("ems.edge.scheduler")
    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append  # type: ignore[method-assign]
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def run_for(scheduler: Scheduler, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await scheduler.run()


async def test_runs_stay_within_interval_plus_or_minus_jitter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = Job(duration=1.0)
    scheduler = Scheduler(rng=random.Random(7))
    scheduler.add("upload", 10.0, job, jitter_s=2.0)
    start = trio.current_time()
    await run_for(scheduler, 2000.0)
    assert len(job.starts) > 150
    gaps = [job.starts[0] - start] + [s - e for s, e in zip(job.starts[1:], job.ends, strict=False)]
    assert all(8.0 <= gap <= 12.0 for gap in gaps), (min(gaps), max(gaps))
    assert min(gaps) < 8.3
    assert max(gaps) > 11.7, "jitter is spread over the whole window"
    assert scheduler.runs("upload") == len(job.ends) - job.cancelled


async def test_default_jitter_is_a_tenth_of_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = Job()
    scheduler = Scheduler(rng=random.Random(1))
    scheduler.add("prune", 100.0, job)
    start = trio.current_time()
    await run_for(scheduler, 20_000.0)
    times = [start, *job.starts]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(90.0 <= gap <= 110.0 for gap in gaps)
    assert min(gaps) < 92.0
    assert max(gaps) > 108.0


async def test_jitter_comes_from_the_injected_rng(autojump_clock: trio.testing.MockClock) -> None:
    async def starts(seed: int) -> list[float]:
        job = Job()
        scheduler = Scheduler(rng=random.Random(seed))
        scheduler.add("job", 5.0, job, jitter_s=1.0)
        start = trio.current_time()
        await run_for(scheduler, 100.0)
        return [t - start for t in job.starts]

    assert await starts(3) == pytest.approx(await starts(3))
    assert await starts(3) != pytest.approx(await starts(4))


async def test_zero_jitter_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    job = Job(duration=0.5)
    scheduler = Scheduler()
    scheduler.add("tick", 2.0, job, jitter_s=0)
    start = trio.current_time()
    await run_for(scheduler, 10.0)
    assert [t - start for t in job.starts] == [2.0, 4.5, 7.0, 9.5]


async def test_a_run_that_overruns_delays_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = Job(duration=25.0)
    scheduler = Scheduler()
    scheduler.add("slow", 10.0, slow, jitter_s=0)
    start = trio.current_time()
    await run_for(scheduler, 149.0)
    assert slow.most_active == 1
    assert [t - start for t in slow.starts] == [10.0, 45.0, 80.0, 115.0]


async def test_run_now_runs_at_once_and_never_overlaps(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    job = Job(duration=5.0)
    scheduler = Scheduler()
    scheduler.add("ota_check", 3600.0, job, jitter_s=0)
    start = trio.current_time()
    await nursery.start(scheduler.run)
    await trio.sleep_until(start + 100.0)
    assert job.starts == []
    scheduler.run_now("ota_check")
    await trio.testing.wait_all_tasks_blocked()
    assert [t - start for t in job.starts] == [100.0]
    assert scheduler.is_running("ota_check")
    # asked three times during the run: one more run, right after this one
    for _ in range(3):
        scheduler.run_now("ota_check")
    await trio.sleep_until(start + 120.0)
    assert [t - start for t in job.starts] == [100.0, 105.0]
    assert job.most_active == 1
    # then the normal schedule resumes, counted from the end of the last run
    await trio.sleep_until(start + 3720.0)
    assert [t - start for t in job.starts] == [100.0, 105.0, 3710.0]


async def test_run_now_before_start_runs_first_thing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    job = Job()
    scheduler = Scheduler()
    scheduler.add("ota_check", 3600.0, job)
    scheduler.run_now("ota_check")
    start = trio.current_time()
    await run_for(scheduler, 10.0)
    assert [t - start for t in job.starts] == [0.0]


def test_run_now_of_an_unknown_job() -> None:
    with pytest.raises(KeyError):
        Scheduler().run_now("nope")


async def test_a_failing_job_is_logged_and_rescheduled(
    autojump_clock: trio.testing.MockClock, records: list[logging.LogRecord]
) -> None:
    bad = Job(fail=True)
    good = Job()
    scheduler = Scheduler()
    scheduler.add("bad", 1.0, bad, jitter_s=0)
    scheduler.add("good", 1.0, good, jitter_s=0)
    await run_for(scheduler, 5.5)
    assert len(bad.starts) == len(good.starts) == 5
    assert scheduler.failures("bad") == 5
    assert scheduler.runs("bad") == 5
    assert scheduler.failures("good") == 0
    failed = [r for r in records if r.getMessage() == "job_failed"]
    assert len(failed) == 5
    assert all(r.fields["job"] == "bad" for r in failed)  # type: ignore[attr-defined]
    assert failed[0].exc_info is not None
    assert isinstance(failed[0].exc_info[1], ValueError)


async def test_a_failing_job_group_is_caught_too(autojump_clock: trio.testing.MockClock) -> None:
    async def nursery_job() -> None:
        async def boom() -> None:
            raise KeyError("x")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(boom)

    scheduler = Scheduler()
    scheduler.add("grouped", 1.0, nursery_job, jitter_s=0)
    await run_for(scheduler, 3.5)
    assert scheduler.failures("grouped") == 3


async def test_cancellation_stops_a_running_job_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    long = Job(duration=100.0)
    scheduler = Scheduler()
    scheduler.add("long", 1.0, long, jitter_s=0)
    start = trio.current_time()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(scheduler.run)
            await trio.sleep_until(start + 50.0)
            assert scheduler.is_running("long")
            scope.cancel()
    assert scope.cancelled_caught
    assert long.cancelled == 1, "the job saw Cancelled and let it through"
    assert long.active == 0
    assert scheduler.runs("long") == 0
    assert not scheduler.is_running("long")


async def test_a_job_that_swallows_nothing_cannot_keep_the_scheduler_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`except Exception` in the scheduler must not catch Cancelled: a cancelled run ends the
    job's task instead of scheduling another one."""
    job = Job(duration=10.0)
    scheduler = Scheduler()
    scheduler.add("job", 1.0, job, jitter_s=0)
    await run_for(scheduler, 5.0)
    assert len(job.starts) == 1
    assert job.cancelled == 1


async def test_set_interval_moves_the_next_run(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, records: list[logging.LogRecord]
) -> None:
    job = Job()
    scheduler = Scheduler()
    scheduler.add("upload", 3600.0, job, jitter_s=0)
    start = trio.current_time()
    await nursery.start(scheduler.run)
    await trio.sleep_until(start + 30.0)
    assert scheduler.set_interval("upload", 60.0)
    await trio.sleep_until(start + 130.0)
    assert [t - start for t in job.starts] == [60.0, 120.0]
    assert scheduler.interval("upload") == 60.0
    # shortening below the time already waited runs at once
    await trio.sleep_until(start + 160.0)  # the last run at 120
    scheduler.set_interval("upload", 10.0)
    await trio.testing.wait_all_tasks_blocked()
    assert [t - start for t in job.starts] == [60.0, 120.0, 160.0]
    assert not scheduler.set_interval("nope", 5.0)
    assert any(r.getMessage() == "scheduler_unknown_job" for r in records)


async def test_jobs_added_while_running_start_too(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    early, late = Job(), Job()
    scheduler = Scheduler()
    scheduler.add("early", 5.0, early, jitter_s=0)
    start = trio.current_time()
    await nursery.start(scheduler.run)
    await trio.sleep_until(start + 2.0)
    scheduler.add("late", 5.0, late, jitter_s=0)
    await trio.sleep_until(start + 11.5)
    assert [t - start for t in early.starts] == [5.0, 10.0]
    assert [t - start for t in late.starts] == [7.0]
    assert scheduler.job_names == ["early", "late"]


def test_bad_jobs_are_refused() -> None:
    async def job() -> None:
        pass

    scheduler = Scheduler()
    scheduler.add("a", 1.0, job)
    with pytest.raises(ValueError, match="exists already"):
        scheduler.add("a", 1.0, job)
    with pytest.raises(ValueError, match="positive"):
        scheduler.add("b", 0, job)
    with pytest.raises(ValueError, match="finite"):
        scheduler.add("c", float("nan"), job)
    with pytest.raises(ValueError, match="positive"):
        scheduler.add("d", 1.0, job, jitter_s=-1)


async def test_run_twice_at_once_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    scheduler = Scheduler()
    await nursery.start(scheduler.run)
    with pytest.raises(RuntimeError, match="already running"):
        await scheduler.run()


async def test_set_interval_during_a_run_applies_from_its_end(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    job = Job(duration=10.0)
    scheduler = Scheduler()
    scheduler.add("upload", 100.0, job, jitter_s=0)
    start = trio.current_time()
    await nursery.start(scheduler.run)
    await trio.sleep_until(start + 105.0)
    assert scheduler.is_running("upload")
    scheduler.set_interval("upload", 20.0)
    await trio.sleep_until(start + 165.0)
    assert [t - start for t in job.starts] == [100.0, 130.0, 160.0]
