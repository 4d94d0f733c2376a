"""The local history store: every sample the agent took, for `history` uploads, in SQLite (WAL).

A sample is identified by its `ts` (the contract's rule: the agent merges readings taken at the
same instant into one sample), so adding a sample whose `ts` is stored already changes nothing.
The store is bounded twice, by age (`retention_s`) and by size (`max_rows`); `prune(now_ms)`
enforces both, oldest first (the agent runs it as a scheduled job).

`HistoryStore` is synchronous and owns one connection, opened with `check_same_thread=False`
because `AsyncHistory` calls it from worker threads, one at a time (one `CapacityLimiter(1)`).
Every method is one transaction. History is a convenience copy (the outbox is what must not lose
data), so commits use `synchronous = NORMAL`: a power cut may cost the last few samples here.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson

from ems.threads import SerialThread

P = ParamSpec("P")
T = TypeVar("T")

SCHEMA_VERSION = 1
DEFAULT_RETENTION_S = 7 * 86_400.0
DEFAULT_MAX_ROWS = 1_000_000
_FETCH = 500

Sample = dict[str, Any]


class HistoryError(Exception):
    """The history database cannot be used (opened by a newer agent, not a database, …)."""


class HistoryStore:
    def __init__(
        self,
        path: str | Path,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        if not retention_s > 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        if not max_rows > 0:
            raise ValueError(f"max_rows must be positive, got {max_rows}")
        self.path = Path(path)
        self.retention_s = float(retention_s)
        self.max_rows = int(max_rows)
        self._conn: sqlite3.Connection | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating the file and its directory if needed); a second call does nothing."""
        if self._conn is not None:
            return
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HistoryError(
                    f"{self.path}: history schema {version} is newer than this agent's "
                    f"({SCHEMA_VERSION})"
                )
            if version < 1:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS samples "
                    "(ts NUMERIC PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID"
                )
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise HistoryError(f"{self.path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> HistoryStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        if conn is None:
            raise HistoryError("the history store is not open")
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- samples -----------------------------------------------------------------------------

    def add(self, samples: Iterable[Sample]) -> int:
        """Store `{"ts", "data"}` samples in one transaction; returns how many were new (a
        sample whose `ts` is stored already is ignored)."""
        rows = [(s["ts"], orjson.dumps(s["data"])) for s in samples]
        if not rows:
            return 0
        with self._tx(write=True) as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO samples (ts, data) VALUES (?, ?)", rows)
            return conn.total_changes - before

    def range(
        self,
        from_ts: float | None = None,
        to_ts: float | None = None,
        metrics: Iterable[str] | None = None,
        limit: int = 1000,
        *,
        after_ts: float | None = None,
    ) -> list[Sample]:
        """Samples with `from_ts <= ts <= to_ts` (None: unbounded), oldest first, at most
        `limit`. With `metrics`, each sample keeps only those metrics, and samples left with
        none are skipped. `after_ts` (exclusive) pages on from the last `ts` of a page."""
        if limit <= 0:
            return []
        clauses: list[str] = []
        args: list[Any] = []
        if from_ts is not None:
            clauses.append("ts >= ?")
            args.append(from_ts)
        if after_ts is not None:
            clauses.append("ts > ?")
            args.append(after_ts)
        if to_ts is not None:
            clauses.append("ts <= ?")
            args.append(to_ts)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        wanted = list(dict.fromkeys(metrics)) if metrics else None
        out: list[Sample] = []
        with self._tx(write=False) as conn:
            if wanted is None:
                cursor = conn.execute(
                    f"SELECT ts, data FROM samples{where} ORDER BY ts LIMIT ?", (*args, limit)
                )
                return [{"ts": ts, "data": orjson.loads(data)} for ts, data in cursor]
            cursor = conn.execute(f"SELECT ts, data FROM samples{where} ORDER BY ts", args)
            while len(out) < limit:
                rows = cursor.fetchmany(_FETCH)
                if not rows:
                    break
                for ts, blob in rows:
                    data = orjson.loads(blob)
                    kept = {name: data[name] for name in wanted if name in data}
                    if kept:
                        out.append({"ts": ts, "data": kept})
                        if len(out) == limit:
                            break
            cursor.close()
        return out

    def prune(self, now_ms: float) -> int:
        """Delete samples older than `retention_s` before `now_ms`, then the oldest beyond
        `max_rows`; returns how many went."""
        cutoff = now_ms - self.retention_s * 1000.0
        with self._tx(write=True) as conn:
            deleted = conn.execute("DELETE FROM samples WHERE ts < ?", (cutoff,)).rowcount
            (count,) = conn.execute("SELECT count(*) FROM samples").fetchone()
            excess = count - self.max_rows
            if excess > 0:
                deleted += conn.execute(
                    "DELETE FROM samples WHERE ts IN (SELECT ts FROM samples ORDER BY ts LIMIT ?)",
                    (excess,),
                ).rowcount
        return deleted

    def count(self) -> int:
        with self._tx(write=False) as conn:
            (count,) = conn.execute("SELECT count(*) FROM samples").fetchone()
        return int(count)


class AsyncHistory:
    """`HistoryStore` for trio code: each call is one `to_thread` hop through one
    `CapacityLimiter(1)`, so the connection is used by one thread at a time. A cancelled caller
    still waits for its statement (trio does not abandon the thread), so calls never overlap."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self._thread = SerialThread()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._thread.run(fn, *args, **kwargs)

    async def open(self) -> None:
        await self._run(self.store.open)

    async def close(self) -> None:
        await self._run(self.store.close)

    async def add(self, samples: list[Sample]) -> int:
        return await self._run(self.store.add, samples)

    async def range(
        self,
        from_ts: float | None = None,
        to_ts: float | None = None,
        metrics: list[str] | None = None,
        limit: int = 1000,
        *,
        after_ts: float | None = None,
    ) -> list[Sample]:
        return await self._run(self.store.range, from_ts, to_ts, metrics, limit, after_ts=after_ts)

    async def prune(self, now_ms: float) -> int:
        return await self._run(self.store.prune, now_ms)

    async def count(self) -> int:
        return await self._run(self.store.count)
