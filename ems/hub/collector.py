"""The hub's garbage-collection policy: no young collections, survivors frozen every second.

Why: every idle connection waits in a fresh chain of coroutines, cancel scopes and wait objects
that it rebuilds after each frame and that lives until its next frame (seconds). Python's
collector counts allocations, so it ran its young collections several times a second and
scanned every connection's current chain each time, finding nothing to free: at 5,000
connections generation-1 collections took 60-180 ms every 3 s (the dashboards' p99), at
10,000 the collector took a fifth to a third of the hub's core (benchmarks/README.md,
"Step 6, third pass"). Freezing the survivors once a second and collecting the young ones
once then still cost 50-75 ms per collection at 10,000 connections, several a second.

So Python's automatic collections are off; once a second what is alive is frozen
(`gc.freeze()`, O(1)), which keeps its bookkeeping out of every later collection; acyclic
garbage is freed by reference counting as always. Cyclic garbage (a steady hub makes almost
none: its young collections found 0-70 objects each, and a full collection after 3,400 closed
connections found 516) is freed by a full collection (`gc.unfreeze()` + `gc.collect()`, 1.5-2.4 s
at 10,000 connections): every `gc_full_collect_s`, or sooner once the process's resident
memory has grown past `GROWTH` x (what it was after the last one) + `SLACK`, which bounds the
garbage whatever produces it. (Memory, not `gc.get_freeze_count()`: that walks the list of
frozen objects, 80 ms at a million of them.)
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ems.hub.settings import HubSettings
from ems.logs import get_logger

log = get_logger("ems.hub.gc")

GROWTH = 2.0
SLACK = 512 * 2**20
"""Resident memory beyond GROWTH x (what the last full collection left) + SLACK bytes triggers
one. 10,000 connections take about 450 MB: a fleet connecting does not (at 256 MiB it did, a
2.4 s pause in the middle of a run), garbage piling up does."""

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (Linux); 0 where /proc is missing (no growth trigger)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0


@attrs.define(eq=False)
class GcPauses:
    """Garbage-collector pauses, measured with `gc.callbacks` (shown in /metrics)."""

    count: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    total_s: list[float] = attrs.field(factory=lambda: [0.0, 0.0, 0.0])
    max_s: list[float] = attrs.field(factory=lambda: [0.0, 0.0, 0.0])
    _started: float = 0.0

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        pause = time.perf_counter() - self._started
        self.count[generation] += 1
        self.total_s[generation] += pause
        self.max_s[generation] = max(self.max_s[generation], pause)


@attrs.define(eq=False)
class Collector:
    """Runs the policy above as one task of the hub's nursery (`run`)."""

    settings: HubSettings
    open_connections: Callable[[], int]
    memory: Callable[[], int] = resident_bytes
    growth: float = GROWTH
    slack: int = SLACK
    pauses: GcPauses = attrs.field(init=False, factory=GcPauses)
    full_collections: int = attrs.field(init=False, default=0)
    _baseline: int = attrs.field(init=False, default=0)
    """Resident bytes right after the last full collection."""

    def growth_due(self) -> bool:
        return self.memory() > self.growth * self._baseline + self.slack

    async def run(self) -> None:
        """Start-up objects frozen, then the policy above. `gc_freeze_s=0` keeps Python's
        automatic collections with `gc_gen0_threshold`; a threshold of 0 as well leaves the
        collector exactly as Python sets it (both for comparison)."""
        settings = self.settings
        gc.callbacks.append(self.pauses.callback)
        was_enabled, thresholds = gc.isenabled(), gc.get_threshold()
        froze = False
        try:
            if not settings.gc_gen0_threshold and not settings.gc_freeze_s:
                await trio.sleep_forever()
            gc.collect()
            gc.freeze()
            froze = True
            self._baseline = self.memory()
            if not settings.gc_freeze_s:
                gc.set_threshold(settings.gc_gen0_threshold, *thresholds[1:])
                await trio.sleep_forever()
            gc.disable()
            await self._freeze_forever()
        finally:
            # An in-process hub (tests, benchmarks) leaves the collector as it found it.
            gc.callbacks.remove(self.pauses.callback)
            if froze:
                gc.unfreeze()
            gc.set_threshold(*thresholds)
            if was_enabled:
                gc.enable()

    async def _freeze_forever(self) -> None:
        settings = self.settings
        full_at = trio.current_time() + settings.gc_full_collect_s
        while True:
            await trio.sleep(settings.gc_freeze_s)
            gc.freeze()
            if trio.current_time() >= full_at or self.growth_due():
                full_at = trio.current_time() + settings.gc_full_collect_s
                self.full_collect()

    def full_collect(self) -> None:
        started = time.perf_counter()
        before = self.memory()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        self._baseline = self.memory()
        self.full_collections += 1
        log.info(
            "gc_full_collection",
            freed=freed,
            resident_mb_before=round(before / 2**20, 1),
            resident_mb_after=round(self._baseline / 2**20, 1),
            open_connections=self.open_connections(),
            pause_ms=round(1000 * (time.perf_counter() - started), 1),
        )
