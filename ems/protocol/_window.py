"""Small pure pieces shared by the two link sides: seq allocation, the device's command record,
and the token bucket. No I/O, no clock: time is always an argument.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import attrs

from ems.protocol.messages import CommandResult, CommandState


@attrs.define
class SeqAllocator:
    """Hands out the strictly growing `seq`s of one stream; `last` is persisted by its owner."""

    last: int = 0

    def next(self) -> int:
        self.last += 1
        return self.last


@attrs.define
class CommandRecord:
    """The device's at-most-once record: every tracked `id` it has seen, with its last status.

    An id enters the record (as `received`) before it is executed, so a redelivery, even after a
    restart, finds it and is answered with the last status instead of running again. The record
    is bounded: once over `capacity`, the oldest finished ids are forgotten first (the hub expires
    commands long before that many newer ones arrive).
    """

    capacity: int = 10_000
    _entries: OrderedDict[str, CommandResult] = attrs.field(factory=OrderedDict, alias="entries")

    def __contains__(self, command_id: str) -> bool:
        return command_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self, command_id: str) -> bool:
        """Record `command_id` as received; False when it was already there (do not execute)."""
        if command_id in self._entries:
            return False
        self._entries[command_id] = CommandResult(
            seq=0, id=command_id, status=CommandState.RECEIVED
        )
        self._evict()
        return True

    def update(self, result: CommandResult) -> None:
        """Remember `result` as the last status of its id (seq is not kept)."""
        self._entries[result.id] = attrs.evolve(result, seq=0)
        self._entries.move_to_end(result.id)
        self._evict()

    def last(self, command_id: str) -> CommandResult | None:
        return self._entries.get(command_id)

    def items(self) -> list[CommandResult]:
        return list(self._entries.values())

    def _evict(self) -> None:
        excess = len(self._entries) - self.capacity
        if excess <= 0:
            return
        for command_id in [k for k, v in self._entries.items() if v.status.is_final][:excess]:
            del self._entries[command_id]

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"id": r.id, "status": r.status.value, "result": r.result, "error": r.error}
            for r in self._entries.values()
        ]


@attrs.define
class TokenBucket:
    """Classic token bucket: `rate` tokens per second, holding at most `burst`."""

    rate: float
    burst: float
    _tokens: float = attrs.field(init=False)
    _updated: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.burst

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if there are enough; False (and nothing spent) otherwise."""
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= cost:
            self._tokens -= cost
            return True
        return False
