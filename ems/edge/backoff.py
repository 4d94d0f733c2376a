"""Reconnect delays: exponential backoff with full jitter (AWS architecture blog's "Full Jitter").

Attempt n waits a uniform random time in [0, min(cap, base * 2**n)], so a fleet that lost its
hub at the same instant does not come back at the same instant. `reset()` after a stable link.
"""

from __future__ import annotations

import random

import attrs


@attrs.define
class Backoff:
    base: float = 1.0
    cap: float = 60.0
    rng: random.Random = attrs.field(factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempts)
        self.attempts = min(self.attempts + 1, 32)
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempts = 0
