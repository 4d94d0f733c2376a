"""DeviceSession: the edge side of one connection to the hub, as a sans-IO state machine.

Theory of operation
-------------------
One DeviceSession lives for one WebSocket connection. What outlives a connection belongs to
the agent and is handed in: the `CommandRecord` (at-most-once execution) and the outbox, from
which the driver feeds reliable frames in seq order. The session:
- sends `hello` at once and waits for `welcome` (within `welcome_timeout`);
- keeps the ack window: after `welcome` everything at or below `acked_seq` may leave the outbox
  (`Acked` event), and the driver sends the rest, oldest first, through `send_reliable`, at most
  `max_in_flight` unacknowledged at a time; each `ack` from the hub is cumulative;
- screens hub-to-device messages with an `id` against the command record: a new id is recorded
  as `received` and dispatched; a redelivered one is reported with its last status and never
  dispatched again;
- keeps liveness: answers each hub `heartbeat`, sends one after `heartbeat_s` without sending,
  and declares the hub dead after three intervals with nothing received.

Rule: every decision about what is legal on the link lives in this file.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs

from ems.protocol import messages as m
from ems.protocol._window import CommandRecord
from ems.protocol.codec import Codec
from ems.protocol.errors import CloseCode, LocalProtocolError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

WELCOME_TIMEOUT_S = 10.0
SILENT_INTERVALS = 3


class DeviceLinkState(enum.Enum):
    AWAITING_WELCOME = "awaiting_welcome"
    OPEN = "open"
    CLOSED = "closed"


class DeviceInput(enum.Enum):
    RECV_WELCOME = "recv_welcome"
    RECV_ACK = "recv_ack"
    RECV_MESSAGE = "recv_message"  # tracked messages, config, heartbeat
    RECV_ERROR = "recv_error"
    RECV_GOAWAY = "recv_goaway"
    SEND_RELIABLE = "send_reliable"  # local
    CLOSE = "close"


_REMOTE = frozenset(
    {
        DeviceInput.RECV_WELCOME,
        DeviceInput.RECV_ACK,
        DeviceInput.RECV_MESSAGE,
        DeviceInput.RECV_ERROR,
        DeviceInput.RECV_GOAWAY,
    }
)

_TRANSITIONS: dict[tuple[DeviceLinkState, DeviceInput], DeviceLinkState] = {
    (DeviceLinkState.AWAITING_WELCOME, DeviceInput.RECV_WELCOME): DeviceLinkState.OPEN,
    (DeviceLinkState.AWAITING_WELCOME, DeviceInput.RECV_ERROR): DeviceLinkState.AWAITING_WELCOME,
    (DeviceLinkState.AWAITING_WELCOME, DeviceInput.RECV_GOAWAY): DeviceLinkState.AWAITING_WELCOME,
    (DeviceLinkState.AWAITING_WELCOME, DeviceInput.CLOSE): DeviceLinkState.CLOSED,
    (DeviceLinkState.OPEN, DeviceInput.RECV_ACK): DeviceLinkState.OPEN,
    (DeviceLinkState.OPEN, DeviceInput.RECV_MESSAGE): DeviceLinkState.OPEN,
    (DeviceLinkState.OPEN, DeviceInput.RECV_ERROR): DeviceLinkState.OPEN,
    (DeviceLinkState.OPEN, DeviceInput.RECV_GOAWAY): DeviceLinkState.OPEN,
    (DeviceLinkState.OPEN, DeviceInput.SEND_RELIABLE): DeviceLinkState.OPEN,
    (DeviceLinkState.OPEN, DeviceInput.CLOSE): DeviceLinkState.CLOSED,
    (DeviceLinkState.CLOSED, DeviceInput.CLOSE): DeviceLinkState.CLOSED,
}


# --- events the driver pulls -----------------------------------------------------------------


@attrs.frozen
class Welcomed:
    welcome: m.Welcome


@attrs.frozen
class Acked:
    """Everything of this stream up to `seq` is durable on the hub: drop it from the outbox."""

    seq: int


@attrs.frozen
class Dispatch:
    """A message to act on. For tracked ones the id is already recorded as `received`:
    persist the record, send `received`, then execute."""

    message: m.TrackedMessage | m.Config


@attrs.frozen
class Redelivered:
    """A tracked id seen before: send `last` (its last status) again; do not execute."""

    message: m.TrackedMessage
    last: m.CommandResult


@attrs.frozen
class ErrorReceived:
    error: m.Error


@attrs.frozen
class BadFrame:
    """The hub sent something we could not decode; logged, the link stays up."""

    error: ProtocolError


@attrs.frozen
class GoingAway:
    retry_after_ms: int
    spread_ms: int


@attrs.frozen
class LinkDead:
    """Close the connection and reconnect."""

    code: CloseCode
    reason: str


DeviceEvent = (
    Welcomed | Acked | Dispatch | Redelivered | ErrorReceived | BadFrame | GoingAway | LinkDead
)


@attrs.define(eq=False)
class DeviceSession:
    hello: m.Hello
    now: float
    record: CommandRecord = attrs.field(factory=CommandRecord)
    welcome_timeout: float = WELCOME_TIMEOUT_S
    max_in_flight: int = 32
    codec: Codec = attrs.field(factory=Codec)
    wall_clock: Callable[[], float] = attrs.field(default=lambda: 0.0)
    status: dict[str, Any] = attrs.field(factory=dict)
    """Carried by each heartbeat; the driver keeps it current (uptime, outbox depth, drops)."""

    state: DeviceLinkState = attrs.field(init=False, default=DeviceLinkState.AWAITING_WELCOME)
    heartbeat_s: float = attrs.field(init=False, default=20.0)
    acked: int = attrs.field(init=False, default=0)
    sent_high: int = attrs.field(init=False, default=0)
    welcome: m.Welcome | None = attrs.field(init=False, default=None)
    _in_flight: deque[int] = attrs.field(init=False, factory=deque)
    _hello_at: float = attrs.field(init=False)
    _last_sent: float = attrs.field(init=False)
    _last_received: float = attrs.field(init=False)
    _events: deque[DeviceEvent] = attrs.field(init=False, factory=deque)
    _outgoing: list[str] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self._hello_at = self._last_sent = self._last_received = self.now
        self._outgoing.append(self.codec.encode(self.hello))

    def _move(self, event: DeviceInput) -> bool:
        new_state = _TRANSITIONS.get((self.state, event))
        if new_state is None:
            if event in _REMOTE:
                if self.state is not DeviceLinkState.CLOSED:
                    self._die(CloseCode.NO_HELLO, f"hub sent {event.value} in {self.state.value}")
                return False
            raise LocalProtocolError(f"cannot {event.value} in state {self.state.value}")
        self.state = new_state
        return True

    def _die(self, code: CloseCode, reason: str) -> None:
        self.state = DeviceLinkState.CLOSED
        self._events.append(LinkDead(code, reason))

    # --- inputs ----------------------------------------------------------------------------------

    def receive_text(self, text: str | bytes, now: float) -> None:
        if self.state is DeviceLinkState.CLOSED:
            return
        self._last_received = now
        try:
            message = self.codec.decode_hub_message(text)
        except ProtocolError as exc:
            self._events.append(BadFrame(exc))
            return
        if isinstance(message, m.Welcome):
            if self._move(DeviceInput.RECV_WELCOME):
                self.welcome = message
                self.heartbeat_s = float(message.heartbeat_s)
                self.acked = self.sent_high = message.acked_seq
                self._events.append(Welcomed(message))
                self._events.append(Acked(message.acked_seq))
        elif isinstance(message, m.Ack):
            if self._move(DeviceInput.RECV_ACK) and message.seq > self.acked:
                self.acked = message.seq
                while self._in_flight and self._in_flight[0] <= message.seq:
                    self._in_flight.popleft()
                self._events.append(Acked(message.seq))
        elif isinstance(message, m.Error):
            if self._move(DeviceInput.RECV_ERROR):
                self._events.append(ErrorReceived(message))
        elif isinstance(message, m.GoAway):
            if self._move(DeviceInput.RECV_GOAWAY):
                self._events.append(GoingAway(message.retry_after_ms, message.spread_ms))
        elif self._move(DeviceInput.RECV_MESSAGE):
            if isinstance(message, m.Heartbeat):
                self._queue_heartbeat(now)
            elif isinstance(message, m.Config):
                self._events.append(Dispatch(message))
            else:
                self._on_tracked(message)

    def _on_tracked(self, message: m.TrackedMessage) -> None:
        if self.record.begin(message.id):
            self._events.append(Dispatch(message))
        else:
            last = self.record.last(message.id)
            assert last is not None
            self._events.append(Redelivered(message, last))

    def window_free(self) -> int:
        """How many more reliable frames may be sent before an ack comes back."""
        if self.state is not DeviceLinkState.OPEN:
            return 0
        return max(0, self.max_in_flight - len(self._in_flight))

    def send_reliable(self, seq: int, text: str, now: float) -> None:
        """Send the outbox entry `seq` (already encoded with its seq); strictly increasing."""
        self._move(DeviceInput.SEND_RELIABLE)
        if seq <= self.sent_high:
            raise LocalProtocolError(
                f"seq {seq} already sent on this link (up to {self.sent_high})"
            )
        self.sent_high = seq
        self._in_flight.append(seq)
        self._outgoing.append(text)
        self._last_sent = now

    def close(self) -> None:
        """The connection ended (or the driver is ending it)."""
        self._move(DeviceInput.CLOSE)

    # --- time ------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.state is DeviceLinkState.AWAITING_WELCOME:
            return self._hello_at + self.welcome_timeout
        if self.state is DeviceLinkState.OPEN:
            return min(
                self._last_sent + self.heartbeat_s,
                self._last_received + SILENT_INTERVALS * self.heartbeat_s,
            )
        return None

    def handle_timer(self, now: float) -> None:
        if self.state is DeviceLinkState.AWAITING_WELCOME:
            if now >= self._hello_at + self.welcome_timeout:
                self._die(CloseCode.SILENT, "no welcome in time")
        elif self.state is DeviceLinkState.OPEN:
            if now >= self._last_received + SILENT_INTERVALS * self.heartbeat_s:
                self._die(CloseCode.SILENT, "hub silent for three heartbeat intervals")
            elif now >= self._last_sent + self.heartbeat_s:
                self._queue_heartbeat(now)

    def _queue_heartbeat(self, now: float) -> None:
        beat = m.Heartbeat(ts=self.wall_clock() * 1000, status=dict(self.status) or None)
        self._outgoing.append(self.codec.encode(beat))
        self._last_sent = now

    # --- outputs ---------------------------------------------------------------------------------

    def next_event(self) -> DeviceEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[str]:
        out, self._outgoing = self._outgoing, []
        return out
