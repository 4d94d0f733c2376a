"""The sampler on virtual time: batches per interval, merged instants, failing sensors skipped."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from ems.edge.sampler import Sampler
from ems.protocol import messages as m
from ems.protocol.codec import decode_device_message, encode

EPOCH = 1_763_800_000.0


class Counter:
    """A sensor returning its name's counter, so every reading says which read it was."""

    def __init__(self, name: str, metric: str | None = None) -> None:
        self.name = name
        self.metric = metric or name
        self.reads = 0
        self.read_at: list[float] = []

    def read(self) -> dict[str, Any]:
        self.reads += 1
        self.read_at.append(trio.current_time())
        return {self.metric: self.reads}


class Failing:
    def __init__(self, name: str = "flaky", errors: list[BaseException] | None = None) -> None:
        self.name = name
        self.errors = errors or [OSError("bus error")]
        self.reads = 0

    def read(self) -> dict[str, Any]:
        self.reads += 1
        raise self.errors[(self.reads - 1) % len(self.errors)]


class Batches:
    """on_batch: records (virtual time, samples)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[tuple[float, list[dict[str, Any]]]] = []

    async def __call__(self, samples: list[dict[str, Any]]) -> None:
        if self.delay:
            await trio.sleep(self.delay)
        self.calls.append((trio.current_time(), samples))

    @property
    def samples(self) -> list[dict[str, Any]]:
        return [s for _, batch in self.calls for s in batch]


def wall_clock() -> float:
    return EPOCH + trio.current_time()


@pytest.fixture
def records() -> Iterator[list[logging.LogRecord]]:
    """Log records of the sampler, whatever `ems.logs.configure` did to propagation."""
    logger = logging.getLogger("ems.edge.sampler")
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


def events(records: list[logging.LogRecord], name: str) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage() == name]


async def run_for(sampler: Sampler, seconds: float) -> None:
    with trio.move_on_after(seconds):
        await sampler.run()


async def test_one_batch_per_interval(autojump_clock: trio.testing.MockClock) -> None:
    sensor = Counter("a")
    on_batch = Batches()
    sampler = Sampler(sensors=[sensor], on_batch=on_batch, wall_clock=wall_clock)
    start = trio.current_time()
    await run_for(sampler, 5.5)
    # reads at 0, 1, ..., 5; batches at 1, ..., 5 (the first also carries the read at 0)
    assert sensor.reads == 6
    assert [t - start for t, _ in on_batch.calls] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [len(batch) for _, batch in on_batch.calls] == [2, 1, 1, 1, 1]
    assert [s["data"] for s in on_batch.samples] == [{"a": n} for n in range(1, 7)]
    assert [s["ts"] for s in on_batch.samples] == [
        int((EPOCH + start + k) * 1000) for k in range(6)
    ]
    assert sampler.buffered == 0  # a read at a batch deadline goes out with that batch


async def test_readings_of_one_instant_are_one_sample(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fast, slow, slower = Counter("fast"), Counter("slow"), Counter("slower")
    on_batch = Batches()
    sampler = Sampler(
        sensors=[fast, slow, slower],
        intervals={"fast": 0.1, "slow": 0.5, "slower": 1.0},
        batch_interval_s=1.0,
        on_batch=on_batch,
        wall_clock=wall_clock,
    )
    await run_for(sampler, 3.05)
    samples = on_batch.samples
    assert len(samples) == 31  # 0.0, 0.1, ..., 3.0: one sample per instant, never two
    assert fast.reads == 31
    assert slow.reads == 7
    assert slower.reads == 4
    keys = [sorted(s["data"]) for s in samples]
    for i, names in enumerate(keys):
        expected = ["fast"]
        if i % 5 == 0:
            expected.append("slow")
        if i % 10 == 0:
            expected.append("slower")
        assert names == sorted(expected), i
    tss = [s["ts"] for s in samples]
    assert tss == sorted(set(tss)), "one ts per instant, strictly growing"


async def test_ts_grows_strictly_even_when_the_wall_clock_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    on_batch = Batches()
    frozen = iter([EPOCH, EPOCH, EPOCH - 10, *([EPOCH] * 100)])
    sampler = Sampler(
        sensors=[Counter("a")],
        intervals={"a": 0.25},
        on_batch=on_batch,
        wall_clock=lambda: next(frozen),
    )
    await run_for(sampler, 2.1)
    tss = [s["ts"] for s in on_batch.samples]
    base = int(EPOCH * 1000)
    assert tss == list(range(base, base + len(tss)))


async def test_a_failing_sensor_is_skipped_and_logged_once_per_kind(
    autojump_clock: trio.testing.MockClock, records: list[logging.LogRecord]
) -> None:
    flaky = Failing(errors=[OSError("bus error"), OSError("again"), ValueError("garbage")])
    good = Counter("good")
    on_batch = Batches()
    sampler = Sampler(sensors=[flaky, good], on_batch=on_batch, wall_clock=wall_clock)
    await run_for(sampler, 10.5)
    assert flaky.reads == 11
    assert good.reads == 11
    assert len(on_batch.samples) == 11
    assert all(set(s["data"]) == {"good"} for s in on_batch.samples)
    assert sampler.read_errors == {"flaky": 11}
    logged = events(records, "sensor_read_failed")
    assert [r.fields["error"] for r in logged] == ["OSError", "ValueError"]  # type: ignore[attr-defined]
    assert all(r.fields["sensor"] == "flaky" for r in logged)  # type: ignore[attr-defined]


async def test_a_sensor_returning_nonsense_is_skipped(
    autojump_clock: trio.testing.MockClock, records: list[logging.LogRecord]
) -> None:
    class Nonsense:
        name = "nonsense"

        def read(self) -> Any:
            return [1, 2, 3]

    on_batch = Batches()
    sampler = Sampler(sensors=[Nonsense(), Counter("ok")], on_batch=on_batch)
    await run_for(sampler, 3.5)
    assert all(s["data"].keys() == {"ok"} for s in on_batch.samples)
    assert [r.fields["error"] for r in events(records, "sensor_read_failed")] == ["TypeError"]  # type: ignore[attr-defined]


async def test_metrics_the_hub_would_refuse_are_left_out(
    autojump_clock: trio.testing.MockClock, records: list[logging.LogRecord]
) -> None:
    class Sloppy:
        name = "sloppy"

        def read(self) -> dict[str, Any]:
            return {
                "voltage": 230.0,
                "current": math.nan,
                "temperature": "warm",
                "9bad": 1,
                "position": {"latitude": 1.0},
                "note": "x" * 300,
                "ok.flag": True,
            }

    on_batch = Batches()
    sampler = Sampler(sensors=[Sloppy()], on_batch=on_batch, wall_clock=wall_clock)
    await run_for(sampler, 3.5)
    assert all(s["data"] == {"voltage": 230.0, "ok.flag": True} for s in on_batch.samples)
    logged = events(records, "sensor_metric_invalid")
    assert len(logged) == 5, "each bad metric logged once, not once per read"
    # what goes out passes the hub's checks
    telemetry = m.Telemetry(
        seq=1, samples=tuple(m.Sample(ts=s["ts"], data=s["data"]) for s in on_batch.samples)
    )
    decoded = decode_device_message(encode(telemetry))
    assert isinstance(decoded, m.Telemetry)
    assert decoded.rejected == ()


async def test_batches_hold_at_most_max_batch_samples(
    autojump_clock: trio.testing.MockClock,
) -> None:
    on_batch = Batches()
    sampler = Sampler(
        sensors=[Counter("a")],
        intervals={"a": 0.01},
        batch_interval_s=10.0,
        max_batch=300,
        on_batch=on_batch,
        wall_clock=wall_clock,
    )
    await run_for(sampler, 10.005)
    sizes = [len(batch) for _, batch in on_batch.calls]
    assert sizes == [300, 300, 300, 101]
    times = {t for t, _ in on_batch.calls}
    assert len(times) == 1, "handed over at the same batch deadline"


async def test_default_max_batch_is_the_contract_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    on_batch = Batches()
    sampler = Sampler(
        sensors=[Counter("a")],
        intervals={"a": 0.001},
        batch_interval_s=2.5,
        on_batch=on_batch,
    )
    await run_for(sampler, 2.5005)
    assert [len(b) for _, b in on_batch.calls] == [1000, 1000, 501]


async def test_a_slow_consumer_never_delays_sampling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sensor = Counter("a")
    on_batch = Batches(delay=3.5)
    sampler = Sampler(sensors=[sensor], on_batch=on_batch, wall_clock=wall_clock)
    start = trio.current_time()
    await run_for(sampler, 20.5)
    assert [t - start for t in sensor.read_at] == [float(k) for k in range(21)]
    delivered = on_batch.samples
    assert [s["data"]["a"] for s in delivered] == list(range(1, len(delivered) + 1))
    assert len(on_batch.calls) == 5  # 3.5 s each: at 4.5, 8, 11.5, 15, 18.5
    # what waited meanwhile went out together: batches of t=2..4, then 5..7 (or 5..8), ...
    assert [len(batch) for _, batch in on_batch.calls][:2] == [2, 3]
    assert 21 - len(delivered) >= sampler.buffered > 0
    assert sampler.dropped == 0


async def test_a_full_buffer_drops_the_oldest_samples(
    autojump_clock: trio.testing.MockClock, records: list[logging.LogRecord]
) -> None:
    gate = trio.Event()
    delivered: list[list[dict[str, Any]]] = []

    async def stuck(samples: list[dict[str, Any]]) -> None:
        await gate.wait()
        delivered.append(samples)

    sampler = Sampler(
        sensors=[Counter("a")],
        intervals={"a": 0.1},
        on_batch=stuck,
        max_buffered=25,
    )
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(sampler.run)
        # reads 0..60: batch 1 (11 samples) is stuck in on_batch
        await trio.sleep_until(start + 6.05)
        assert sampler.buffered == 25
        assert sampler.dropped == 61 - 11 - 25
        assert len(events(records, "samples_dropped")) == 1
        gate.set()
        await trio.sleep_until(start + 6.55)
        nursery.cancel_scope.cancel()
    counts = [s["data"]["a"] for batch in delivered for s in batch]
    assert counts[:11] == list(range(1, 12))
    assert counts[11:36] == list(range(37, 62)), "the newest 25 survived"


async def test_intervals_change_while_running(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Counter("a"), Counter("b")
    on_batch = Batches()
    sampler = Sampler(
        sensors=[a, b], intervals={"a": 1.0, "b": 1.0}, on_batch=on_batch, wall_clock=wall_clock
    )
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(sampler.run)
        await trio.sleep_until(start + 2.5)
        assert sampler.set_interval("a", 0.5)
        assert not sampler.set_interval("nope", 1.0)
        sampler.set_batch_interval(2.0)
        await trio.sleep_until(start + 6.4)
        nursery.cancel_scope.cancel()
    assert [t - start for t in a.read_at] == [0, 1, 2, 3, 3.5, 4, 4.5, 5, 5.5, 6]
    assert [t - start for t in b.read_at] == [0, 1, 2, 3, 4, 5, 6]
    assert [t - start for t, _ in on_batch.calls] == [1, 2, 4, 6]
    with pytest.raises(ValueError, match="positive"):
        sampler.set_interval("a", 0)
    with pytest.raises(ValueError, match="positive"):
        sampler.set_batch_interval(-1)


async def test_a_late_wakeup_reads_once_and_skips_missed_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Hog:
        """Blocks the loop (as a stalled device would) once, at t=2."""

        name = "hog"

        def __init__(self) -> None:
            self.read_at: list[float] = []

        def read(self) -> dict[str, Any]:
            now = trio.current_time()
            self.read_at.append(now)
            if len(self.read_at) == 3:
                autojump_clock.jump(3.4)
            return {"hog": 1}

    hog = Hog()
    sampler = Sampler(sensors=[hog], on_batch=Batches(), wall_clock=wall_clock)
    start = trio.current_time()
    await run_for(sampler, 7.5)
    assert [round(t - start, 6) for t in hog.read_at] == [0, 1, 2, 6, 7]


async def test_cancellation_is_clean_and_keeps_unsent_samples(
    autojump_clock: trio.testing.MockClock,
) -> None:
    on_batch = Batches()
    sampler = Sampler(
        sensors=[Counter("a")], intervals={"a": 0.5}, batch_interval_s=5.0, on_batch=on_batch
    )
    await run_for(sampler, 3.2)
    assert on_batch.calls == []
    (left,) = sampler.take_buffered()
    assert [s["data"]["a"] for s in left] == [1, 2, 3, 4, 5, 6, 7]
    assert sampler.buffered == 0
    assert sampler.take_buffered() == []
    # and it can run again
    await run_for(sampler, 5.2)
    assert len(on_batch.samples) == 11


async def test_run_twice_at_once_is_refused(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sampler = Sampler(sensors=[Counter("a")], on_batch=Batches())
    await nursery.start(sampler.run)
    with pytest.raises(RuntimeError, match="already running"):
        await sampler.run()


async def test_on_batch_failure_is_not_hidden(autojump_clock: trio.testing.MockClock) -> None:
    async def disk_full(samples: list[dict[str, Any]]) -> None:
        raise OSError("No space left on device")

    sampler = Sampler(sensors=[Counter("a")], on_batch=disk_full)
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="No space left")):
        await sampler.run()


def test_bad_construction() -> None:
    async def on_batch(samples: list[dict[str, Any]]) -> None:
        pass

    with pytest.raises(ValueError, match="share a name"):
        Sampler(sensors=[Counter("a"), Counter("a")], on_batch=on_batch)
    with pytest.raises(ValueError, match="positive"):
        Sampler(sensors=[Counter("a")], intervals={"a": 0}, on_batch=on_batch)
    with pytest.raises(ValueError, match="max_batch"):
        Sampler(sensors=[Counter("a")], on_batch=on_batch, max_batch=1001)
