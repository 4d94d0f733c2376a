"""The liveness deadline queue and the garbage-collection policy (both of the hub)."""

from __future__ import annotations

import gc
import weakref

import attrs
import pytest
import trio
import trio.testing

from ems.hub.collector import Collector, resident_bytes
from ems.hub.deadlines import DeadlineQueue
from ems.hub.settings import HubSettings


@attrs.define(eq=False)
class Timer:
    name: str
    deadline: float | None

    def next_deadline(self) -> float | None:
        return self.deadline


def due(queue: DeadlineQueue[Timer], now: float) -> list[str]:
    return [timer.name for timer in queue.pop_due(now)]


def test_items_come_up_in_deadline_order_once() -> None:
    queue: DeadlineQueue[Timer] = DeadlineQueue()
    a, b, c = Timer("a", 3.0), Timer("b", 1.0), Timer("c", 2.0)
    for timer in (a, b, c):
        queue.schedule(timer)
    assert due(queue, 0.5) == []
    assert due(queue, 2.0) == ["b", "c"]
    assert due(queue, 2.5) == []  # popped items are unscheduled until scheduled again
    assert due(queue, 10.0) == ["a"]
    assert len(queue) == 0


def test_a_deadline_moved_later_comes_up_at_the_old_one_and_is_rescheduled() -> None:
    queue: DeadlineQueue[Timer] = DeadlineQueue()
    silent = Timer("silent", 60.0)
    queue.schedule(silent)
    silent.deadline = 75.0  # traffic pushed the silence deadline back
    queue.schedule(silent)  # no new entry: the earlier one stands
    assert len(queue) == 1
    assert due(queue, 60.0) == ["silent"]  # early: the caller checks, finds nothing due...
    queue.schedule(silent)  # ...and schedules it again
    assert due(queue, 74.0) == []
    assert due(queue, 75.0) == ["silent"]


def test_an_earlier_deadline_supersedes_the_scheduled_one() -> None:
    queue: DeadlineQueue[Timer] = DeadlineQueue()
    conn = Timer("conn", 10.0)  # the hello deadline
    queue.schedule(conn)
    conn.deadline = 4.0  # welcomed: the heartbeat clock comes first
    queue.schedule(conn)
    assert due(queue, 4.0) == ["conn"]
    assert due(queue, 10.0) == []  # the superseded entry is skipped


def test_closed_items_are_not_scheduled() -> None:
    queue: DeadlineQueue[Timer] = DeadlineQueue()
    queue.schedule(Timer("closed", None))
    assert len(queue) == 0
    assert due(queue, 1e9) == []


class Cycle:
    """Cyclic garbage once dropped (as a closed connection's tasks and scopes are)."""

    def __init__(self) -> None:
        self.me = self


def collector(**overrides: float) -> Collector:
    settings = attrs.evolve(HubSettings.from_env({}), **overrides)
    return Collector(settings, open_connections=lambda: 0)


async def test_survivors_are_frozen_every_tick_and_unfrozen_when_the_hub_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc_collector = collector(gc_freeze_s=1.0)
    start = trio.current_time()  # the collector ticks at start + 1, + 2, ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gc_collector.run)
        await trio.sleep_until(start + 1.5)
        survivor = Cycle()  # alive at the next tick: frozen there
        assert survivor.me is survivor
        frozen_before = gc.get_freeze_count()
        await trio.sleep_until(start + 2.5)
        assert gc.get_freeze_count() > frozen_before
        nursery.cancel_scope.cancel()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize("grown_mb", [400, 600])
async def test_memory_growing_past_the_limit_triggers_a_full_collection(
    grown_mb: int, autojump_clock: trio.testing.MockClock
) -> None:
    resident = [400 * 2**20]
    gc_collector = collector(gc_freeze_s=1.0, gc_full_collect_s=3_600.0)
    gc_collector.memory = lambda: resident[0]
    start = trio.current_time()  # the collector ticks at start + 1, + 2, ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gc_collector.run)
        await trio.sleep_until(start + 0.5)  # baseline: 400 MB; the limit 2 x 400 + 512 MB
        connection = Cycle()
        freed = weakref.ref(connection)
        await trio.sleep_until(start + 1.5)  # frozen while alive, as a connection's objects are
        del connection  # it closes: garbage that only a full collection frees
        resident[0] = (800 + grown_mb) * 2**20
        await trio.sleep_until(start + 2.5)
        full = grown_mb > 512
        assert gc_collector.full_collections == (1 if full else 0)
        assert (freed() is None) is full
        nursery.cancel_scope.cancel()
    gc.collect()
    assert freed() is None


def test_resident_memory_is_read_from_proc() -> None:
    assert 10 * 2**20 < resident_bytes() < 2**40


async def test_automatic_collections_are_off_while_the_hub_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert gc.isenabled()
    gc_collector = collector(gc_freeze_s=1.0)
    start = trio.current_time()  # the collector ticks at start + 1, + 2, ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gc_collector.run)
        await trio.sleep_until(start + 0.5)
        assert not gc.isenabled()
        nursery.cancel_scope.cancel()
    assert gc.isenabled()


async def test_without_freezing_pythons_collector_runs_with_the_threshold(
    autojump_clock: trio.testing.MockClock,
) -> None:
    thresholds = gc.get_threshold()
    assert thresholds[0] != 12_345
    gc_collector = collector(gc_freeze_s=0.0, gc_gen0_threshold=12_345)
    start = trio.current_time()  # the collector ticks at start + 1, + 2, ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gc_collector.run)
        await trio.sleep_until(start + 5.0)
        assert gc.isenabled()
        assert gc.get_threshold()[0] == 12_345
        nursery.cancel_scope.cancel()
    assert gc.get_threshold() == thresholds  # the hub stopped: as it found it
    assert gc.get_freeze_count() == 0


async def test_the_full_collection_also_runs_on_its_schedule(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc_collector = collector(gc_freeze_s=1.0, gc_full_collect_s=5.0)
    start = trio.current_time()  # the collector ticks at start + 1, + 2, ...
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gc_collector.run)
        await trio.sleep_until(start + 5.5)
        assert gc_collector.full_collections == 1
        nursery.cancel_scope.cancel()
