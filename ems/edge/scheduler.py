"""Named periodic jobs (history upload, history pruning, OTA check), each in its own task.

Theory of operation. `Scheduler.run` owns one nursery and one task per job. A job's task sleeps
`interval ± jitter` (uniform, from the injected `random.Random`), runs the job to completion, and
measures the next sleep from when that run *ended*: two runs of one job never overlap, and a run
that overruns delays the next one instead of stacking up behind it. The first run comes one
`interval ± jitter` after the job starts, so a fleet started together spreads out.

`run_now(name)` asks for a run at once (e.g. an OTA check right after reconnecting). If the job is
running, the request waits for that run to end and then runs it once more; several requests in
the meantime make one run. `set_interval(name, seconds)` moves a waiting job's next run to
`seconds ± jitter` after its last one.

A job that raises is logged with its name and traceback and scheduled again as usual; only
`trio.Cancelled` (and other BaseExceptions) leave the job's task, so shutdown, which cancels the
scheduler's nursery, stops every job at its next checkpoint.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from ems.logs import get_logger

log = get_logger("ems.edge.scheduler")

Job = Callable[[], Awaitable[object]]
DEFAULT_JITTER_SHARE = 0.1


@attrs.define(eq=False)
class _Entry:
    name: str
    job: Job
    interval_s: float
    jitter_s: float | None
    """None: DEFAULT_JITTER_SHARE of the interval (follows set_interval)."""
    run_requested: bool = False
    rescheduled: bool = False
    running: bool = False
    runs: int = 0
    failures: int = 0
    wake: trio.Event = attrs.field(factory=trio.Event)

    @property
    def jitter(self) -> float:
        return DEFAULT_JITTER_SHARE * self.interval_s if self.jitter_s is None else self.jitter_s


def _seconds(what: str, value: float, *, zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{what}: expected a positive number of seconds, got {value!r}")
    return float(value)


@attrs.define(eq=False, kw_only=True)
class Scheduler:
    rng: random.Random = attrs.field(factory=random.Random)
    device_id: str = ""
    """For log lines only."""
    _jobs: dict[str, _Entry] = attrs.field(init=False, factory=dict)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)

    def add(self, name: str, interval_s: float, job: Job, *, jitter_s: float | None = None) -> None:
        """Run `job()` every `interval_s` ± `jitter_s` seconds (default jitter: 10 %)."""
        if name in self._jobs:
            raise ValueError(f"a job named {name!r} exists already")
        interval = _seconds(name, interval_s)
        if jitter_s is not None:
            jitter_s = _seconds(f"{name} jitter", jitter_s, zero_ok=True)
        entry = _Entry(name=name, job=job, interval_s=interval, jitter_s=jitter_s)
        self._jobs[name] = entry
        if self._nursery is not None:  # added while running: our own nursery, our own task
            self._nursery.start_soon(self._job_loop, entry)

    async def run(
        self, *, task_status: trio.TaskStatus[Scheduler] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every job until cancelled."""
        if self._nursery is not None:
            raise RuntimeError("this Scheduler is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for entry in self._jobs.values():
                    nursery.start_soon(self._job_loop, entry)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def run_now(self, name: str) -> None:
        """Run job `name` as soon as it is not running (KeyError if there is no such job)."""
        entry = self._jobs[name]
        entry.run_requested = True
        entry.wake.set()

    def set_interval(self, name: str, seconds: float) -> bool:
        """Change a job's interval; its next run moves to `seconds ± jitter` after its last.
        False (and a log line) when there is no such job."""
        entry = self._jobs.get(name)
        if entry is None:
            log.warning("scheduler_unknown_job", device_id=self.device_id, job=name)
            return False
        entry.interval_s = _seconds(name, seconds)
        if entry.jitter_s is not None:
            entry.jitter_s = min(entry.jitter_s, entry.interval_s)
        entry.rescheduled = True
        entry.wake.set()
        return True

    @property
    def job_names(self) -> list[str]:
        return list(self._jobs)

    def interval(self, name: str) -> float:
        return self._jobs[name].interval_s

    def is_running(self, name: str) -> bool:
        return self._jobs[name].running

    def runs(self, name: str) -> int:
        """Completed runs of job `name` (failed ones included)."""
        return self._jobs[name].runs

    def failures(self, name: str) -> int:
        return self._jobs[name].failures

    # --- per job ------------------------------------------------------------------------------

    def _delay(self, entry: _Entry) -> float:
        jitter = entry.jitter
        return max(0.0, entry.interval_s + self.rng.uniform(-jitter, jitter))

    async def _job_loop(self, entry: _Entry) -> None:
        anchor = trio.current_time()  # the end of the last run (or the start)
        while True:
            entry.rescheduled = False  # this deadline already uses the current interval
            deadline = anchor + self._delay(entry)
            while not entry.run_requested and trio.current_time() < deadline:
                entry.wake = trio.Event()
                with trio.move_on_at(deadline):
                    await entry.wake.wait()
                if entry.rescheduled:
                    entry.rescheduled = False
                    deadline = anchor + self._delay(entry)
            entry.run_requested = False
            await self._run_once(entry)
            anchor = trio.current_time()

    async def _run_once(self, entry: _Entry) -> None:
        entry.running = True
        started = trio.current_time()
        try:
            await entry.job()
        except Exception:  # a job is a boundary: log it and keep the schedule
            entry.runs += 1
            entry.failures += 1
            log.exception("job_failed", device_id=self.device_id, job=entry.name)
        else:
            entry.runs += 1
            log.debug(
                "job_done",
                device_id=self.device_id,
                job=entry.name,
                duration_s=round(trio.current_time() - started, 3),
            )
        finally:
            entry.running = False
        await trio.lowlevel.checkpoint()  # a job that never awaits must not starve the others
