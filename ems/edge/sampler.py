"""Sampling: read each sensor at its interval, hand the samples over once per batch interval.

Theory of operation. `Sampler.run` owns one nursery with two tasks:

- the *sampling loop* sleeps (trio's clock) until the next sensor or batch deadline, reads every
  sensor that is due, merges what they return into **one** sample with one `ts` (the injected
  wall clock, epoch ms), and at each batch deadline moves the samples gathered so far into the
  ready queue, in batches of at most `max_batch` (the contract's 1000);
- the *delivery loop* takes ready batches oldest first and awaits `on_batch(samples)` (the agent
  writes them to the outbox and the history store). A slow `on_batch` never delays sampling;
  batches that waited for it are joined (up to `max_batch`) so a backlog drains in few calls.

Deadlines lie on one grid per interval, `origin + k * interval`, all anchored at the same origin,
so sensors with equal (or multiple) intervals fall due at the same instant and share a sample.
A loop that wakes late reads what is due once and moves on to the next future slot: no bursts.
Reads are synchronous and fast (see `ems.edge.sensors.base`), so one loop serves every sensor.

Sample `ts` values grow strictly (a repeated or backward wall clock gets the last `ts` + 1 ms),
because the hub and the history store identify a sample by its `ts`.

Policies. The buffer (gathered plus ready, not yet handed to `on_batch`) holds at most
`max_buffered` samples; past that the oldest sample is dropped and counted in `dropped`. A sensor
whose `read()` raises is skipped for that instant and logged once per kind of error; a metric the
contract would refuse (bad name, non-finite number, wrong type for a typed metric) is left out and
logged once. The sampler never dies from a sensor; it does die from `on_batch` (a bug or a full
disk is for the agent to see).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs
import trio

from ems.edge.sensors.base import Reading, Sensor
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol.codec import DEFAULT_RULES, MAX_METRICS, MAX_SAMPLES, check_sample

log = get_logger("ems.edge.sampler")

DEFAULT_INTERVAL_S = 1.0
_EPSILON_S = 1e-6
"""Deadlines closer than this are the same instant (float error on the shared grid)."""

Sample = dict[str, Any]
OnBatch = Callable[[list[Sample]], Awaitable[None]]


def _positive(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"expected seconds as a number, got {type(seconds).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"expected a positive number of seconds, got {seconds}")
    return float(seconds)


@attrs.define(eq=False, kw_only=True)
class Sampler:
    sensors: Sequence[Sensor] = attrs.field(converter=tuple)
    on_batch: OnBatch
    intervals: Mapping[str, float] = attrs.field(factory=dict)
    """Seconds between reads per sensor name (missing: 1.0)."""
    batch_interval_s: float = attrs.field(default=1.0, converter=_positive)
    wall_clock: Callable[[], float] = time.time
    """Wall time in seconds, for sample `ts` only (scheduling uses trio's clock)."""
    max_batch: int = MAX_SAMPLES
    max_buffered: int = 10_000
    device_id: str = ""
    """For log lines only."""

    dropped: int = attrs.field(init=False, default=0)
    """Samples dropped because the buffer was full (on_batch too slow for too long)."""
    read_errors: dict[str, int] = attrs.field(init=False, factory=dict)
    """Failed reads per sensor name."""

    _intervals: dict[str, float] = attrs.field(init=False, factory=dict)
    _deadlines: dict[str, float] = attrs.field(init=False, factory=dict)
    _origin: float = attrs.field(init=False, default=0.0)
    _next_batch: float = attrs.field(init=False, default=math.inf)
    _pending: list[Sample] = attrs.field(init=False, factory=list)
    _ready: deque[list[Sample]] = attrs.field(init=False, factory=deque)
    _buffered: int = attrs.field(init=False, default=0)
    _last_ts: int = attrs.field(init=False, default=-1)
    _running: bool = attrs.field(init=False, default=False)
    _changed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _ready_event: trio.Event = attrs.field(init=False, factory=trio.Event)
    _logged: set[tuple[str, str]] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        names = [s.name for s in self.sensors]
        if len(set(names)) != len(names):
            raise ValueError(f"two sensors share a name: {names}")
        self._intervals = {
            name: _positive(self.intervals.get(name, DEFAULT_INTERVAL_S)) for name in names
        }
        if not 1 <= self.max_batch <= MAX_SAMPLES:
            raise ValueError(f"max_batch must be 1 to {MAX_SAMPLES}")
        if self.max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")

    # --- lifetime ----------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Sampler] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sample until cancelled. The first reads happen at once, the first batch one batch
        interval later. Samples still buffered when cancelled stay in `take_buffered()`."""
        if self._running:
            raise RuntimeError("this Sampler is already running")
        self._running = True
        try:
            self._origin = trio.current_time()
            self._deadlines = dict.fromkeys(self._intervals, self._origin)
            self._next_batch = self._origin + self.batch_interval_s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver_loop)
                nursery.start_soon(self._sample_loop)
                task_status.started(self)
        finally:
            self._running = False

    def set_interval(self, name: str, seconds: float) -> bool:
        """Read sensor `name` every `seconds` from its next slot on; False if there is none."""
        if name not in self._intervals:
            log.warning("sampler_unknown_sensor", device_id=self.device_id, sensor=name)
            return False
        self._intervals[name] = _positive(seconds)
        if self._running:
            self._deadlines[name] = self._next_slot(self._intervals[name], trio.current_time())
            self._changed.set()
        return True

    def set_batch_interval(self, seconds: float) -> None:
        """Hand samples over every `seconds`, from the next slot on."""
        self.batch_interval_s = _positive(seconds)
        if self._running:
            self._next_batch = self._next_slot(self.batch_interval_s, trio.current_time())
            self._changed.set()

    def interval(self, name: str) -> float:
        return self._intervals[name]

    @property
    def buffered(self) -> int:
        """Samples taken but not yet handed to `on_batch`."""
        return self._buffered

    def take_buffered(self) -> list[list[Sample]]:
        """Remove and return every buffered sample, in batches (for a shutdown flush)."""
        batches = list(self._ready)
        batches += self._chunks(self._pending)
        self._ready.clear()
        self._pending = []
        self._buffered = 0
        return batches

    # --- the two loops -------------------------------------------------------------------------

    async def _sample_loop(self) -> None:
        while True:
            wake_at = min(min(self._deadlines.values(), default=math.inf), self._next_batch)
            self._changed = trio.Event()
            with trio.move_on_at(wake_at):
                await self._changed.wait()  # a set_* call moved a deadline
            now = trio.current_time()
            due = [s for s in self.sensors if self._deadlines[s.name] <= now + _EPSILON_S]
            if due:
                self._sample(due)
                after = trio.current_time()  # reads may have taken a while: no catch-up burst
                for sensor in due:
                    interval = self._intervals[sensor.name]
                    self._deadlines[sensor.name] = self._next_slot(interval, after)
            if self._next_batch <= now + _EPSILON_S:
                self._close_batch()
                self._next_batch = self._next_slot(self.batch_interval_s, trio.current_time())

    async def _deliver_loop(self) -> None:
        while True:
            while not self._ready:
                self._ready_event = trio.Event()
                await self._ready_event.wait()
            batch = self._ready.popleft()
            # Behind (a slow on_batch)? Send what waits as fewer, fuller batches.
            while self._ready and len(batch) + len(self._ready[0]) <= self.max_batch:
                batch.extend(self._ready.popleft())
            self._buffered -= len(batch)
            await self.on_batch(batch)

    # --- pieces --------------------------------------------------------------------------------

    def _next_slot(self, interval: float, now: float) -> float:
        """The first deadline of the grid `origin + k * interval` after `now`."""
        k = math.floor((now - self._origin) / interval) + 1
        while self._origin + k * interval <= now + _EPSILON_S:
            k += 1
        return self._origin + k * interval

    def _sample(self, due: list[Sensor]) -> None:
        ts = max(int(self.wall_clock() * 1000), self._last_ts + 1)
        data: dict[str, Any] = {}
        for sensor in due:
            reading = self._read(sensor)
            if not reading:
                continue
            for metric, value in reading.items():
                if metric not in data and len(data) >= MAX_METRICS:
                    self._log_once(
                        sensor.name, "too_many_metrics", "sample_metrics_capped", limit=MAX_METRICS
                    )
                    continue
                data[metric] = value
        if not data:
            return
        self._last_ts = ts
        self._pending.append({"ts": ts, "data": data})
        self._buffered += 1
        while self._buffered > self.max_buffered:
            self._drop_oldest()

    def _read(self, sensor: Sensor) -> Reading | None:
        try:
            reading = sensor.read()
            if type(reading) is not dict:
                raise TypeError(f"read() returned {type(reading).__name__}, expected a dict")
        except Exception as exc:  # a sensor is a boundary: it may fail in any way
            self.read_errors[sensor.name] = self.read_errors.get(sensor.name, 0) + 1
            kind = type(exc).__qualname__
            if (sensor.name, kind) not in self._logged:
                self._logged.add((sensor.name, kind))
                log.exception(
                    "sensor_read_failed",
                    device_id=self.device_id,
                    sensor=sensor.name,
                    error=kind,
                    message=str(exc)[:200],
                )
            return None
        return self._valid_part(sensor.name, reading)

    def _valid_part(self, sensor: str, reading: Reading) -> Reading:
        """`reading` without the metrics the contract would refuse (each logged once)."""
        if isinstance(check_sample(0, {"ts": 0, "data": reading}, DEFAULT_RULES), m.Sample):
            return reading  # the usual case: one pass, nothing to drop
        kept: Reading = {}
        for metric, value in reading.items():
            outcome = check_sample(0, {"ts": 0, "data": {metric: value}}, DEFAULT_RULES)
            if isinstance(outcome, m.Sample):
                kept[metric] = value
            else:
                reason = "; ".join(r.removeprefix("samples[0].data") for r in outcome)
                self._log_once(
                    sensor, f"metric:{metric}", "sensor_metric_invalid", reason=reason[:200]
                )
        return kept

    def _log_once(self, sensor: str, key: str, event: str, **fields: Any) -> None:
        if (sensor, key) in self._logged:
            return
        self._logged.add((sensor, key))
        log.warning(event, device_id=self.device_id, sensor=sensor, **fields)

    def _chunks(self, samples: list[Sample]) -> list[list[Sample]]:
        size = self.max_batch
        return [samples[i : i + size] for i in range(0, len(samples), size)]

    def _close_batch(self) -> None:
        if not self._pending:
            return
        self._ready.extend(self._chunks(self._pending))
        self._pending = []
        self._ready_event.set()

    def _drop_oldest(self) -> None:
        if self._ready:
            oldest = self._ready[0]
            oldest.pop(0)
            if not oldest:
                self._ready.popleft()
        else:
            self._pending.pop(0)
        self._buffered -= 1
        self.dropped += 1
        if self.dropped % 1000 == 1:
            log.warning(
                "samples_dropped",
                device_id=self.device_id,
                dropped_total=self.dropped,
                max_buffered=self.max_buffered,
            )
