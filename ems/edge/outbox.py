"""The agent's durable state: the outbox of unacknowledged messages, the stream and its seq
counter, the at-most-once command record and the applied config, in one SQLite file (WAL).

A reliable message is written (with its seq) before it is sent and deleted when acknowledged;
after a reconnect, a restart or a `kill -9` whatever is left is sent again, oldest first. The
outbox is bounded by `max_bytes`: when full, the oldest telemetry and history go first, then
events; command results and config reports are never dropped. What was dropped is counted, so
the agent can report it (heartbeat `status` and one `event`).

`Outbox` is synchronous; `AsyncOutbox` runs it on one worker thread at a time for trio code.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import attrs
import orjson

from ems.protocol import messages as m
from ems.protocol._window import CommandRecord
from ems.threads import SerialThread

P = ParamSpec("P")
T = TypeVar("T")

# Kinds in the order they may be dropped when the outbox is full (never: the rest).
DROP_ORDER = ("telemetry", "history", "event")
NEVER_DROPPED = ("command_result", "config_applied")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox (kind, seq);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    result TEXT,
    error TEXT,
    name TEXT,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS config (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    document TEXT NOT NULL
);
"""


class OutboxError(Exception):
    """The outbox file is unusable (corrupt, unreadable): the agent cannot run safely."""


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int = 64 * 2**20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self.stream = ""
        self.last_seq = 0
        self._bytes = 0
        self._count = 0
        self._dropped_total = 0

    # --- lifetime ----------------------------------------------------------------------------

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a Pi loses power; the outbox must not
            db.executescript(_SCHEMA)
            self._db = db
            stream = self._meta("stream")
            if stream is None:
                stream = secrets.token_hex(8)  # a lost outbox starts a new stream
                self._set_meta("stream", stream)
            self.stream = stream
            last = int(self._meta("last_seq") or 0)
            top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
            self.last_seq = max(last, top)
            self._recount()
            self._dropped_total = int(self._meta("dropped_total") or 0)
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"{self.path}: {exc}") from exc

    def _recount(self) -> None:
        size, count = self.db.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM outbox"
        ).fetchone()
        self._bytes, self._count = int(size), int(count)

    @property
    def bytes_queued(self) -> int:
        return self._bytes

    @property
    def count_queued(self) -> int:
        return self._count

    @property
    def dropped_total(self) -> int:
        return self._dropped_total

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise OutboxError("the outbox is not open")
        return self._db

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --- messages ------------------------------------------------------------------------------

    def append(self, message: m.ReliableMessage, encode: Callable[[Any], str]) -> tuple[int, str]:
        """Give `message` the next seq, store it, and return (seq, its frame)."""
        return self.append_many([message], encode)[0]

    def append_many(
        self,
        messages: list[m.ReliableMessage],
        encode: Callable[[Any], str],
        command_names: dict[str, str] | None = None,
    ) -> list[tuple[int, str]]:
        """Store several messages in one transaction (each with its own seq). A command result
        also updates the command record, in the same transaction."""
        db = self.db
        out = []
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = self.last_seq
            for message in messages:
                seq += 1
                text = encode(_with_seq(message, seq))
                size = len(text)
                db.execute(
                    "INSERT INTO outbox (seq, kind, text, size) VALUES (?, ?, ?, ?)",
                    (seq, message.TYPE, text, size),
                )
                if isinstance(message, m.CommandResult):
                    self._record(message, (command_names or {}).get(message.id))
                self._bytes += size
                self._count += 1
                out.append((seq, text))
            self._set_meta("last_seq", str(seq))
            self._enforce_bound()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.last_seq = seq
        return out

    def _enforce_bound(self) -> None:
        if self._bytes <= self.max_bytes:
            return
        db = self.db
        dropped = 0
        for kind in DROP_ORDER:
            while self._bytes > self.max_bytes:
                rows = db.execute(
                    "SELECT seq, size FROM outbox WHERE kind = ? ORDER BY seq LIMIT 256", (kind,)
                ).fetchall()
                if not rows:
                    break
                for seq, size in rows:
                    if self._bytes <= self.max_bytes:
                        break
                    db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
                    self._bytes -= size
                    self._count -= 1
                    dropped += 1
        if dropped:
            total = int(self._meta("dropped_unreported") or 0) + dropped
            self._set_meta("dropped_unreported", str(total))
            self._dropped_total += dropped
            self._set_meta("dropped_total", str(self._dropped_total))

    def pending(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """Stored messages with seq > `after_seq`, oldest first."""
        rows = self.db.execute(
            "SELECT seq, text FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [(int(seq), str(text)) for seq, text in rows]

    def ack(self, seq: int) -> int:
        """Drop everything acknowledged (seq <= `seq`); how many went."""
        db = self.db
        freed, count = db.execute(
            "SELECT coalesce(sum(size), 0), count(*) FROM outbox WHERE seq <= ?", (seq,)
        ).fetchone()
        if count:
            db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))
            self._bytes -= freed
            self._count -= count
        return int(count)

    def take_dropped(self) -> tuple[int, int]:
        """(dropped since last asked, dropped ever); the first resets."""
        unreported = int(self._meta("dropped_unreported") or 0)
        if unreported:
            self._set_meta("dropped_unreported", "0")
        return unreported, self._dropped_total

    # --- the command record -------------------------------------------------------------------

    def _record(self, result: m.CommandResult, name: str | None = None) -> None:
        self.db.execute(
            "INSERT INTO commands (id, status, result, error, name, updated) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
            "result = excluded.result, error = excluded.error, "
            "name = coalesce(excluded.name, commands.name), updated = excluded.updated",
            (
                result.id,
                result.status.value,
                None if result.result is None else orjson.dumps(result.result).decode(),
                result.error,
                name,
                self._next_order(),
            ),
        )

    def _next_order(self) -> int:
        top = self.db.execute("SELECT coalesce(max(updated), 0) FROM commands").fetchone()[0]
        return int(top) + 1

    def record_received(
        self, command_id: str, name: str, encode: Callable[[Any], str]
    ) -> tuple[int, str]:
        """Persist that `command_id` arrived and queue its `received`, in one transaction,
        before the command runs: a redelivery after any crash finds it in the record."""
        received = m.CommandResult(seq=0, id=command_id, status=m.CommandState.RECEIVED)
        return self.append_many([received], encode, {command_id: name})[0]

    def load_record(self, capacity: int = 10_000) -> tuple[CommandRecord, dict[str, str | None]]:
        """The command record (oldest first) and each id's command name."""
        record = CommandRecord(capacity=capacity)
        names: dict[str, str | None] = {}
        rows = self.db.execute(
            "SELECT id, status, result, error, name FROM commands ORDER BY updated"
        ).fetchall()
        for command_id, status, result, error, name in rows:
            record.update(
                m.CommandResult(
                    seq=0,
                    id=command_id,
                    status=m.CommandState(status),
                    result=None if result is None else orjson.loads(result),
                    error=error,
                )
            )
            names[command_id] = name
        excess = len(rows) - capacity
        if excess > 0:
            self.db.execute(
                "DELETE FROM commands WHERE id IN (SELECT id FROM commands "
                "WHERE status IN ('succeeded','failed','rejected') ORDER BY updated LIMIT ?)",
                (excess,),
            )
        return record, names

    # --- config ----------------------------------------------------------------------------------

    def save_config(self, version: int, document: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO config (id, version, document) VALUES (1, ?, ?) ON CONFLICT (id) "
            "DO UPDATE SET version = excluded.version, document = excluded.document",
            (version, orjson.dumps(document).decode()),
        )

    def load_config(self) -> tuple[int, dict[str, Any]]:
        row = self.db.execute("SELECT version, document FROM config WHERE id = 1").fetchone()
        if row is None:
            return 0, {}
        return int(row[0]), orjson.loads(row[1])


def _with_seq(message: m.ReliableMessage, seq: int) -> m.ReliableMessage:
    return attrs.evolve(message, seq=seq)


class AsyncOutbox:
    """The outbox for trio code: every call is one hop to a worker thread, one at a time."""

    def __init__(self, outbox: Outbox) -> None:
        self.sync = outbox
        self._thread = SerialThread()

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._thread.run(fn, *args, **kwargs)

    @property
    def stream(self) -> str:
        return self.sync.stream
