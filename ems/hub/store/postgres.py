"""The PostgreSQL store (psycopg 3, synchronous API, one connection).

`AsyncStore` calls it from one worker thread at a time. The connection runs in autocommit mode
and every method is one explicit transaction. A connection that breaks (server restart, network)
is dropped and the next call connects again, so the hub recovers without a restart.

Telemetry ingest: batches of at least `COPY_MIN_ROWS` samples are copied into a per-connection
temporary staging table and moved with one `INSERT ... SELECT ... ON CONFLICT DO NOTHING`
(about twice as fast as pipelined `executemany` at 1,000-5,000 rows); smaller batches use one
multi-row `INSERT ... VALUES`, which costs a single round trip.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
import psycopg.errors
from psycopg.types.json import set_json_loads

from ems.hub.store._common import (
    COMMAND_COLUMNS,
    OPEN_SQL,
    RANK_SQL,
    dumps,
    fits_int64,
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

log = logging.getLogger(__name__)

COPY_MIN_ROWS = 200  # below this, one multi-row VALUES statement beats COPY's extra round trips
_MIGRATION_LOCK = 0x454D5301  # pg_advisory_xact_lock key: hubs starting together migrate in turn
_COMMANDS_LOCK = 0x454D5302  # with hashtext(device_id): one command creation per device at once

# Schema migrations, applied in order by `open()`; a version is never edited once released,
# later steps append (version, statements). Identifiers use the "C" collation so ordering
# matches SQLite's (byte order) whatever the database's locale.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE devices (
                device_id text COLLATE "C" PRIMARY KEY,
                name text,
                owner text COLLATE "C",
                metadata jsonb NOT NULL,
                token_hash text NOT NULL,
                created_at double precision NOT NULL,
                last_seen double precision,
                firmware text,
                agent text
            )""",
            "CREATE INDEX devices_owner ON devices (owner, device_id)",
            """CREATE TABLE users (
                username text COLLATE "C" PRIMARY KEY,
                password_hash text NOT NULL,
                role text NOT NULL,
                created_at double precision NOT NULL
            )""",
            """CREATE TABLE sessions (
                token_hash text PRIMARY KEY,
                username text COLLATE "C" NOT NULL,
                expires_at double precision NOT NULL
            )""",
            "CREATE INDEX sessions_expires ON sessions (expires_at)",
            """CREATE TABLE telemetry (
                device_id text COLLATE "C" NOT NULL,
                ts double precision NOT NULL,
                seq bigint NOT NULL,
                data jsonb NOT NULL,
                PRIMARY KEY (device_id, ts)
            )""",
            "CREATE INDEX telemetry_ts_brin ON telemetry USING brin (ts)",
            """CREATE TABLE events (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device_id text COLLATE "C" NOT NULL,
                seq bigint NOT NULL,
                ts double precision NOT NULL,
                level text NOT NULL,
                code text NOT NULL,
                message text NOT NULL,
                data jsonb
            )""",
            "CREATE INDEX events_device_ts ON events (device_id, ts)",
            """CREATE TABLE alerts (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                device_id text COLLATE "C" NOT NULL,
                ts double precision NOT NULL,
                level text NOT NULL,
                code text NOT NULL,
                message text NOT NULL,
                data jsonb NOT NULL
            )""",
            "CREATE INDEX alerts_ts ON alerts (ts)",
            "CREATE INDEX alerts_device_ts ON alerts (device_id, ts)",
            """CREATE TABLE streams (
                device_id text COLLATE "C" NOT NULL,
                stream text COLLATE "C" NOT NULL,
                acked_seq bigint NOT NULL,
                PRIMARY KEY (device_id, stream)
            )""",
            # `json`, not `jsonb`: the rule document comes back exactly as it was put.
            """CREATE TABLE alert_rules (
                id integer PRIMARY KEY CHECK (id = 1),
                rules json NOT NULL
            )""",
        ],
    ),
    (
        2,
        [
            # JSON documents are `json` (exact text: key order kept, as sent); `n` orders
            # commands created in the same millisecond (insertion order).
            """CREATE TABLE commands (
                n bigint GENERATED ALWAYS AS IDENTITY,
                id text COLLATE "C" PRIMARY KEY,
                device_id text COLLATE "C" NOT NULL,
                kind text NOT NULL,
                name text NOT NULL,
                params json NOT NULL,
                payload json NOT NULL,
                status text NOT NULL,
                progress double precision,
                result json,
                error text,
                created_at double precision NOT NULL,
                updated_at double precision NOT NULL,
                expires_at double precision,
                delivery text NOT NULL
            )""",
            "CREATE INDEX commands_device_status ON commands (device_id, status, created_at)",
            "CREATE INDEX commands_device_created ON commands (device_id, created_at)",
            "CREATE INDEX commands_status_expires ON commands (status, expires_at)",
            """CREATE TABLE configs (
                device_id text COLLATE "C" PRIMARY KEY,
                desired_version bigint NOT NULL,
                desired json NOT NULL,
                reported_version bigint,
                reported_status text,
                reported_error text,
                updated_at double precision NOT NULL
            )""",
            """CREATE TABLE artifacts (
                sha256 text COLLATE "C" PRIMARY KEY,
                size bigint NOT NULL,
                version text NOT NULL,
                signature text,
                created_at double precision NOT NULL
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
    "UPDATE commands SET status = %s, progress = COALESCE(%s::double precision, progress), "
    "result = COALESCE(%s::json, result), error = COALESCE(%s::text, error), updated_at = %s "
    f"WHERE id = %s AND device_id = %s AND ({RANK_SQL} < %s OR (%s AND status = 'running'))"
)
_CONFIG_REPORT = (
    f"INSERT INTO configs ({_CONFIG_COLUMNS}) "
    "SELECT %s, 0, '{}'::json, %s, %s, %s, %s "
    "WHERE EXISTS (SELECT 1 FROM devices WHERE device_id = %s) "
    "ON CONFLICT (device_id) DO UPDATE SET reported_version = EXCLUDED.reported_version, "
    "reported_status = EXCLUDED.reported_status, reported_error = EXCLUDED.reported_error, "
    "updated_at = EXCLUDED.updated_at "
    "WHERE configs.reported_version IS NULL "
    "OR EXCLUDED.reported_version >= configs.reported_version"
)
_STAGING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS ems_telemetry_staging (n integer NOT NULL, "
    "device_id text NOT NULL, ts double precision NOT NULL, seq bigint NOT NULL, "
    "data jsonb NOT NULL) ON COMMIT DELETE ROWS"
)


def _create_hypertable(conn: psycopg.Connection[Any]) -> None:
    """Partition telemetry by time when TimescaleDB is installed (untested here: not in Debian).

    TimescaleDB partitions only on time or integer columns, so the float ms `ts` goes through an
    immutable function to bigint ms; chunks hold one day. A failure (e.g. the library is not in
    shared_preload_libraries) leaves a plain table, which works the same, only slower at scale."""
    if not conn.execute(
        "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'"
    ).fetchone():
        return
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            conn.execute(
                "CREATE OR REPLACE FUNCTION ems_ts_ms(ts double precision) RETURNS bigint "
                "LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS 'SELECT floor(ts)::bigint'"
            )
            conn.execute(
                "SELECT create_hypertable('telemetry', 'ts', chunk_time_interval => 86400000, "
                "time_partitioning_func => 'ems_ts_ms', create_default_indexes => false, "
                "migrate_data => true, if_not_exists => true)"
            )
    except psycopg.Error as exc:
        log.warning("TimescaleDB found but telemetry stays a plain table: %s", exc)


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; store U+FFFD instead of failing the whole batch."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _denul(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k): _denul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_denul(v) for v in value]
    return value


def _json(value: Any) -> str:
    """JSON text for a jsonb column (which rejects the escape \\u0000)."""
    text = dumps(value)
    if "\\u0000" in text:
        text = dumps(_denul(value))
    return text


@functools.lru_cache(maxsize=COPY_MIN_ROWS)
def _values_sql(rows: int) -> str:
    values = ", ".join(["(%s, %s, %s, %s::jsonb)"] * rows)
    return (
        f"INSERT INTO telemetry (device_id, ts, seq, data) VALUES {values} "
        "ON CONFLICT (device_id, ts) DO NOTHING"
    )


def _device(row: tuple[Any, ...]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        name=row[1],
        owner=row[2],
        metadata=row[3],
        token_hash=row[4],
        created_at=row[5],
        last_seen=row[6],
        firmware=row[7],
        agent=row[8],
    )


def _sample(device_id: str, row: tuple[Any, ...]) -> SampleRow:
    return SampleRow(device_id=device_id, seq=row[0], ts=row[1], data=row[2])


def _opt_text(value: str | None) -> str | None:
    return None if value is None else _text(value)


def _command(row: tuple[Any, ...]) -> CommandRow:
    return CommandRow(
        id=row[0],
        device_id=row[1],
        kind=row[2],
        name=row[3],
        params=row[4],
        payload=row[5],
        status=row[6],
        progress=row[7],
        result=row[8],
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
        desired=row[2],
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
    # Sorted by id (stable: one command's updates keep their order), so hubs sharing the
    # database lock command rows in one order.
    return [
        (
            _text(u.status),
            None if u.progress is None else float(u.progress),
            None if u.result is None else _json(u.result),
            _opt_text(u.error),
            float(u.at),
            _text(u.id),
            u.device_id,
            rank,
            repeat,
        )
        for u, rank, repeat in sorted(ranked_updates(updates), key=lambda item: item[0].id)
    ]


def _report_params(reports: Iterable[ConfigReport]) -> list[tuple[Any, ...]]:
    return [
        (r.device_id, r.version, _text(r.status), _opt_text(r.error), float(r.at), r.device_id)
        for r in sorted(reports, key=lambda report: report.device_id)
        if fits_int64(r.version)
    ]


class PostgresStore:
    """The Store protocol on PostgreSQL (see ems.hub.store.base for the contract)."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._opened = False

    # --- lifecycle -------------------------------------------------------------------------
    def open(self) -> None:
        if self._opened and self._conn is not None and not self._conn.closed:
            return
        conn = self._connect()
        try:
            with self._translate(conn), conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._opened = True

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, round(self.connect_timeout))
            )
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            set_json_loads(orjson.loads, conn)
            with self._translate(conn):
                conn.execute(_STAGING)
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _migrate(conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version integer PRIMARY KEY, applied_at double precision NOT NULL)"
        )
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = (row[0] if row else None) or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {current} is newer than this program's ({SCHEMA_VERSION})"
            )
        for version, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)
            if version == 1:
                _create_hypertable(conn)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES (%s, %s)",
                (version, time.time() * 1000),
            )

    def close(self) -> None:
        self._opened = False
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def ping(self) -> None:
        with self._tx() as conn:
            conn.execute("SELECT 1").fetchone()

    @contextlib.contextmanager
    def _translate(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """psycopg errors as StoreError (Conflict for a unique key); forget a broken link."""
        try:
            yield
        except psycopg.errors.UniqueViolation as exc:
            raise Conflict(str(exc)) from exc
        except psycopg.Error as exc:
            if (conn.broken or conn.closed) and self._conn is conn:
                self._conn = None
                conn.close()
            raise StoreError(str(exc)) from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._opened:
            raise StoreError("store is not open")
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = self._connect()
        with self._translate(conn), conn.transaction():
            yield conn

    # --- ingest ----------------------------------------------------------------------------
    def write_batch(self, batch: WriteBatch) -> None:
        with self._tx() as conn:
            if batch.samples:
                self._insert_samples(conn, batch)
            # One pipeline for the small statements: a single round trip (COPY cannot be in one).
            with conn.pipeline(), conn.cursor() as cur:
                if batch.events:
                    cur.executemany(
                        "INSERT INTO events (device_id, seq, ts, level, code, message, data) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb)",
                        [
                            (
                                e.device_id,
                                e.seq,
                                float(e.ts),
                                _text(e.level),
                                _text(e.code),
                                _text(e.message),
                                None if e.data is None else _json(e.data),
                            )
                            for e in batch.events
                        ],
                    )
                if batch.alerts:
                    cur.executemany(
                        "INSERT INTO alerts (device_id, ts, level, code, message, data) "
                        "VALUES (%s, %s, %s, %s, %s, %s::jsonb)",
                        [
                            (
                                a.device_id,
                                float(a.ts),
                                _text(a.level),
                                _text(a.code),
                                _text(a.message),
                                _json(a.data),
                            )
                            for a in batch.alerts
                        ],
                    )
                # Sorted, so hubs sharing the database take row locks in one order (no deadlock).
                if batch.marks:
                    cur.executemany(
                        "INSERT INTO streams (device_id, stream, acked_seq) VALUES (%s, %s, %s) "
                        "ON CONFLICT (device_id, stream) "
                        "DO UPDATE SET acked_seq = GREATEST(streams.acked_seq, EXCLUDED.acked_seq)",
                        sorted((d, _text(s), seq) for d, s, seq in merge_marks(batch.marks)),
                    )
                if batch.last_seen:
                    cur.executemany(
                        "UPDATE devices SET last_seen = %s "
                        "WHERE device_id = %s AND (last_seen IS NULL OR last_seen < %s)",
                        [
                            (float(ts), device_id, float(ts))
                            for device_id, ts in sorted(batch.last_seen.items())
                        ],
                    )
                if batch.device_info:
                    cur.executemany(
                        "UPDATE devices SET firmware = %s, agent = %s WHERE device_id = %s",
                        [
                            (
                                None if fw is None else _text(fw),
                                None if agent is None else _text(agent),
                                device_id,
                            )
                            for device_id, (fw, agent) in sorted(batch.device_info.items())
                        ],
                    )
                # After last_seen: device rows are locked before command rows, as in
                # create_command (which only takes an advisory lock, then command rows).
                if batch.command_updates:
                    cur.executemany(_UPDATE_COMMAND, _update_params(batch.command_updates))
                if batch.config_reports:
                    cur.executemany(_CONFIG_REPORT, _report_params(batch.config_reports))

    @staticmethod
    def _insert_samples(conn: psycopg.Connection[Any], batch: WriteBatch) -> None:
        rows = [(s.device_id, float(s.ts), s.seq, _json(s.data)) for s in batch.samples]
        if len(rows) < COPY_MIN_ROWS:
            conn.execute(_values_sql(len(rows)), [v for row in rows for v in row])
            return
        with (
            conn.cursor() as cur,
            cur.copy("COPY ems_telemetry_staging (n, device_id, ts, seq, data) FROM STDIN") as cp,
        ):
            for n, row in enumerate(rows):
                cp.write_row((n, *row))
        # ORDER BY n: of two samples with one ts in a batch, the first delivered is kept.
        conn.execute(
            "INSERT INTO telemetry (device_id, ts, seq, data) "
            "SELECT device_id, ts, seq, data FROM ems_telemetry_staging ORDER BY n "
            "ON CONFLICT (device_id, ts) DO NOTHING"
        )

    def acked_seq(self, device_id: str, stream: str) -> int:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT acked_seq FROM streams WHERE device_id = %s AND stream = %s",
                (device_id, _text(stream)),
            ).fetchone()
        return 0 if row is None else int(row[0])

    # --- telemetry reads -------------------------------------------------------------------
    def samples(
        self, device_id: str, *, since: float | None, until: float | None, limit: int
    ) -> list[SampleRow]:
        if limit <= 0:
            return []
        sql = "SELECT seq, ts, data FROM telemetry WHERE device_id = %s"
        params: list[Any] = [device_id]
        if since is not None:
            sql += " AND ts >= %s"
            params.append(float(since))
        if until is not None:
            sql += " AND ts <= %s"
            params.append(float(until))
        sql += " ORDER BY ts DESC LIMIT %s"
        params.append(limit)
        with self._tx() as conn:
            rows = conn.execute(sql, params).fetchall()
        rows.reverse()
        return [_sample(device_id, row) for row in rows]

    def latest(self, device_id: str) -> SampleRow | None:
        return self.latest_many([device_id]).get(device_id)

    def latest_many(self, device_ids: list[str]) -> dict[str, SampleRow]:
        if not device_ids:
            return {}
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT d.id, t.seq, t.ts, t.data FROM unnest(%s::text[]) AS d (id) "
                "CROSS JOIN LATERAL (SELECT seq, ts, data FROM telemetry "
                "WHERE device_id = d.id ORDER BY ts DESC LIMIT 1) AS t",
                (list(dict.fromkeys(device_ids)),),
            ).fetchall()
        return {row[0]: _sample(row[0], row[1:]) for row in rows}

    # --- devices -----------------------------------------------------------------------------
    def create_device(self, device: DeviceRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO devices ({_DEVICE_COLUMNS}) "
                "VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)",
                (
                    device.device_id,
                    device.name,
                    device.owner,
                    _json(device.metadata),
                    device.token_hash,
                    device.created_at,
                    device.last_seen,
                    device.firmware,
                    device.agent,
                ),
            )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = %s", (device_id,)
            ).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, owner: str | None = None) -> list[DeviceRecord]:
        with self._tx() as conn:
            if owner is None:
                rows = conn.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE owner = %s ORDER BY device_id",
                    (owner,),
                ).fetchall()
        return [_device(row) for row in rows]

    def delete_device(self, device_id: str) -> bool:
        with self._tx() as conn:
            existed = conn.execute("DELETE FROM devices WHERE device_id = %s", (device_id,))
            for table in ("telemetry", "events", "alerts", "streams", "commands", "configs"):
                conn.execute(f"DELETE FROM {table} WHERE device_id = %s", (device_id,))
            return existed.rowcount > 0

    def set_token_hash(self, device_id: str, token_hash: str) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE devices SET token_hash = %s WHERE device_id = %s", (token_hash, device_id)
            )
            return cur.rowcount > 0

    def set_device_info(self, device_id: str, *, firmware: str | None, agent: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE devices SET firmware = %s, agent = %s WHERE device_id = %s",
                (
                    None if firmware is None else _text(firmware),
                    None if agent is None else _text(agent),
                    device_id,
                ),
            )

    # --- users and login sessions ----------------------------------------------------------
    def create_user(self, user: UserRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO users (username, password_hash, role, created_at) "
                "VALUES (%s, %s, %s, %s)",
                (user.username, user.password_hash, user.role, user.created_at),
            )

    def get_user(self, username: str) -> UserRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT username, password_hash, role, created_at FROM users WHERE username = %s",
                (username,),
            ).fetchone()
        if row is None:
            return None
        return UserRecord(username=row[0], password_hash=row[1], role=row[2], created_at=row[3])

    def list_users(self) -> list[UserRecord]:
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT username, password_hash, role, created_at FROM users ORDER BY username"
            ).fetchall()
        return [
            UserRecord(username=r[0], password_hash=r[1], role=r[2], created_at=r[3]) for r in rows
        ]

    def create_session(self, session: SessionRecord) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO sessions (token_hash, username, expires_at) VALUES (%s, %s, %s)",
                (session.token_hash, session.username, session.expires_at),
            )

    def get_session(self, token_hash: str) -> SessionRecord | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT token_hash, username, expires_at FROM sessions WHERE token_hash = %s",
                (token_hash,),
            ).fetchone()
        if row is None:
            return None
        return SessionRecord(token_hash=row[0], username=row[1], expires_at=row[2])

    def delete_session(self, token_hash: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM sessions WHERE token_hash = %s", (token_hash,))

    def purge_sessions(self, now: float) -> int:
        with self._tx() as conn:
            return conn.execute(
                "DELETE FROM sessions WHERE expires_at <= %s", (float(now),)
            ).rowcount

    # --- alerts ------------------------------------------------------------------------------
    def alerts(
        self, *, device_ids: list[str] | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        if limit <= 0 or (device_ids is not None and not device_ids):
            return []
        sql = "SELECT id, device_id, ts, level, code, message FROM alerts WHERE true"
        params: list[Any] = []
        if device_ids is not None:
            sql += " AND device_id = ANY(%s::text[])"
            params.append(list(device_ids))
        if since is not None:
            sql += " AND ts >= %s"
            params.append(float(since))
        sql += " ORDER BY ts DESC, id DESC LIMIT %s"
        params.append(limit)
        with self._tx() as conn:
            rows = conn.execute(sql, params).fetchall()
        rows.reverse()
        return [dict(zip(_ALERT_KEYS, row, strict=True)) for row in rows]

    def get_alert_rules(self) -> list[dict[str, Any]] | None:
        with self._tx() as conn:
            row = conn.execute("SELECT rules FROM alert_rules WHERE id = 1").fetchone()
        return None if row is None else row[0]

    def put_alert_rules(self, rules: list[dict[str, Any]]) -> None:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO alert_rules (id, rules) VALUES (1, %s::json) "
                "ON CONFLICT (id) DO UPDATE SET rules = EXCLUDED.rules",
                (_json(rules),),
            )

    # --- commands --------------------------------------------------------------------------
    def create_command(
        self, command: CommandRow, *, max_pending: int, supersede: bool
    ) -> list[str]:
        with self._tx() as conn:
            # Hubs sharing the database create one device's commands in turn, so the pending
            # count below cannot be raced past max_pending.
            conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                (_COMMANDS_LOCK, command.device_id),
            )
            superseded: list[str] = []
            if supersede:
                rows = conn.execute(
                    "UPDATE commands SET status = 'expired', error = %s, updated_at = %s "
                    f"WHERE id IN (SELECT id FROM commands WHERE device_id = %s AND kind = %s "
                    f"AND {OPEN_SQL} ORDER BY id FOR UPDATE) AND {OPEN_SQL} "
                    "RETURNING id, created_at, n",
                    (
                        _text(f"superseded by {command.id}"),
                        float(command.created_at),
                        command.device_id,
                        _text(command.kind),
                    ),
                ).fetchall()
                superseded = [row[0] for row in sorted(rows, key=lambda row: (row[1], row[2]))]
            row = conn.execute(
                "SELECT count(*) FROM commands WHERE device_id = %s AND status = 'pending'",
                (command.device_id,),
            ).fetchone()
            pending = row[0] if row else 0
            if pending >= max_pending:
                # Raised inside the transaction: the superseding above is rolled back too.
                raise Conflict(
                    f"device {command.device_id} already holds {pending} pending commands"
                )
            conn.execute(
                f"INSERT INTO commands ({COMMAND_COLUMNS}) VALUES "
                "(%s, %s, %s, %s, %s::json, %s::json, 'pending', %s, %s::json, %s, %s, %s, %s, %s)",
                (
                    _text(command.id),
                    command.device_id,
                    _text(command.kind),
                    _text(command.name),
                    _json(command.params),
                    _json(command.payload),
                    None if command.progress is None else float(command.progress),
                    None if command.result is None else _json(command.result),
                    _opt_text(command.error),
                    float(command.created_at),
                    float(command.updated_at),
                    None if command.expires_at is None else float(command.expires_at),
                    _text(command.delivery),
                ),
            )
            return superseded

    def get_command(self, command_id: str) -> CommandRow | None:
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = %s", (_text(command_id),)
            ).fetchone()
        return None if row is None else _command(row)

    def list_commands(self, device_id: str, *, limit: int) -> list[CommandRow]:
        if limit <= 0:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = %s "
                "ORDER BY created_at DESC, n DESC LIMIT %s",
                (device_id, limit),
            ).fetchall()
        rows.reverse()
        return [_command(row) for row in rows]

    def deliverable_commands(self, device_id: str, now: float) -> list[CommandRow]:
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE device_id = %s AND {OPEN_SQL} "
                "AND (expires_at IS NULL OR expires_at > %s) ORDER BY created_at, n",
                (device_id, float(now)),
            ).fetchall()
        return [_command(row) for row in rows]

    def update_command(self, update: CommandUpdate) -> CommandRow | None:
        with self._tx() as conn:
            params = _update_params([update])
            if params:
                conn.execute(_UPDATE_COMMAND, params[0])
            row = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = %s AND device_id = %s",
                (_text(update.id), update.device_id),
            ).fetchone()
        return None if row is None else _command(row)

    def changed_commands(self, ids: list[str]) -> list[CommandRow]:
        if not ids:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ANY(%s::text[]) "
                "ORDER BY created_at, n",
                ([_text(i) for i in ids],),
            ).fetchall()
        return [_command(row) for row in rows]

    def expire_commands(self, now: float) -> list[CommandRow]:
        with self._tx() as conn:
            # Rows locked in id order, as write_batch updates them (no deadlock between hubs).
            rows = conn.execute(
                "UPDATE commands SET status = 'expired', updated_at = %s "
                f"WHERE id IN (SELECT id FROM commands WHERE {OPEN_SQL} AND expires_at <= %s "
                f"ORDER BY id FOR UPDATE) AND {OPEN_SQL} AND expires_at <= %s "
                f"RETURNING {COMMAND_COLUMNS}, n",
                (float(now), float(now), float(now)),
            ).fetchall()
        rows.sort(key=lambda row: (row[10], row[-1]))
        return [_command(row) for row in rows]

    # --- config ------------------------------------------------------------------------------
    def put_desired_config(self, device_id: str, config: dict[str, Any], now: float) -> ConfigState:
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO configs (device_id, desired_version, desired, updated_at) "
                "VALUES (%s, 1, %s::json, %s) ON CONFLICT (device_id) DO UPDATE SET "
                "desired_version = configs.desired_version + 1, desired = EXCLUDED.desired, "
                f"updated_at = EXCLUDED.updated_at RETURNING {_CONFIG_COLUMNS}",
                (device_id, _json(config), float(now)),
            ).fetchone()
        if row is None:  # pragma: no cover - an upsert always returns its row
            raise StoreError(f"config of {device_id} not stored")
        return _config(row)

    def get_config(self, device_id: str) -> ConfigState | None:
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_CONFIG_COLUMNS} FROM configs WHERE device_id = %s", (device_id,)
            ).fetchone()
        return None if row is None else _config(row)

    # --- artifacts ---------------------------------------------------------------------------
    def put_artifact(self, artifact: ArtifactRow) -> None:
        with self._tx() as conn:
            conn.execute(
                f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS}) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (sha256) DO NOTHING",
                (
                    _text(artifact.sha256),
                    artifact.size,
                    _text(artifact.version),
                    _opt_text(artifact.signature),
                    float(artifact.created_at),
                ),
            )

    def get_artifact(self, sha256: str) -> ArtifactRow | None:
        with self._tx() as conn:
            row = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE sha256 = %s", (_text(sha256),)
            ).fetchone()
        return None if row is None else _artifact(row)

    def list_artifacts(self) -> list[ArtifactRow]:
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts ORDER BY created_at, sha256"
            ).fetchall()
        return [_artifact(row) for row in rows]
