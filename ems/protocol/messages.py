"""One frozen attrs class per message `type` of the wire contract (protocol.md §1 and §2).

The classes hold exactly the contract's fields (Python names; `from` is `from_`) and nothing
transport-specific. `TYPE` is the wire tag. Optional fields default to None and are left out of
encoded frames when unset. `Telemetry` and `History` also carry `rejected`: the samples the codec
refused, which never go on the wire but let the hub store the good samples and name the bad ones.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import attrs

Number = int | float
JsonObject = dict[str, Any]


class Level(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class CommandState(enum.StrEnum):
    """Statuses a device reports in `command_result`."""

    RECEIVED = "received"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"

    @property
    def is_final(self) -> bool:
        return self in _FINAL_STATES


_FINAL_STATES = frozenset({CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED})


class ConfigOutcome(enum.StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"


# ---------------------------------------------------------------------------------------------
# Pieces shared by several messages


def _progress_in_range(_instance: object, _attribute: object, value: Number | None) -> None:
    if value is not None and not 0 <= value <= 100:
        raise ValueError(f"expected a number from 0 to 100, got {value}")


@attrs.frozen(kw_only=True)
class Sample:
    """One reading instant: epoch-ms `ts` and metric name -> value."""

    ts: Number
    data: JsonObject


@attrs.frozen(kw_only=True)
class SampleRejection:
    """A sample the codec refused: its index in the message and every reason, by path."""

    index: int
    reasons: tuple[str, ...]

    def describe(self) -> str:
        return "; ".join(self.reasons)


# ---------------------------------------------------------------------------------------------
# Device link, device to hub


@attrs.frozen(kw_only=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    stream: str
    agent: str | None = None
    firmware: str | None = None
    config_version: int = 0
    capabilities: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Telemetry:
    TYPE: ClassVar[str] = "telemetry"
    seq: int
    samples: tuple[Sample, ...]
    rejected: tuple[SampleRejection, ...] = attrs.field(default=(), repr=False)


@attrs.frozen(kw_only=True)
class Event:
    TYPE: ClassVar[str] = "event"
    seq: int
    ts: Number
    level: Level
    code: str
    message: str
    data: JsonObject | None = None


@attrs.frozen(kw_only=True)
class CommandResult:
    TYPE: ClassVar[str] = "command_result"
    seq: int
    id: str
    status: CommandState
    progress: Number | None = attrs.field(default=None, validator=_progress_in_range)
    result: JsonObject | None = None
    error: str | None = None


@attrs.frozen(kw_only=True)
class ConfigApplied:
    TYPE: ClassVar[str] = "config_applied"
    seq: int
    version: int
    status: ConfigOutcome
    error: str | None = None


@attrs.frozen(kw_only=True)
class History:
    TYPE: ClassVar[str] = "history"
    seq: int
    request_id: str | None
    samples: tuple[Sample, ...]
    final: bool
    rejected: tuple[SampleRejection, ...] = attrs.field(default=(), repr=False)


@attrs.frozen(kw_only=True)
class Heartbeat:
    """Sent both ways; only the device's carries `status`."""

    TYPE: ClassVar[str] = "heartbeat"
    ts: Number
    status: JsonObject | None = None


ReliableMessage = Telemetry | Event | CommandResult | ConfigApplied | History
DeviceMessage = Hello | ReliableMessage | Heartbeat
RELIABLE_TYPES: tuple[type[Any], ...] = (Telemetry, Event, CommandResult, ConfigApplied, History)


# ---------------------------------------------------------------------------------------------
# Device link, hub to device


@attrs.frozen(kw_only=True)
class Welcome:
    TYPE: ClassVar[str] = "welcome"
    session_id: str
    stream: str
    acked_seq: int
    config_version: int
    heartbeat_s: Number
    server_time: Number


@attrs.frozen(kw_only=True)
class Ack:
    TYPE: ClassVar[str] = "ack"
    seq: int


@attrs.frozen(kw_only=True)
class Error:
    """Used on both links and shaped like REST errors' `code`/`message`.

    `details` (an extension the contract allows: unknown fields are ignored) lists each rejected
    sample's reasons so a client need not parse `message`.
    """

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    seq: int | None = None
    id: str | None = None
    details: tuple[str, ...] | None = None


@attrs.frozen(kw_only=True)
class Command:
    TYPE: ClassVar[str] = "command"
    id: str
    name: str
    params: JsonObject = attrs.field(factory=dict)
    expires_at: Number | None = None

    def result(self, status: CommandState, **fields: Any) -> CommandResult:
        """The device's answer to this command, still without its `seq`."""
        return CommandResult(seq=0, id=self.id, status=status, **fields)


@attrs.frozen(kw_only=True)
class Config:
    TYPE: ClassVar[str] = "config"
    version: int
    config: JsonObject


@attrs.frozen(kw_only=True)
class SoftwareUpdate:
    TYPE: ClassVar[str] = "software_update"
    id: str
    version: str
    url: str
    sha256: str
    size: int
    signature: str | None = None


@attrs.frozen(kw_only=True)
class HistoryRequest:
    TYPE: ClassVar[str] = "history_request"
    id: str
    from_: Number
    to: Number
    metrics: tuple[str, ...] | None = None


@attrs.frozen(kw_only=True)
class SshAccess:
    TYPE: ClassVar[str] = "ssh_access"
    id: str
    duration_s: Number
    public_key: str
    user: str | None = None


@attrs.frozen(kw_only=True)
class GoAway:
    TYPE: ClassVar[str] = "goaway"
    retry_after_ms: int
    spread_ms: int


TrackedMessage = Command | SoftwareUpdate | HistoryRequest | SshAccess
"""Hub-to-device messages with an `id`, each answered by `command_result`s."""

HubMessage = Welcome | Ack | Error | TrackedMessage | Config | Heartbeat | GoAway
TRACKED_TYPES: tuple[type[Any], ...] = (Command, SoftwareUpdate, HistoryRequest, SshAccess)


# ---------------------------------------------------------------------------------------------
# Dashboard link


@attrs.frozen(kw_only=True)
class Subscribe:
    TYPE: ClassVar[str] = "subscribe"
    devices: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Unsubscribe:
    TYPE: ClassVar[str] = "unsubscribe"
    devices: tuple[str, ...]


DashboardRequest = Subscribe | Unsubscribe


@attrs.frozen(kw_only=True)
class LatestSample:
    ts: Number
    data: JsonObject


@attrs.frozen(kw_only=True)
class DeviceSnapshot:
    device_id: str
    online: bool
    last_seen: Number | None = None
    latest: LatestSample | None = None


@attrs.frozen(kw_only=True)
class Subscribed:
    TYPE: ClassVar[str] = "subscribed"
    devices: tuple[str, ...]
    snapshot: tuple[DeviceSnapshot, ...] = ()


@attrs.frozen(kw_only=True)
class Unsubscribed:
    TYPE: ClassVar[str] = "unsubscribed"
    devices: tuple[str, ...]


@attrs.frozen(kw_only=True)
class TelemetryUpdate:
    TYPE: ClassVar[str] = "telemetry_update"
    device_id: str
    seq: int
    ts: Number
    data: JsonObject


@attrs.frozen(kw_only=True)
class AlertInfo:
    level: Level
    code: str
    message: str


@attrs.frozen(kw_only=True)
class Alert:
    TYPE: ClassVar[str] = "alert"
    device_id: str
    ts: Number
    alert: AlertInfo
    data: JsonObject = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class DeviceStatus:
    TYPE: ClassVar[str] = "device_status"
    device_id: str
    online: bool
    ts: Number


@attrs.frozen(kw_only=True)
class DeviceEvent:
    """A device's `event`, as dashboards see it."""

    TYPE: ClassVar[str] = "event"
    device_id: str
    ts: Number
    level: Level
    code: str
    message: str


@attrs.frozen(kw_only=True)
class CommandStatus:
    TYPE: ClassVar[str] = "command_status"
    command: JsonObject


@attrs.frozen(kw_only=True)
class ConfigStatus:
    TYPE: ClassVar[str] = "config_status"
    device_id: str
    desired_version: int
    reported_version: int | None
    status: str | None


@attrs.frozen(kw_only=True)
class Notification:
    TYPE: ClassVar[str] = "notification"
    event: str
    data: Any = None


@attrs.frozen(kw_only=True)
class Lagged:
    TYPE: ClassVar[str] = "lagged"
    dropped: int


DashboardUpdate = (
    Subscribed
    | Unsubscribed
    | TelemetryUpdate
    | Alert
    | DeviceStatus
    | DeviceEvent
    | CommandStatus
    | ConfigStatus
    | Notification
    | Lagged
    | Error
)


@attrs.frozen(kw_only=True)
class Batch:
    TYPE: ClassVar[str] = "batch"
    messages: tuple[DashboardUpdate, ...]


DEVICE_MESSAGE_TYPES: tuple[type[Any], ...] = (Hello, *RELIABLE_TYPES, Heartbeat)
HUB_MESSAGE_TYPES: tuple[type[Any], ...] = (
    Welcome,
    Ack,
    Error,
    *TRACKED_TYPES,
    Config,
    Heartbeat,
    GoAway,
)
DASHBOARD_REQUEST_TYPES: tuple[type[Any], ...] = (Subscribe, Unsubscribe)
DASHBOARD_UPDATE_TYPES: tuple[type[Any], ...] = (
    Subscribed,
    Unsubscribed,
    TelemetryUpdate,
    Alert,
    DeviceStatus,
    DeviceEvent,
    CommandStatus,
    ConfigStatus,
    Notification,
    Lagged,
    Error,
    Batch,
)
