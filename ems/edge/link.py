"""The agent's link to the hub: one connection at a time, driving a `DeviceSession`.

`DeviceLink.run_once()` connects (the token in the `Authorization` header only), says hello and
runs three sibling tasks until the link is lost:
- reader: frames -> session -> events (acks shrink the outbox, tracked messages go to the
  dispatcher's bounded queue, a redelivered id gets its last status again);
- writer: woken when there is something to send: fills the session's window from the outbox
  (oldest first) and sends whatever the session queued;
- timer: sleeps until the session's next deadline (a cancel scope re-armed whenever the deadline
  moves) and lets the session send heartbeats or declare the hub dead.
Transport failures become `LinkLost`; the agent's loop decides when to try again.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from ems.edge.outbox import AsyncOutbox
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol._window import CommandRecord
from ems.protocol.codec import Codec
from ems.protocol.device_session import (
    Acked,
    BadFrame,
    DeviceLinkState,
    DeviceSession,
    Dispatch,
    ErrorReceived,
    GoingAway,
    LinkDead,
    Redelivered,
    Welcomed,
)

log = get_logger("ems.edge.link")


class LinkLost(Exception):
    """The connection ended; `reason` says why (never contains a secret)."""


LINK_ERRORS: tuple[type[BaseException], ...] = (
    LinkLost,
    OSError,
    HandshakeError,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    ssl.SSLError,
)


@attrs.define(eq=False, kw_only=True)
class DeviceLink:
    device_id: str
    hub_url: str
    read_token: Callable[[], str]
    outbox: AsyncOutbox
    record: CommandRecord
    make_hello: Callable[[], m.Hello]
    dispatch: Callable[[m.TrackedMessage | m.Config], Awaitable[None]]
    resend: Callable[[m.CommandResult], Awaitable[None]]
    on_welcome: Callable[[m.Welcome], Awaitable[None]]
    status: Callable[[], dict[str, Any]]
    ssl_context: ssl.SSLContext | None = None
    codec: Codec = attrs.field(factory=Codec)
    wall_clock: Callable[[], float] = time.time
    max_in_flight: int = 32
    connect_timeout_s: float = 10.0
    rng: random.Random = attrs.field(factory=random.Random)

    session: DeviceSession | None = attrs.field(init=False, default=None)
    welcomed_at: float | None = attrs.field(init=False, default=None)
    goaway_delay_s: float | None = attrs.field(init=False, default=None)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _acked: trio.Event = attrs.field(init=False, factory=trio.Event)
    _timer_scope: trio.CancelScope | None = attrs.field(init=False, default=None)

    @property
    def online(self) -> bool:
        return self.session is not None and self.session.state is DeviceLinkState.OPEN

    async def wait_acked(self) -> None:
        """Until the next `ack` has been applied to the outbox."""
        await self._acked.wait()

    def poke(self) -> None:
        """New outbox entries (or session output): wake the writer."""
        self._wake.set()

    async def run_once(self) -> None:
        """Connect and run until the link is lost; raises one of LINK_ERRORS."""
        self.welcomed_at = None
        self.goaway_delay_s = None
        url = f"{self.hub_url.rstrip('/')}/ws/device/{self.device_id}"
        headers = [("Authorization", f"Bearer {self.read_token()}")]
        async with open_websocket_url(
            url,
            ssl_context=self.ssl_context,
            extra_headers=headers,
            connect_timeout=self.connect_timeout_s,
            disconnect_timeout=2,
        ) as ws:
            session = DeviceSession(
                hello=self.make_hello(),
                now=trio.current_time(),
                record=self.record,
                codec=self.codec,
                wall_clock=self.wall_clock,
                max_in_flight=self.max_in_flight,
            )
            self.session = session
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, ws, session)
                    nursery.start_soon(self._writer, ws, session)
                    nursery.start_soon(self._timer, session)
                    self.poke()
            finally:
                session.close()
                self.session = None

    async def _reader(self, ws: WebSocketConnection, session: DeviceSession) -> None:
        while True:
            text = await ws.get_message()
            session.receive_text(text, trio.current_time())
            await self._handle_events(session)
            self._rearm(session)
            self.poke()

    async def _handle_events(self, session: DeviceSession) -> None:
        while (event := session.next_event()) is not None:
            if isinstance(event, Acked):
                await self.outbox.run(self.outbox.sync.ack, event.seq)
                self._acked.set()
                self._acked = trio.Event()
            elif isinstance(event, Dispatch):
                await self.dispatch(event.message)
            elif isinstance(event, Redelivered):
                await self.resend(event.last)
            elif isinstance(event, Welcomed):
                self.welcomed_at = trio.current_time()
                log.info(
                    "link_up",
                    device_id=self.device_id,
                    acked_seq=event.welcome.acked_seq,
                    heartbeat_s=event.welcome.heartbeat_s,
                )
                await self.on_welcome(event.welcome)
            elif isinstance(event, ErrorReceived):
                error = event.error
                log.warning(
                    "hub_error",
                    device_id=self.device_id,
                    code=error.code,
                    seq=error.seq,
                    message=error.message[:300],
                )
            elif isinstance(event, BadFrame):
                log.warning(
                    "bad_frame_from_hub", device_id=self.device_id, error=event.error.message
                )
            elif isinstance(event, GoingAway):
                spread = self.rng.uniform(0, max(0, event.spread_ms))
                self.goaway_delay_s = (event.retry_after_ms + spread) / 1000.0
                log.info(
                    "hub_going_away", device_id=self.device_id, retry_after_ms=event.retry_after_ms
                )
            elif isinstance(event, LinkDead):
                raise LinkLost(event.reason)

    async def _writer(self, ws: WebSocketConnection, session: DeviceSession) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            free = session.window_free()
            if free > 0:
                entries = await self.outbox.run(self.outbox.sync.pending, session.sent_high, free)
                now = trio.current_time()
                for seq, text in entries:
                    if seq > session.sent_high and session.window_free() > 0:
                        session.send_reliable(seq, text, now)
            session.status = self.status()
            for text in session.data_to_send():
                await ws.send_message(text)
            self._rearm(session)

    async def _timer(self, session: DeviceSession) -> None:
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                self._rearm(session)
                await trio.sleep_forever()
            self._timer_scope = None
            session.handle_timer(trio.current_time())
            await self._handle_events(session)
            self.poke()

    def _rearm(self, session: DeviceSession) -> None:
        if self._timer_scope is not None:
            deadline = session.next_deadline()
            self._timer_scope.deadline = math.inf if deadline is None else deadline
