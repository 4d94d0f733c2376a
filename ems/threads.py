"""One owner for a blocking resource (a sqlite3 or psycopg connection) used from trio.

Every call is one `trio.to_thread.run_sync` hop through a `CapacityLimiter(1)`, so the resource
is only ever used by one thread at a time. A cancelled caller still waits for its call to finish
(the thread is not abandoned), so the next call never overlaps it. Callers batch: one hop should
carry many rows, never one row per hop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

P = ParamSpec("P")
T = TypeVar("T")


class SerialThread:
    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(call, limiter=self._limiter)
