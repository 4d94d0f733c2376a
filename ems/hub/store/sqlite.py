"""The embedded store: one SQLite file in WAL mode, driven through stdlib sqlite3.

One connection, opened with `check_same_thread=False` because `AsyncStore` calls it from worker
threads (one at a time). The connection runs in autocommit mode and every method opens its own
explicit transaction, so one method call is exactly one transaction.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ems.hub.store._common import (
    COMMAND_COLUMNS,
    OPEN_SQL,
    RANK_SQL,
    dumps,
    fits_int64,
    loads,
    merge_marks,
    ranked_updates,
)
from ems.hub.store.base import (
    ArtifactRow,
    CommandRow,
    CommandUpdate,
    ConfigReport,
    ConfigState,
    Conflict,
    DeviceRecord,
    SampleRow,
    SessionRecord,
    StoreError,
    UserRecord,
    WriteBatch,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

# Schema migrations, applied in order by `open()`; a version is never edited once released,
# later steps append (version, statements).
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                name TEXT,
                owner TEXT,
                metadata TEXT NOT NULL,
                token_hash TEXT NOT NULL,
                created_at REAL NOT NULL,
                last_seen REAL,
                firmware TEXT,
                agent TEXT
            )""",
            "CREATE INDEX devices_owner ON devices (owner, device_id)",
            """CREATE TABLE users (
                username TEXT PRIMARY KEY,
                password_hash TEXT NOT NULL,
                role TEXT NOT NULL,
                created_at REAL NOT NULL
            )""",
            """CREATE TABLE sessions (
                token_hash TEXT PRIMARY KEY,
                username TEXT NOT NULL,
                expires_at REAL NOT NULL
            )""",
            "CREATE INDEX sessions_expires ON sessions (expires_at)",
            """CREATE TABLE telemetry (
                device_id TEXT NOT NULL,
                ts REAL NOT NULL,
                seq INTEGER NOT NULL,
                data TEXT NOT NULL,
                PRIMARY KEY (device_id, ts)
            )""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                ts REAL NOT NULL,
                level TEXT NOT NULL,
                code TEXT NOT NULL,
                message TEXT NOT NULL,
                data TEXT
            )""",
            "CREATE INDEX events_device_ts ON events (device_id, ts)",
            """CREATE TABLE alerts (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                device_id TEXT NOT NULL,
                ts REAL NOT NULL,
                level TEXT NOT NULL,
                code TEXT NOT NULL,
                message TEXT NOT NULL,
                data TEXT NOT NULL
            )""",
            "CREATE INDEX alerts_ts ON alerts (ts)",
            "CREATE INDEX alerts_device_ts ON alerts (device_id, ts)",
            """CREATE TABLE streams (
                device_id TEXT NOT NULL,
                stream TEXT NOT NULL,
                acked_seq INTEGER NOT NULL,
                PRIMARY KEY (device_id, stream)
            )""",
            """CREATE TABLE alert_rules (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                rules TEXT NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            # `n` orders commands created in the same millisecond (insertion order).
            """CREATE TABLE commands (
                n INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                device_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                name TEXT NOT NULL,
                params TEXT NOT NULL,
                payload TEXT NOT NULL,
                status TEXT NOT NULL,
                progress REAL,
                result TEXT,
                error TEXT,
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                expires_at REAL,
                delivery TEXT NOT NULL
            )""",
            "CREATE INDEX commands_device_status ON commands (device_id, status, created_at)",
            "CREATE INDEX commands_device_created ON commands (device_id, created_at)",
            "CREATE INDEX commands_status_expires ON commands (status, expires_at)",
            """CREATE TABLE configs (
                device_id TEXT PRIMARY KEY,
                desired_version INTEGER NOT NULL,
                desired TEXT NOT NULL,
                reported_version INTEGER,
                reported_status TEXT,
                reported_error TEXT,
                updated_at REAL NOT NULL
            )""",
            """CREATE TABLE artifacts (
                sha256 TEXT PRIMARY KEY,
                size INTEGER NOT NULL,
                version TEXT NOT NULL,
                signature TEXT,
                created_at REAL NOT NULL
            )""",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_ALERT_KEYS = ("id", "device_id", "ts", "level", "code", "message")
_DEVICE_COLUMNS = (
    "device_id, name, owner, metadata, token_hash, created_at, last_seen, firmware, agent"
)


_CONFIG_COLUMNS = (
    "device_id, desired_version, desired, reported_version, reported_status, reported_error, "
    "updated_at"
)
_ARTIFACT_COLUMNS = "sha256, size, version, signature, created_at"
# One command update: only to a higher rank, or `running` again (progress); fields the update
# does not carry keep their stored value.
_UPDATE_COMMAND = (
    "UPDATE commands SET status = ?, progress = coalesce(?, progress), "
    "result = coalesce(?, result), error = coalesce(?, error), updated_at = ? "
    f"WHERE id = ? AND device_id = ? AND ({RANK_SQL} < ? OR (? AND status = 'running'))"
)
_CONFIG_REPORT = (
    f"INSERT INTO configs ({_CONFIG_COLUMNS}) SELECT ?, 0, '{{}}', ?, ?, ?, ? "
    "WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = ?) "
    "ON CONFLICT (device_id) DO UPDATE SET reported_version = excluded.reported_version, "
    "reported_status = excluded.reported_status, reported_error = excluded.reported_error, "
    "updated_at = excluded.updated_at "
    "WHERE configs.reported_version IS NULL "
    "OR excluded.reported_version >= configs.reported_version"
)

_UNIQUE_CODES = (sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY)


@contextlib.contextmanager
def _translate() -> Iterator[None]:
    """sqlite3 errors as StoreError; a unique-key violation as Conflict."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorcode in _UNIQUE_CODES:
            raise Conflict(str(exc)) from exc
        raise StoreError(str(exc)) from exc
    except sqlite3.Error as exc:
        raise StoreError(str(exc)) from exc


_SAMPLE_COLUMNS = 4
_MAX_CHUNK_ROWS = 1024


@functools.cache
def _samples_sql(rows: int) -> str:
    """`INSERT` of `rows` telemetry rows (a duplicate `(device_id, ts)` is skipped)."""
    values = ",".join(["(?, ?, ?, ?)"] * rows)
    return (
        f"INSERT INTO telemetry (device_id, ts, seq, data) VALUES {values} "
        "ON CONFLICT (device_id, ts) DO NOTHING"
    )


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        name=row[1],
        owner=row[2],
        metadata=loads(row[3]),
        token_hash=row[4],
        created_at=row[5],
        last_seen=row[6],
        firmware=row[7],
        agent=row[8],
    )


def _sample(device_id: str, row: tuple[Any, ...]) -> SampleRow:
    return SampleRow(device_id=device_id, seq=row[0], ts=row[1], data=loads(row[2]))


def _command(row: tuple[Any, ...]) -> CommandRow:
    return CommandRow(
        id=row[0],
        device_id=row[1],
        kind=row[2],
        name=row[3],
        params=loads(row[4]),
        payload=loads(row[5]),
        status=row[6],
        progress=row[7],
        result=None if row[8] is None else loads(row[8]),
        error=row[9],
        created_at=row[10],
        updated_at=row[11],
        expires_at=row[12],
        delivery=row[13],
    )


def _config(row: tuple[Any, ...]) -> ConfigState:
    return ConfigState(
        device_id=row[0],
        desired_version=row[1],
        desired=loads(row[2]),
        reported_version=row[3],
        reported_status=row[4],
        reported_error=row[5],
        updated_at=row[6],
    )


def _artifact(row: tuple[Any, ...]) -> ArtifactRow:
    return ArtifactRow(
        sha256=row[0], size=row[1], version=row[2], signature=row[3], created_at=row[4]
    )


def _update_params(updates: Iterable[CommandUpdate]) -> list[tuple[Any, ...]]:
    return [
        (
            u.status,
            None if u.progress is None else float(u.progress),
            None if u.result is None else dumps(u.result),
            u.error,
            u.at,
            u.id,
            u.device_id,
            rank,
            repeat,
        )
        for u, rank, repeat in ranked_updates(updates)
    ]


def _report_params(reports: Iterable[ConfigReport]) -> list[tuple[Any, ...]]:
    return [
        (r.device_id, r.version, r.status, r.error, r.at, r.device_id)
        for r in reports
        if fits_int64(r.version)
    ]


class SqliteStore:
    """The Store protocol on one SQLite file (see ems.hub.store.base for the contract)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        if self._conn is not None:
            return
        with _translate():
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                conn.execute("PRAGMA busy_timeout = 5000")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal" and str(self.path) != ":memory:":
                    raise StoreError(f"{self.path}: could not switch to WAL (mode {mode})")
                conn.execute("PRAGMA synchronous = NORMAL")
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
        self._conn = conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
            )
            current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this program's "
                    f"({SCHEMA_VERSION})"
                )
            for version, statements in MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, time.time() * 1000),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with _translate():
                conn.close()

    def ping(self) -> None:
        with self._tx(write=False) as conn:
            conn.execute("SELECT 1").fetchone()

    @contextlib.contextmanager
    def _tx(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE for writes so a busy database fails at BEGIN, not later."""
        conn = self._conn
        if conn is None:
            raise StoreError("store is not open")
        with _translate():
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # --- ingest ----------------------------------------------------------------------------
    def write_batch(self, batch: WriteBatch) -> None:
        with self._tx() as conn:
            if batch.samples:
                encode = orjson.dumps  # inline `dumps`: one Python call less per row
                params: list[Any] = []
                for s in batch.samples:
                    params += (s.device_id, s.ts, s.seq, encode(s.data).decode())
                self._insert_samples(conn, params)
            if batch.events:
                conn.executemany(
                    "INSERT INTO events (device_id, seq, ts, level, code, message, data) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            e.device_id,
                            e.seq,
                            e.ts,
                            e.level,
                            e.code,
                            e.message,
                            None if e.data is None else dumps(e.data),
                        )
                        for e in batch.events
                    ],
                )
            if batch.alerts:
                conn.executemany(
                    "INSERT INTO alerts (device_id, ts, level, code, message, data) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (a.device_id, a.ts, a.level, a.code, a.message, dumps(a.data))
                        for a in batch.alerts
                    ],
                )
            if batch.marks:
                conn.executemany(
                    "INSERT INTO streams (device_id, stream, acked_seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (device_id, stream) "
                    "DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)",
                    merge_marks(batch.marks),
                )
            if batch.last_seen:
                conn.executemany(
                    "UPDATE devices SET last_seen = ? "
                    "WHERE device_id = ? AND (last_seen IS NULL OR last_seen < ?)",
                    [(ts, device_id, ts) for device_id, ts in batch.last_seen.items()],
                )
            if batch.device_info:
                conn.executemany(
                    "UPDATE devices SET firmware = ?, agent = ? WHERE device_id = ?",
                    [(fw, agent, d) for d, (fw, agent) in batch.device_info.items()],
                )
            if batch.command_updates:
                conn.executemany(_UPDATE_COMMAND, _update_params(batch.command_updates))
            if batch.config_reports:
                conn.executemany(_CONFIG_REPORT, _report_params(batch.config_reports))

    @staticmethod
    def _insert_samples(conn: sqlite3.Connection, params: list[Any]) -> None:
        """Many rows per INSERT statement, in power-of-two chunks.

        `executemany` steps the statement once per row, and each step releases and takes back
        the GIL: with the event loop's thread busy, every row then waits for its turn (a
        microbenchmark beside a busy thread: 374 µs per row against 4 µs alone). One statement
        per chunk (up to 1,024 rows, within this SQLite's limit on bound variables) takes it
        back once per chunk; the sizes are powers of two, so a handful of statements stay
        prepared in the connection's cache.
        """
        limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _SAMPLE_COLUMNS
        size = 1 << (min(limit, _MAX_CHUNK_ROWS).bit_length() - 1)
        rows = len(params) // _SAMPLE_COLUMNS
        done = 0
        while done < rows:
            while size > rows - done:
                size //= 2
            chunk = params[done * _SAMPLE_COLUMNS : (done + size) * _SAMPLE_COLUMNS]
            conn.execute(_samples_sql(size), chunk)
            done += size

    def acked_seq(self, device_id: str, stream: str) -> int:
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT acked_seq FROM streams WHERE device_id = ? AND stream = ?",
                (device_id, stream),
            ).fetchone()
        return 0 if row is None else int(row[0])

    # --- telemetry reads -------------------------------------------------------------------
    def samples(
        self, device_id: str, *, since: float | None, until: float | None, limit: int
    ) -> list[SampleRow]:
        if limit <= 0:
            return []
        sql = "SELECT seq, ts, data FROM telemetry WHERE device_id = ?"
        params: list[Any] = [device_id]
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        if until is not None:
            sql += " AND ts <= ?"
            params.append(until)
        sql += " ORDER BY ts DESC LIMIT ?"
        params.append(limit)
        with self._tx(write=False) as conn:
            rows = conn.execute(sql, params).fetchall()
        rows.reverse()
        return [_sample(device_id, row) for row in rows]

    def latest(self, device_id: str) -> SampleRow | None:
        return self.latest_many([device_id]).get(device_id)

    def latest_many(self, device_ids: list[str]) -> dict[str, SampleRow]:
        result: dict[str, SampleRow] = {}
        if not device_ids:
            return result
        with self._tx(write=False) as conn:
            # One primary-key seek per device: cheaper in SQLite than any grouped query.
            for device_id in dict.fromkeys(device_ids):
                row = conn.execute(
                    "SELECT seq, ts, data FROM telemetry WHERE device_id = ? "
                    "ORDER BY ts DESC LIMIT 1",
                    (device_id,),
                ).fetchone()
                if row is not None:
                    result[device_id] = _sample(device_id, row)
        return result

    # --- devices -----------------------------------------------------------------------------
    def create_device(self, device: DeviceRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    device.device_id,
                    device.name,
                    device.owner,
                    dumps(device.metadata),
                    device.token_hash,
                    device.created_at,
                    device.last_seen,
                    device.firmware,
                    device.agent,
                ),
            )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, owner: str | None = None) -> list[DeviceRecord]:
        with self._tx(write=False) as conn:
            if owner is None:
                rows = conn.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE owner = ? ORDER BY device_id",
                    (owner,),
                ).fetchall()
        return [_device(row) for row in rows]

    def delete_device(self, device_id: str) -> bool:
        with self._tx() as conn:
            existed = conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            for table in ("telemetry", "events", "alerts", "streams", "commands", "configs"):
                conn.execute(f"DELETE FROM {table} WHERE device_id = ?", (device_id,))
            return existed.rowcount > 0

    def set_token_hash(self, device_id: str, token_hash: str) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE devices SET token_hash = ? WHERE device_id = ?", (token_hash, device_id)
            )
            return cur.rowcount > 0

    def set_device_info(self, device_id: str, *, firmware: str | None, agent: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE devices SET firmware = ?, agent = ? WHERE device_id = ?",
                (firmware, agent, device_id),
            )

    # --- users and login sessions ----------------------------------------------------------
    def create_user(self, user: UserRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO users (username, password_hash, role, created_at) VALUES (?, ?, ?, ?)",
                (user.username, user.password_hash, user.role, user.created_at),
            )

    def get_user(self, username: str) -> UserRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT username, password_hash, role, created_at FROM users WHERE username = ?",
                (username,),
            ).fetchone()
        if row is None:
            return None
        return UserRecord(username=row[0], password_hash=row[1], role=row[2], created_at=row[3])

    def list_users(self) -> list[UserRecord]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT username, password_hash, role, created_at FROM users ORDER BY username"
            ).fetchall()
        return [
            UserRecord(username=r[0], password_hash=r[1], role=r[2], created_at=r[3]) for r in rows
        ]

    def create_session(self, session: SessionRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO sessions (token_hash, username, expires_at) VALUES (?, ?, ?)",
                (session.token_hash, session.username, session.expires_at),
            )

    def get_session(self, token_hash: str) -> SessionRecord | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                "SELECT token_hash, username, expires_at FROM sessions WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        if row is None:
            return None
        return SessionRecord(token_hash=row[0], username=row[1], expires_at=row[2])

    def delete_session(self, token_hash: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    def purge_sessions(self, now: float) -> int:
        with self._tx() as conn:
            return conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

    # --- alerts ------------------------------------------------------------------------------
    def alerts(
        self, *, device_ids: list[str] | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        if limit <= 0 or (device_ids is not None and not device_ids):
            return []
        sql = "SELECT id, device_id, ts, level, code, message FROM alerts WHERE 1 = 1"
        params: list[Any] = []
        if device_ids is not None:
            sql += " AND device_id IN (SELECT value FROM json_each(?))"
            params.append(dumps(device_ids))
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        params.append(limit)
        with self._tx(write=False) as conn:
            rows = conn.execute(sql, params).fetchall()
        rows.reverse()
        return [dict(zip(_ALERT_KEYS, row, strict=True)) for row in rows]

    def get_alert_rules(self) -> list[dict[str, Any]] | None:
        with self._tx(write=False) as conn:
            row = conn.execute("SELECT rules FROM alert_rules WHERE id = 1").fetchone()
        return None if row is None else loads(row[0])

    def put_alert_rules(self, rules: list[dict[str, Any]]) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO alert_rules (id, rules) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET rules = excluded.rules",
                (dumps(rules),),
            )

    # --- commands --------------------------------------------------------------------------
    def create_command(
        self, command: CommandRow, *, max_pending: int, supersede: bool
    ) -> list[str]:
        with self._tx() as conn:
            superseded: list[str] = []
            if supersede:
                superseded = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM commands WHERE device_id = ? AND kind = ? AND {OPEN_SQL} "
                        "ORDER BY created_at, n",
                        (command.device_id, command.kind),
                    ).fetchall()
                ]
                conn.execute(
                    "UPDATE commands SET status = 'expired', error = ?, updated_at = ? "
                    f"WHERE device_id = ? AND kind = ? AND {OPEN_SQL}",
                    (
                        f"superseded by {command.id}",
                        command.created_at,
                        command.device_id,
                        command.kind,
                    ),
                )
            pending = conn.execute(
                "SELECT count(*) FROM commands WHERE device_id = ? AND status = 'pending'",
                (command.device_id,),
            ).fetchone()[0]
            if pending >= max_pending:
                # Raised inside the transaction: the superseding above is rolled back too.
                raise Conflict(
                    f"device {command.device_id} already holds {pending} pending commands"
                )
            conn.execute(
                f"INSERT INTO commands ({COMMAND_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)",
                (
                    command.id,
                    command.device_id,
                    command.kind,
                    command.name,
                    dumps(command.params),
                    dumps(command.payload),
                    None if command.progress is None else float(command.progress),
                    None if command.result is None else dumps(command.result),
                    command.error,
                    command.created_at,
                    command.updated_at,
                    command.expires_at,
                    command.delivery,
                ),
            )
            return superseded

    def get_command(self, command_id: str) -> CommandRow | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        return None if row is None else _command(row)

    def list_commands(self, device_id: str, *, limit: int) -> list[CommandRow]:
        if limit <= 0:
            return []
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ? "
                "ORDER BY created_at DESC, n DESC LIMIT ?",
                (device_id, limit),
            ).fetchall()
        rows.reverse()
        return [_command(row) for row in rows]

    def deliverable_commands(self, device_id: str, now: float) -> list[CommandRow]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = ? AND {OPEN_SQL} "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY created_at, n",
                (device_id, now),
            ).fetchall()
        return [_command(row) for row in rows]

    def update_command(self, update: CommandUpdate) -> CommandRow | None:
        with self._tx() as conn:
            params = _update_params([update])
            if params:
                conn.execute(_UPDATE_COMMAND, params[0])
            row = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ? AND device_id = ?",
                (update.id, update.device_id),
            ).fetchone()
        return None if row is None else _command(row)

    def changed_commands(self, ids: list[str]) -> list[CommandRow]:
        if not ids:
            return []
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands "
                "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY created_at, n",
                (dumps(list(ids)),),
            ).fetchall()
        return [_command(row) for row in rows]

    def expire_commands(self, now: float) -> list[CommandRow]:
        with self._tx() as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    f"UPDATE commands SET status = 'expired', updated_at = ? "
                    f"WHERE {OPEN_SQL} AND expires_at <= ? RETURNING id",
                    (now, now),
                ).fetchall()
            ]
            if not ids:
                return []
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands "
                "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY created_at, n",
                (dumps(ids),),
            ).fetchall()
        return [_command(row) for row in rows]

    # --- config ------------------------------------------------------------------------------
    def put_desired_config(self, device_id: str, config: dict[str, Any], now: float) -> ConfigState:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO configs (device_id, desired_version, desired, updated_at) "
                "VALUES (?, 1, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                "desired_version = configs.desired_version + 1, desired = excluded.desired, "
                "updated_at = excluded.updated_at",
                (device_id, dumps(config), now),
            )
            row = conn.execute(
                f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE device_id = ?", (device_id,)
            ).fetchone()
        return _config(row)

    def get_config(self, device_id: str) -> ConfigState | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else _config(row)

    # --- artifacts ---------------------------------------------------------------------------
    def put_artifact(self, artifact: ArtifactRow) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (
                    artifact.sha256,
                    artifact.size,
                    artifact.version,
                    artifact.signature,
                    artifact.created_at,
                ),
            )

    def get_artifact(self, sha256: str) -> ArtifactRow | None:
        with self._tx(write=False) as conn:
            row = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE sha256 = ?", (sha256,)
            ).fetchone()
        return None if row is None else _artifact(row)

    def list_artifacts(self) -> list[ArtifactRow]:
        with self._tx(write=False) as conn:
            rows = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts ORDER BY created_at, sha256"
            ).fetchall()
        return [_artifact(row) for row in rows]
