"""Which connections have a timer due, without looking at every connection every tick.

The liveness sweep used to ask each connection for its next deadline five times a second: at
10,000 connections, 50,000 calls a second for the two or three deadlines that actually pass.
This is a heap of (deadline, connection) entries instead. A session's deadlines only move
later on their own (traffic pushes the silence deadline back, a heartbeat schedules the next
one), so an entry may be early but never late: when it comes up, the connection's timers are
checked and it is scheduled again at its current deadline. The one move to an earlier deadline
(`welcome` starting the heartbeat clock before the hello deadline) calls `schedule` again.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class HasDeadline(Protocol):
    def next_deadline(self) -> float | None: ...


T = TypeVar("T", bound=HasDeadline)


class DeadlineQueue(Generic[T]):
    """Items keyed by their earliest pending deadline (one live entry per item)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # ties: first scheduled first, items never compared
        self._scheduled: dict[int, float] = {}  # id(item) -> deadline of its live entry

    def __len__(self) -> int:
        return len(self._scheduled)

    def schedule(self, item: T) -> None:
        """Make sure `item` comes up no later than its current `next_deadline()`."""
        deadline = item.next_deadline()
        if deadline is None:
            return
        key = id(item)
        current = self._scheduled.get(key)
        if current is not None and current <= deadline:
            return  # an entry at or before it exists: it is checked (and rescheduled) then
        self._scheduled[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), item))

    def pop_due(self, now: float) -> Iterator[T]:
        """Items whose entry is at or before `now`; each is unscheduled as it is yielded (the
        caller checks its timers and calls `schedule` again)."""
        heap = self._heap
        scheduled = self._scheduled
        while heap and heap[0][0] <= now:
            deadline, _, item = heapq.heappop(heap)
            key = id(item)
            if scheduled.get(key) != deadline:
                continue  # superseded by an earlier entry, already handled
            del scheduled[key]
            yield item
