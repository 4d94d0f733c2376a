"""HubSession: the hub's side of one device connection, as a sans-IO state machine.

Theory of operation
-------------------
The driver (ems.hub.link) feeds the session what arrived (`receive_text(text, now)`), tells it
what the rest of the hub decided (`accept(...)` after looking up the stream, `committed(seq)`
after the store made messages durable, `send(message)` for hub-to-device traffic), and calls
`handle_timer(now)` when `next_deadline()` passes. It then pulls `next_event()` and
`data_to_send()`. The session never reads a clock and never touches a socket.

Sub-machines:
- link state (`LinkState`), moved only through `_TRANSITIONS`; anything missing from the table is
  a protocol violation by the device (close 4001) or a LocalProtocolError for our own misuse;
- the ack window: `accepted` is the highest seq handed to the store, `acked` the highest the store
  confirmed (or that was rejected for good). A reliable message at or below `accepted` is a
  duplicate: re-acked when at or below `acked`, otherwise silently covered by the coming ack.
  One cumulative `ack` per `committed()` call, however many messages it covers;
- liveness: `hello` within `hello_timeout`, then `heartbeat` every `heartbeat_s`, and close 4002
  after three intervals with nothing received;
- a token bucket per connection: frames over it get `RATE_LIMIT_EXCEEDED`; a reliable message
  over it closes the link with 4008 at once (it cannot be skipped: a later cumulative ack would
  cover it), as does `abuse_strikes` over-limit frames of any kind.

Rule: every decision about what is legal on the link lives in this file.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING

import attrs

from ems.protocol import messages as m
from ems.protocol._window import TokenBucket
from ems.protocol.codec import Codec
from ems.protocol.errors import CloseCode, ErrorCode, LocalProtocolError, ProtocolError

if TYPE_CHECKING:
    from collections.abc import Callable

HELLO_TIMEOUT_S = 10.0
SILENT_INTERVALS = 3


class LinkState(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    WELCOMING = "welcoming"  # hello received; the driver is looking up the stream
    OPEN = "open"
    CLOSED = "closed"


class Input(enum.Enum):
    RECV_HELLO = "recv_hello"
    RECV_RELIABLE = "recv_reliable"
    RECV_HEARTBEAT = "recv_heartbeat"
    RECV_INVALID = "recv_invalid"
    SEND_WELCOME = "send_welcome"  # local: accept()
    SEND_MESSAGE = "send_message"  # local: send()
    COMMITTED = "committed"  # local: committed()
    CLOSE = "close"  # local or timer


REMOTE_INPUTS = frozenset(
    {Input.RECV_HELLO, Input.RECV_RELIABLE, Input.RECV_HEARTBEAT, Input.RECV_INVALID}
)

_TRANSITIONS: dict[tuple[LinkState, Input], LinkState] = {
    (LinkState.AWAITING_HELLO, Input.RECV_HELLO): LinkState.WELCOMING,
    (LinkState.AWAITING_HELLO, Input.CLOSE): LinkState.CLOSED,
    (LinkState.WELCOMING, Input.SEND_WELCOME): LinkState.OPEN,
    (LinkState.WELCOMING, Input.CLOSE): LinkState.CLOSED,
    (LinkState.OPEN, Input.RECV_RELIABLE): LinkState.OPEN,
    (LinkState.OPEN, Input.RECV_HEARTBEAT): LinkState.OPEN,
    (LinkState.OPEN, Input.RECV_INVALID): LinkState.OPEN,
    (LinkState.OPEN, Input.SEND_MESSAGE): LinkState.OPEN,
    (LinkState.OPEN, Input.COMMITTED): LinkState.OPEN,
    (LinkState.OPEN, Input.CLOSE): LinkState.CLOSED,
    # Commits may still land after the link closed; they change nothing on the wire.
    (LinkState.CLOSED, Input.COMMITTED): LinkState.CLOSED,
    (LinkState.CLOSED, Input.CLOSE): LinkState.CLOSED,
}


# --- events the driver pulls -----------------------------------------------------------------


@attrs.frozen
class HelloReceived:
    """Look up the stream's acked seq and the desired config, then call `accept`."""

    hello: m.Hello


@attrs.frozen
class MessageReceived:
    """A new reliable message, to store; call `committed(seq)` once it (or its marker) is durable.

    `message` is None when the message was rejected for good (its `error` is already queued):
    the store still records its seq so the rejection is acknowledged and never redone.
    """

    seq: int
    message: m.ReliableMessage | None


@attrs.frozen
class HeartbeatReceived:
    heartbeat: m.Heartbeat


@attrs.frozen
class CloseConnection:
    """Close the WebSocket with `code`; the session is CLOSED."""

    code: CloseCode
    reason: str


HubEvent = HelloReceived | MessageReceived | HeartbeatReceived | CloseConnection


@attrs.define(eq=False)
class HubSession:
    now: float
    heartbeat_s: float = 20.0
    hello_timeout: float = HELLO_TIMEOUT_S
    max_frame_bytes: int = 1_048_576
    rate_per_s: float = 200.0
    rate_burst: float = 400.0
    abuse_strikes: int = 20
    codec: Codec = attrs.field(factory=Codec)
    wall_clock: Callable[[], float] = attrs.field(default=lambda: 0.0)

    state: LinkState = attrs.field(init=False, default=LinkState.AWAITING_HELLO)
    stream: str | None = attrs.field(init=False, default=None)
    accepted: int = attrs.field(init=False, default=0)
    acked: int = attrs.field(init=False, default=0)
    last_received: float = attrs.field(init=False)
    _opened_at: float = attrs.field(init=False)
    _next_heartbeat: float | None = attrs.field(init=False, default=None)
    # seqs handed to the store, in order, with True once durable or rejected for good
    _pending: deque[list[int | bool]] = attrs.field(init=False, factory=deque)
    _in_order: bool = attrs.field(init=False, default=True)
    # every seq in `_pending` arrived above all before it, and none is marked durable (the
    # common case: `ack_after` and `committed` need no sort then)
    _ack_owed: bool = attrs.field(init=False, default=False)
    _events: deque[HubEvent] = attrs.field(init=False, factory=deque)
    _outgoing: list[str] = attrs.field(init=False, factory=list)
    _bucket: TokenBucket = attrs.field(init=False)
    _strikes: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._opened_at = self.now
        self.last_received = self.now
        self._bucket = TokenBucket(rate=self.rate_per_s, burst=self.rate_burst)

    # --- state table ---------------------------------------------------------------------------

    def _move(self, event: Input) -> bool:
        """Apply `event`; False (and the link closing) when it is illegal in this state."""
        new_state = _TRANSITIONS.get((self.state, event))
        if new_state is None:
            if event in REMOTE_INPUTS:
                if self.state is not LinkState.CLOSED:
                    self._close(
                        CloseCode.NO_HELLO, f"{event.value} not allowed in {self.state.value}"
                    )
                return False
            raise LocalProtocolError(f"cannot {event.value} in state {self.state.value}")
        self.state = new_state
        return True

    def _close(self, code: CloseCode, reason: str) -> None:
        self.state = LinkState.CLOSED
        self._events.append(CloseConnection(code, reason))

    # --- inputs ----------------------------------------------------------------------------------

    def receive_text(self, text: str | bytes, now: float) -> None:
        """Feed one frame from the device."""
        if self.state is LinkState.CLOSED:
            return
        self.last_received = now
        if len(text) * 4 > self.max_frame_bytes and _byte_length(text) > self.max_frame_bytes:
            self._queue_error(
                ErrorCode.MESSAGE_TOO_LARGE, f"frame larger than {self.max_frame_bytes} bytes"
            )
            self._close(CloseCode.MESSAGE_TOO_BIG, "frame too large")
            return
        over_limit = not self._bucket.take(now)
        try:
            message = self.codec.decode_device_message(text)
        except ProtocolError as exc:
            self._on_invalid(exc, over_limit)
            return
        if over_limit:
            self._on_over_limit(
                getattr(message, "seq", None), isinstance(message, m.RELIABLE_TYPES)
            )
            return
        if isinstance(message, m.Hello):
            if self._move(Input.RECV_HELLO):
                self.stream = message.stream
                self._events.append(HelloReceived(message))
        elif isinstance(message, m.Heartbeat):
            if self._move(Input.RECV_HEARTBEAT):
                self._events.append(HeartbeatReceived(message))
        elif self._move(Input.RECV_RELIABLE):
            self._on_reliable(message)

    def _is_duplicate(self, seq: int) -> bool:
        """At or below the acked seq (ack again), or already handed over and not yet durable
        (the coming ack covers it). A seq above the ack that was never seen is new, even when
        a higher one arrived first (the contract's duplicate rule is about the ack only)."""
        if seq <= self.acked:
            self._ack_owed = True
            return True
        return seq <= self.accepted and any(entry[0] == seq for entry in self._pending)

    def _hand_over(self, seq: int) -> None:
        if seq < self.accepted:
            self._in_order = False
        else:
            self.accepted = seq
        self._pending.append([seq, False])

    def _on_reliable(self, message: m.ReliableMessage) -> None:
        seq = message.seq
        if self._is_duplicate(seq):
            return
        self._hand_over(seq)
        if isinstance(message, m.Telemetry | m.History) and message.rejected:
            self._queue_error(
                ErrorCode.TELEMETRY_VALIDATION_FAILED,
                _rejection_summary(message.rejected),
                seq=seq,
                details=tuple(r for rej in message.rejected for r in rej.reasons),
            )
        self._events.append(MessageReceived(seq, message))

    def _on_invalid(self, exc: ProtocolError, over_limit: bool) -> None:
        if self.state is not LinkState.OPEN:
            self._queue_error(exc.code, exc.message, seq=exc.seq, id=exc.id)
            self._move(Input.RECV_INVALID)
            return
        if over_limit:
            self._on_over_limit(exc.seq, exc.seq is not None)
            return
        self._move(Input.RECV_INVALID)
        self._queue_error(exc.code, exc.message, seq=exc.seq, id=exc.id)
        seq = exc.seq
        if seq is None:
            return
        if self._is_duplicate(seq):
            return
        # Rejected for good: the store records the seq so the ack covers it, in order.
        self._hand_over(seq)
        self._events.append(MessageReceived(seq, None))

    def _on_over_limit(self, seq: int | None, reliable: bool) -> None:
        self._strikes += 1
        self._queue_error(ErrorCode.RATE_LIMIT_EXCEEDED, "rate limit exceeded; slow down", seq=seq)
        if (
            reliable and seq is not None and seq > self.acked
        ) or self._strikes >= self.abuse_strikes:
            self._close(CloseCode.RATE_LIMITED, "rate limit exceeded")

    def accept(
        self, *, session_id: str, acked_seq: int, config_version: int, server_time: float
    ) -> None:
        """Answer the `hello` with `welcome`; `acked_seq` is what the store holds for the stream."""
        self._move(Input.SEND_WELCOME)
        assert self.stream is not None
        self.accepted = self.acked = acked_seq
        self._outgoing.append(
            self.codec.encode(
                m.Welcome(
                    session_id=session_id,
                    stream=self.stream,
                    acked_seq=acked_seq,
                    config_version=config_version,
                    heartbeat_s=self.heartbeat_s,
                    server_time=server_time,
                )
            )
        )
        self._next_heartbeat = self.last_received + self.heartbeat_s

    def ack_after(self, seq: int) -> int:
        """The ack `committed(seq)` would leave (nothing changes): what the store may record as
        the stream's acked seq in the same transaction."""
        pending = self._pending
        if pending and pending[-1][0] == seq:
            # Everything handed over is covered: the highest seq ever handed over (which is
            # `accepted`, or at or below the ack when it already left the queue).
            return max(self.acked, self.accepted)
        if self._in_order:
            for entry in pending:
                if entry[0] == seq:
                    return max(self.acked, seq)
            return self.acked
        position = next((i for i, entry in enumerate(pending) if entry[0] == seq), None)
        if position is None:
            return self.acked
        undone = [e[0] for i, e in enumerate(pending) if i > position and not e[1]]
        limit = min(undone) if undone else None
        acked = self.acked
        for entry_seq in sorted(e[0] for e in pending):  # type: ignore[type-var]
            if limit is not None and entry_seq >= limit:
                break
            acked = max(acked, entry_seq)  # type: ignore[type-var]
        return acked  # type: ignore[return-value]

    def committed(self, seq: int) -> None:
        """The store made durable every message this session handed over, in hand-over order,
        up to and including the one with `seq`."""
        self._move(Input.COMMITTED)
        pending = self._pending
        if self._commit_fast(seq):
            return
        position = next((i for i, entry in enumerate(pending) if entry[0] == seq), None)
        if position is None:
            return
        acked = self.ack_after(seq)
        for index in range(position + 1):
            pending[index][1] = True
        # The ack covers the highest seq below which nothing handed over is still pending (a
        # message that arrived out of order holds it back until it is stored too).
        remaining = [e for e in pending if e[0] > acked or not e[1]]  # type: ignore[operator]
        if acked > self.acked:
            self.acked = acked
            self._ack_owed = True
        pending.clear()
        pending.extend(remaining)
        if not pending:
            self._in_order = True

    def _commit_fast(self, seq: int) -> bool:
        """`committed(seq)` when `seq` is the last handed over or everything pending is in
        order (nothing held back): the ack covers `seq`, and what follows it stays pending.
        False when `seq` is not pending, or the general case applies."""
        pending = self._pending
        if pending and pending[-1][0] == seq:
            acked = max(self.acked, self.accepted)
            pending.clear()
            self._in_order = True
        elif self._in_order:
            count = 0
            for entry in pending:
                count += 1
                if entry[0] == seq:
                    break
            else:
                return True  # not pending: nothing to do (as in the general case)
            for _ in range(count):
                pending.popleft()
            acked = max(self.acked, seq)
        else:
            return False
        if acked > self.acked:
            self.acked = acked
            self._ack_owed = True
        return True

    def send(self, message: object) -> None:
        """Queue a hub-to-device message (command, config, goaway...)."""
        self._move(Input.SEND_MESSAGE)
        self._outgoing.append(self.codec.encode(message))

    def send_text(self, text: str) -> None:
        """Queue an already encoded hub-to-device frame (encoded once for many devices)."""
        self._move(Input.SEND_MESSAGE)
        self._outgoing.append(text)

    def close(self) -> None:
        """The driver ended the link (replaced, revoked, shutting down, connection lost)."""
        self._move(Input.CLOSE)

    # --- time ------------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if self.state is LinkState.AWAITING_HELLO:
            return self._opened_at + self.hello_timeout
        if self.state is LinkState.OPEN:
            assert self._next_heartbeat is not None
            return min(
                self._next_heartbeat, self.last_received + SILENT_INTERVALS * self.heartbeat_s
            )
        return None

    def handle_timer(self, now: float) -> None:
        if self.state is LinkState.AWAITING_HELLO and now >= self._opened_at + self.hello_timeout:
            self._close(CloseCode.NO_HELLO, "no hello in time")
        elif self.state is LinkState.OPEN:
            if now >= self.last_received + SILENT_INTERVALS * self.heartbeat_s:
                self._close(CloseCode.SILENT, "no traffic for three heartbeat intervals")
                return
            assert self._next_heartbeat is not None
            if now >= self._next_heartbeat:
                self._outgoing.append(self.codec.encode(m.Heartbeat(ts=self.wall_clock() * 1000)))
                self._next_heartbeat = now + self.heartbeat_s

    # --- outputs ---------------------------------------------------------------------------------

    @property
    def wants_write(self) -> bool:
        """Whether `data_to_send()` has anything (lets the driver skip waking its writer)."""
        return bool(self._outgoing) or (self._ack_owed and self.state is LinkState.OPEN)

    def next_event(self) -> HubEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> list[str]:
        """Frames to send, in order; the cumulative ack (if owed) goes last."""
        if self._ack_owed and self.state is LinkState.OPEN:
            self._ack_owed = False
            self._outgoing.append(f'{{"type":"ack","seq":{self.acked}}}')
        out, self._outgoing = self._outgoing, []
        return out

    def _queue_error(
        self,
        code: ErrorCode,
        message: str,
        *,
        seq: int | None = None,
        id: str | None = None,
        details: tuple[str, ...] | None = None,
    ) -> None:
        self._outgoing.append(
            self.codec.encode(
                m.Error(code=code.value, message=message, seq=seq, id=id, details=details)
            )
        )


def _byte_length(text: str | bytes) -> int:
    return len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))


def _rejection_summary(rejected: tuple[m.SampleRejection, ...]) -> str:
    shown = "; ".join(rej.describe() for rej in rejected[:10])
    more = f" (and {len(rejected) - 10} more samples)" if len(rejected) > 10 else ""
    return f"{len(rejected)} sample(s) rejected: {shown}{more}"
