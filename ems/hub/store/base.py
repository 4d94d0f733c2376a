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


COMMAND_STATUS_RANK: dict[str, int] = {
    "pending": 0,
    "sent": 1,
    "received": 2,
    "running": 3,
    "succeeded": 4,
    "failed": 4,
    "rejected": 4,
    "expired": 4,
}
"""A command's status only moves to a higher rank; rank 4 is final."""


@attrs.frozen(kw_only=True)
class CommandRow:
    """A hub-to-device message with an `id`, tracked to completion (protocol.md §1)."""

    id: str
    device_id: str
    kind: str
    """The wire type: command, software_update, history_request, ssh_access."""
    name: str
    """The command name (for other kinds: the kind)."""
    params: dict[str, Any]
    payload: dict[str, Any]
    """The whole hub-to-device message as sent (type, id and its fields)."""
    status: str
    progress: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float
    updated_at: float
    expires_at: float | None = None
    delivery: str = "queued"
    """The offline policy applied: queued | latest_only | online_only."""


@attrs.frozen(kw_only=True)
class CommandUpdate:
    """A `command_result` from the device (or the hub's own sent/expired marks)."""

    id: str
    device_id: str
    status: str
    progress: float | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    at: float


@attrs.frozen(kw_only=True)
class ConfigReport:
    """A `config_applied` from the device."""

    device_id: str
    version: int
    status: str  # applied | rejected
    error: str | None = None
    at: float


@attrs.frozen(kw_only=True)
class ConfigState:
    device_id: str
    desired_version: int
    desired: dict[str, Any]
    reported_version: int | None = None
    reported_status: str | None = None
    reported_error: str | None = None
    updated_at: float = 0.0


@attrs.frozen(kw_only=True)
class ArtifactRow:
    sha256: str
    size: int
    version: str
    signature: str | None
    created_at: float


@attrs.define(kw_only=True)
class WriteBatch:
    """Everything the ingest writer commits in one transaction."""

    samples: list[SampleRow] = attrs.field(factory=list)
    events: list[EventRow] = attrs.field(factory=list)
    alerts: list[AlertRow] = attrs.field(factory=list)
    marks: list[StreamMark] = attrs.field(factory=list)
    last_seen: dict[str, float] = attrs.field(factory=dict)  # device_id -> epoch ms
    device_info: dict[str, tuple[str | None, str | None]] = attrs.field(factory=dict)
    """device_id -> (firmware, agent) its `hello` reported, where that changed."""
    command_updates: list[CommandUpdate] = attrs.field(factory=list)
    config_reports: list[ConfigReport] = attrs.field(factory=list)

    def __len__(self) -> int:
        return (
            len(self.samples)
            + len(self.events)
            + len(self.alerts)
            + len(self.marks)
            + len(self.command_updates)
            + len(self.config_reports)
        )


@attrs.frozen(kw_only=True)
class WelcomeState:
    """What a `welcome` needs from the store: the stream's ack, the device's config state and
    the commands still to deliver (read together, for many connections in one thread trip)."""

    acked_seq: int
    config: ConfigState | None
    commands: list[CommandRow]


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

    # --- commands (step 4) -----------------------------------------------------------------
    # write_batch also applies `command_updates` (each only if it raises the command's status
    # rank, see COMMAND_STATUS_RANK; `running` may repeat to update progress; updates for
    # unknown ids or ids of another device are ignored) and `config_reports` (stored as the
    # device's reported version/status/error, only if the version is >= the stored one).

    def create_command(
        self, command: CommandRow, *, max_pending: int, supersede: bool
    ) -> list[str]:
        """Insert `command` (status `pending`). Raises Conflict if the device already holds
        `max_pending` commands in status `pending`. With `supersede`, every older command of
        the same device and `kind` still in `pending` or `sent` is set to `expired` with error
        "superseded by <id>" first (latest-only kinds); returns those ids."""

    def get_command(self, command_id: str) -> CommandRow | None: ...

    def list_commands(self, device_id: str, *, limit: int) -> list[CommandRow]:
        """The device's newest `limit` commands, oldest first."""

    def deliverable_commands(self, device_id: str, now: float) -> list[CommandRow]:
        """Commands to (re)send after the device's `welcome`: status `pending` or `sent`, not
        expired at `now`, oldest first."""

    def update_command(self, update: CommandUpdate) -> CommandRow | None:
        """Apply one update outside a batch (the hub marking `sent`); same rank rule. The row
        after the update, or None if the id is unknown."""

    def changed_commands(self, ids: list[str]) -> list[CommandRow]:
        """Rows of these ids (after a batch, to publish `command_status`)."""

    def expire_commands(self, now: float) -> list[CommandRow]:
        """Set `expired` on every command in `pending` or `sent` whose expires_at <= now; the
        rows as they are now."""

    # --- config (step 4) -------------------------------------------------------------------
    def put_desired_config(self, device_id: str, config: dict[str, Any], now: float) -> ConfigState:
        """Store a new desired document with version = previous desired version + 1 (1 for
        the first)."""

    def get_config(self, device_id: str) -> ConfigState | None: ...

    # --- artifacts (step 4) ----------------------------------------------------------------
    def put_artifact(self, artifact: ArtifactRow) -> None:
        """Insert, or keep the existing row for the same sha256 (content-addressed)."""

    def get_artifact(self, sha256: str) -> ArtifactRow | None: ...

    def list_artifacts(self) -> list[ArtifactRow]: ...
