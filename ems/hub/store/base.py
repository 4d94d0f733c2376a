"""The store interface: one protocol, two implementations (SQLite, PostgreSQL).

Implementations are synchronous and not thread-safe: `AsyncStore` (ems.hub.store.runner) owns one
and calls it from one worker thread at a time, batching so that one thread hop carries many rows.
Every method is one transaction. Times are epoch milliseconds (floats allowed).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs


class StoreError(Exception):
    """The database failed (down, disk full...); the caller retries or reports 503."""


class Conflict(StoreError):
    """A unique key already exists (device id, username)."""


@attrs.frozen(kw_only=True)
class SampleRow:
    device_id: str
    seq: int
    ts: float
    data: dict[str, Any]


@attrs.frozen(kw_only=True)
class EventRow:
    device_id: str
    seq: int
    ts: float
    level: str
    code: str
    message: str
    data: dict[str, Any] | None = None


@attrs.frozen(kw_only=True)
class AlertRow:
    device_id: str
    ts: float
    level: str
    code: str
    message: str
    data: dict[str, Any] = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class StreamMark:
    """The highest seq of (device, stream) that is now stored or rejected for good."""

    device_id: str
    stream: str
    seq: int


@attrs.define(kw_only=True)
class WriteBatch:
    """Everything the ingest writer commits in one transaction."""

    samples: list[SampleRow] = attrs.field(factory=list)
    events: list[EventRow] = attrs.field(factory=list)
    alerts: list[AlertRow] = attrs.field(factory=list)
    marks: list[StreamMark] = attrs.field(factory=list)
    last_seen: dict[str, float] = attrs.field(factory=dict)  # device_id -> epoch ms

    def __len__(self) -> int:
        return len(self.samples) + len(self.events) + len(self.alerts) + len(self.marks)


@attrs.frozen(kw_only=True)
class DeviceRecord:
    device_id: str
    name: str | None
    owner: str | None
    metadata: dict[str, Any]
    token_hash: str
    created_at: float
    last_seen: float | None = None
    firmware: str | None = None
    agent: str | None = None


@attrs.frozen(kw_only=True)
class UserRecord:
    username: str
    password_hash: str
    role: str  # admin | operator | viewer
    created_at: float


@attrs.frozen(kw_only=True)
class SessionRecord:
    """A user's login token (stored as a hash) and when it expires."""

    token_hash: str
    username: str
    expires_at: float


class Store(Protocol):
    def open(self) -> None:
        """Connect and create or migrate the schema; idempotent."""

    def close(self) -> None: ...

    def ping(self) -> None:
        """Raise StoreError when the database cannot answer."""

    # --- ingest ----------------------------------------------------------------------------
    def write_batch(self, batch: WriteBatch) -> None:
        """Commit all rows at once. Samples are unique by (device_id, ts): a second sample with
        a stored ts is skipped (the first keeps its seq). Marks only ever raise a stream's seq;
        last_seen only moves forward."""

    def acked_seq(self, device_id: str, stream: str) -> int:
        """Highest seq marked for this stream, 0 for a new one."""

    # --- telemetry reads -------------------------------------------------------------------
    def samples(
        self, device_id: str, *, since: float | None, until: float | None, limit: int
    ) -> list[SampleRow]:
        """The newest `limit` samples with since <= ts <= until, returned oldest first."""

    def latest(self, device_id: str) -> SampleRow | None: ...

    def latest_many(self, device_ids: list[str]) -> dict[str, SampleRow]:
        """Latest sample of each device that has one (snapshots for many devices at once)."""

    # --- devices -----------------------------------------------------------------------------
    def create_device(self, device: DeviceRecord) -> None:
        """Raise Conflict if the id exists."""

    def get_device(self, device_id: str) -> DeviceRecord | None: ...

    def list_devices(self, owner: str | None = None) -> list[DeviceRecord]:
        """All devices (owner None) or those of one owner, ordered by device_id."""

    def delete_device(self, device_id: str) -> bool:
        """Remove the device and everything stored for it; False if it did not exist."""

    def set_token_hash(self, device_id: str, token_hash: str) -> bool: ...

    def set_device_info(self, device_id: str, *, firmware: str | None, agent: str | None) -> None:
        """From the device's `hello`."""

    # --- users and login sessions ----------------------------------------------------------
    def create_user(self, user: UserRecord) -> None:
        """Raise Conflict if the username exists."""

    def get_user(self, username: str) -> UserRecord | None: ...

    def list_users(self) -> list[UserRecord]: ...

    def create_session(self, session: SessionRecord) -> None: ...

    def get_session(self, token_hash: str) -> SessionRecord | None: ...

    def delete_session(self, token_hash: str) -> None: ...

    def purge_sessions(self, now: float) -> int:
        """Delete expired sessions; how many went."""

    # --- alerts ------------------------------------------------------------------------------
    def alerts(
        self, *, device_ids: list[str] | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        """Stored alerts as {"id","device_id","ts","level","code","message"}, oldest first,
        the newest `limit` of them; device_ids None means every device."""

    def get_alert_rules(self) -> list[dict[str, Any]] | None:
        """The stored rule list, or None if never set (the hub then uses the defaults)."""

    def put_alert_rules(self, rules: list[dict[str, Any]]) -> None: ...
