"""The device link driver: one `DeviceConnection` per WebSocket, around a `HubSession`.

Served straight from ASGI (not through Quart's websocket wrapper, which adds a channel hop and
signal dispatch per frame). The handshake is refused with a real HTTP status before the upgrade:
400 for a credential in the query string, 403 for a missing or wrong token.

Each connection owns a nursery with two tasks: the reader (frames -> session -> hot path fan-out
and the ingest queue) and the writer (session output -> socket, woken only when there is
something to send). Liveness timers are driven by the hub's sweeper. When the hub shuts down,
hypercorn cancels the connection; its cancellation path waits (shielded, time-boxed) for the last
commits, sends the last `ack`, `goaway` and closes with 1001.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import attrs
import orjson
import trio

from ems.hub.fanout import OTHER, TELEMETRY
from ems.hub.ingest import IngestItem
from ems.hub.store import AlertRow, EventRow, SampleRow
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol.codec import DEVICE_ID
from ems.protocol.errors import CloseCode
from ems.protocol.hub_session import (
    CloseConnection,
    HeartbeatReceived,
    HelloReceived,
    HubSession,
    LinkState,
    MessageReceived,
)

if TYPE_CHECKING:
    from ems.hub.hub import Hub

log = get_logger("ems.hub.device")

ACK_PREFIX = '{"type":"ack"'
QUERY_CREDENTIALS = frozenset({"token", "access_token", "auth", "key"})

CLOSE_HANDSHAKE_S = 10.0
"""How long a link the hub closed keeps reading (and discarding) until the device's close."""

LAST_SEEN_STORE_MS = 10_000.0
"""How far the stored `last_seen` of a connected device may lag (the hub's memory is exact).
Writing it with every message cost an extra row update per sample; it is written with the
first message, then at most this often, and when the connection ends."""


def bearer_token(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def query_has_credential(scope: dict[str, Any]) -> bool:
    raw = scope.get("query_string", b"").decode("latin-1")
    return any(
        key.lower() in QUERY_CREDENTIALS for key, _ in parse_qsl(raw, keep_blank_values=True)
    )


async def deny(scope: dict[str, Any], send: Any, status: int, code: str, message: str) -> None:
    """Refuse the upgrade with a real HTTP response (or a plain 403 where the server cannot)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = orjson.dumps({"error": {"code": code, "message": message}})
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def serve_device(
    hub: Hub, scope: dict[str, Any], receive: Any, send: Any, device_id: str
) -> None:
    """ASGI handler for `GET /ws/device/{device_id}`."""
    if (await receive())["type"] != "websocket.connect":
        return
    if query_has_credential(scope):
        # The value is never logged: only that the query carried one.
        hub.counters.auth_failures += 1
        log.warning("device_credential_in_query", device_id=device_id[:64])
        await deny(
            scope, send, 400, "AUTHENTICATION_FAILED", "credentials in the query string are refused"
        )
        return
    token = bearer_token(scope)
    if not DEVICE_ID.fullmatch(device_id) or not await hub.device_token_ok_anywhere(
        device_id, token
    ):
        hub.counters.auth_failures += 1
        log.info("device_auth_failed", device_id=device_id[:64], had_token=token is not None)
        await deny(scope, send, 403, "AUTHENTICATION_FAILED", "missing or invalid device token")
        return
    await send({"type": "websocket.accept"})
    await DeviceConnection(hub=hub, device_id=device_id, send=send).run(receive)


@attrs.define(eq=False, kw_only=True)
class DeviceConnection:
    hub: Hub
    device_id: str
    send: Any
    session: HubSession = attrs.field(init=False)
    session_id: str = attrs.field(init=False, factory=lambda: secrets.token_hex(8))
    connected_at: float = attrs.field(init=False)
    welcomed: bool = attrs.field(init=False, default=False)
    inherits_online: bool = attrs.field(init=False, default=False)
    """It replaced a connection of an online device: online already, before its `welcome`."""
    status: dict[str, Any] | None = attrs.field(init=False, default=None)
    """The device's last heartbeat `status`."""
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _committed: trio.Event = attrs.field(init=False, factory=trio.Event)
    _close: tuple[CloseCode, str] | None = attrs.field(init=False, default=None)
    _close_sent: bool = attrs.field(init=False, default=False)
    _disconnected: bool = attrs.field(init=False, default=False)
    _submitted: int = attrs.field(init=False, default=0)
    """The highest seq handed to the ingest writer (what the last `ack` must cover)."""
    _last_seen_stored: float = attrs.field(init=False, default=0.0)
    """The `last_seen` last handed to the store (epoch ms)."""
    _scope: trio.CancelScope | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        hub = self.hub
        settings = hub.settings
        self.connected_at = hub.now_ms()
        self.session = HubSession(
            now=trio.current_time(),
            heartbeat_s=settings.heartbeat_s,
            hello_timeout=settings.hello_timeout_s,
            max_frame_bytes=settings.max_frame_bytes,
            rate_per_s=settings.rate_limit_per_s,
            rate_burst=settings.rate_limit_burst,
            codec=hub.codec,
            wall_clock=hub.wall_clock,
        )

    @property
    def online(self) -> bool:
        """The device counts as online (from its `welcome`, across replacements, to the end)."""
        return self.welcomed or self.inherits_online

    @property
    def owner(self) -> str | None:
        info = self.hub.devices.get(self.device_id)
        return info.owner if info else None

    # --- called by others (sync: safe from any task) --------------------------------------------

    def ack_after(self, seq: int) -> int:
        return self.session.ack_after(seq)

    def committed(self, seq: int) -> None:
        """From the ingest writer: everything up to `seq` is stored."""
        self.session.committed(seq)
        self._committed.set()
        self._wake.set()

    def request_close(self, code: CloseCode, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self.session.close()
            self._wake.set()

    def replaced_by_newer(self) -> None:
        self.request_close(CloseCode.REPLACED, "replaced by a newer connection")

    def next_deadline(self) -> float | None:
        return self.session.next_deadline()

    def check_timers(self, now: float) -> None:
        deadline = self.session.next_deadline()
        if deadline is not None and now >= deadline:
            self.session.handle_timer(now)
            self._handle_close_events()
            self._wake.set()

    def send_payload(self, payload: dict[str, Any]) -> bool:
        """Queue a hub-to-device message already in wire form; False when not open."""
        if self.session.state is not LinkState.OPEN or self._close is not None:
            return False
        self.session.send_text(orjson.dumps(payload).decode())
        self._wake.set()
        return True

    def send_message(self, message: object) -> bool:
        """Queue a hub-to-device message; False when the link is not open."""
        if self.session.state is not LinkState.OPEN or self._close is not None:
            return False
        self.session.send(message)
        self._wake.set()
        return True

    # --- the connection's own tasks ------------------------------------------------------------

    async def run(self, receive: Any) -> None:
        hub = self.hub
        hub.counters.connections_total += 1
        hub.claim(self)
        hub.timers.schedule(self)  # the hello deadline
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                await self._reader(receive)
                if self._close is None:
                    nursery.cancel_scope.cancel()  # the device went away
        except* trio.Cancelled:
            # Cancelled from outside: the server is shutting down. (The nursery reports the
            # reader's and the writer's Cancelled together, as a group.)
            with trio.move_on_after(hub.settings.shutdown_grace_s, shield=True):
                await self._goodbye()
            raise
        finally:
            self._store_final_last_seen()
            if hub.release(self) and self.online:
                hub.publish_status(self.device_id, False)
            code = self._close[0] if self._close else None
            log.info(
                "device_disconnected",
                device_id=self.device_id,
                session_id=self.session_id,
                close_code=code,
            )
        if self._close_sent and not self._disconnected:
            await self._drain(receive)

    async def _drain(self, receive: Any) -> None:
        """Discard what the device still sends until its close (or a time limit).

        The server queues incoming frames for the application in a small bounded queue; if we
        stopped reading, a device that keeps sending after our close (one closed for flooding,
        say) would fill it, the server would stop reading the socket, and neither the close
        handshake nor the TCP connection would ever finish.
        """
        with trio.move_on_after(CLOSE_HANDSHAKE_S):
            while (await receive())["type"] != "websocket.disconnect":
                pass

    async def _reader(self, receive: Any) -> None:
        hub = self.hub
        session = self.session
        counters = hub.counters
        while self._close is None:
            event = await receive()
            kind = event["type"]
            if kind == "websocket.receive":
                text = event.get("text")
                if text is None:
                    text = event.get("bytes") or b""
                counters.frames_in += 1
                info = hub.devices.get(self.device_id)
                if info is not None:  # any traffic counts (protocol.md §1, liveness)
                    info.last_seen = hub.now_ms()
                session.receive_text(text, trio.current_time())
                await self._handle_events()
                if session.wants_write:
                    self._wake.set()
            elif kind == "websocket.disconnect":
                self._disconnected = True
                return

    async def _writer(self) -> None:
        session = self.session
        counters = self.hub.counters
        send = self.send
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # Read before draining: a close requested while this batch is being sent comes
            # with frames of its own (the `error` that explains it), sent on the next turn.
            closing = self._close
            frames = session.data_to_send()
            counters.frames_out += len(frames)
            if frames and frames[-1].startswith(ACK_PREFIX):  # the ack, if any, goes last
                counters.acks_sent += 1
            for text in frames:
                await send({"type": "websocket.send", "text": text})
            if closing is not None:
                code, reason = closing
                self._close_sent = True
                await send({"type": "websocket.close", "code": int(code), "reason": reason})
                assert self._scope is not None
                self._scope.cancel()
                return

    async def _goodbye(self) -> None:
        """Last ack, `goaway`, 1001: the device comes back to another (or the same) hub."""
        if self._close_sent:
            return
        session = self.session
        frames: list[str] = []
        if self._close is None:
            if session.state is LinkState.OPEN:
                # Wait for what reached the ingest writer (a message whose hand-over was cut
                # short by the cancellation is not acked: the device sends it again).
                while session.acked < self._submitted:
                    await self._committed.wait()
                    self._committed = trio.Event()
                frames = session.data_to_send()  # the last ack comes before `goaway`
                settings = self.hub.settings
                session.send(
                    m.GoAway(
                        retry_after_ms=settings.goaway_retry_ms,
                        spread_ms=settings.goaway_spread_ms,
                    )
                )
            self.request_close(CloseCode.GOING_AWAY, "hub shutting down")
        frames += session.data_to_send()
        for text in frames:
            await self.send({"type": "websocket.send", "text": text})
        assert self._close is not None
        code, reason = self._close
        self._close_sent = True
        await self.send({"type": "websocket.close", "code": int(code), "reason": reason})

    # --- events from the session ---------------------------------------------------------------

    def _handle_close_events(self) -> None:
        while (event := self.session.next_event()) is not None:
            if isinstance(event, CloseConnection):
                self.request_close(event.code, event.reason)

    async def _handle_events(self) -> None:
        session = self.session
        while (event := session.next_event()) is not None:
            if isinstance(event, MessageReceived):
                await self._ingest(event.seq, event.message)
            elif isinstance(event, HeartbeatReceived):
                self.status = event.heartbeat.status
                await self._note_heartbeat()
            elif isinstance(event, HelloReceived):
                await self._welcome(event.hello)
            elif isinstance(event, CloseConnection):
                self.request_close(event.code, event.reason)

    async def _welcome(self, hello: m.Hello) -> None:
        hub = self.hub
        looked_up_at = trio.current_time()
        state = await hub.ingest.welcome_state(self.device_id, hello.stream, hub.now_ms())
        if self._close is not None:  # replaced or revoked while we waited
            return
        acked = state.acked_seq
        desired_version = hub.note_config_state(self.device_id, state.config)
        self.session.accept(
            session_id=self.session_id,
            acked_seq=acked,
            config_version=desired_version,
            server_time=hub.now_ms(),
        )
        self.welcomed = True
        self._wake.set()
        hub.timers.schedule(self)  # the heartbeat clock starts (maybe before the hello deadline)
        await hub.commands.after_welcome(self, hello, state, looked_up_at)
        info = hub.devices.get(self.device_id)
        if info is not None:
            info.last_seen = hub.now_ms()
            if (hello.firmware, hello.agent) != (info.firmware, info.agent):
                # Written with the next commit (one transaction for a whole connect storm).
                info.firmware, info.agent = hello.firmware, hello.agent
                await hub.ingest.submit(
                    IngestItem(
                        listener=None,
                        device_id=self.device_id,
                        device_info=(hello.firmware, hello.agent),
                    )
                )
        if not self.inherits_online:
            hub.publish_status(self.device_id, True)
        hub.bus.device_on(self)
        log.info(
            "device_connected",
            device_id=self.device_id,
            session_id=self.session_id,
            stream=hello.stream,
            acked_seq=acked,
        )

    def _last_seen_to_store(self, now_ms: float) -> float | None:
        """`now_ms` when the stored `last_seen` is due for a write, else None."""
        if now_ms - self._last_seen_stored < LAST_SEEN_STORE_MS:
            return None
        self._last_seen_stored = now_ms
        return now_ms

    async def _note_heartbeat(self) -> None:
        """Keep the stored `last_seen` of a device that only sends heartbeats current too."""
        info = self.hub.devices.get(self.device_id)
        if info is None or info.last_seen is None or self._close is not None:
            return
        last_seen = self._last_seen_to_store(info.last_seen)
        if last_seen is not None:
            await self.hub.ingest.submit(
                IngestItem(listener=None, device_id=self.device_id, last_seen=last_seen)
            )

    def _store_final_last_seen(self) -> None:
        """The connection ended: the stored `last_seen` catches up (if the queue has room)."""
        info = self.hub.devices.get(self.device_id)
        last_seen = info.last_seen if info is not None else None
        if last_seen is not None and last_seen > self._last_seen_stored:
            self.hub.ingest.offer(
                IngestItem(listener=None, device_id=self.device_id, last_seen=last_seen)
            )

    async def _ingest(self, seq: int, message: m.ReliableMessage | None) -> None:
        """Hot path: fan the message out now, then queue it for the store."""
        hub = self.hub
        device_id = self.device_id
        now_ms = hub.now_ms()
        info = hub.devices.get(device_id)
        if info is None or self._close is not None:
            # Deleted, revoked or replaced meanwhile: not stored, not acked; the device sends
            # it again on its next connection (which may already be waiting for its welcome).
            return
        info.last_seen = now_ms
        item = IngestItem(
            listener=self,
            device_id=device_id,
            stream=self.session.stream,
            seq=seq,
            last_seen=self._last_seen_to_store(now_ms),
        )
        if isinstance(message, m.Telemetry):
            self._ingest_samples(message, item, info)
        elif isinstance(message, m.History):
            item.samples = [
                SampleRow(device_id=device_id, seq=seq, ts=s.ts, data=s.data)
                for s in message.samples
            ]
            hub.counters.samples_in += len(item.samples)
            if message.final and message.request_id:
                item.extra.append(message)
        elif isinstance(message, m.Event):
            item.events.append(
                EventRow(
                    device_id=device_id,
                    seq=seq,
                    ts=message.ts,
                    level=message.level.value,
                    code=message.code,
                    message=message.message,
                    data=message.data,
                )
            )
            payload = orjson.dumps(
                {
                    "type": "event",
                    "device_id": device_id,
                    "ts": message.ts,
                    "level": message.level.value,
                    "code": message.code,
                    "message": message.message,
                }
            )
            hub.fanout.publish(device_id, info.owner, OTHER, payload)
        elif message is None:
            hub.counters.messages_rejected += 1
        else:
            item.extra.append(message)
        if isinstance(message, m.Telemetry | m.History):
            hub.counters.samples_rejected += len(message.rejected)
        await hub.ingest.submit(item)
        self._submitted = seq

    def _ingest_samples(self, message: m.Telemetry, item: IngestItem, info: Any) -> None:
        hub = self.hub
        device_id = self.device_id
        seq = message.seq
        targets = hub.fanout.targets(device_id, info.owner)
        relay = hub.fanout.relay  # the other hubs' dashboards (when there are other hubs)
        evaluate = hub.alerts.evaluate
        rows = item.samples
        for sample in message.samples:
            ts = sample.ts
            data = sample.data
            rows.append(SampleRow(device_id=device_id, seq=seq, ts=ts, data=data))
            if info.latest is None or ts >= info.latest[1]:
                info.latest = (seq, ts, data)
            if targets or relay is not None:
                payload = orjson.dumps(
                    {
                        "type": "telemetry_update",
                        "device_id": device_id,
                        "seq": seq,
                        "ts": ts,
                        "data": data,
                    }
                )
                if targets:
                    for subscriber in targets:
                        subscriber.queue.put(TELEMETRY, payload)
                if relay is not None:
                    relay(device_id, info.owner, TELEMETRY, payload)
            fired = evaluate(device_id, data)
            if fired:
                for firing in fired:
                    rule = firing.rule
                    item.alerts.append(
                        AlertRow(
                            device_id=device_id,
                            ts=ts,
                            level=rule.level,
                            code=rule.code,
                            message=rule.message,
                            data={rule.metric: firing.value},
                        )
                    )
                    payload = orjson.dumps(
                        {
                            "type": "alert",
                            "device_id": device_id,
                            "ts": ts,
                            "alert": {
                                "level": rule.level,
                                "code": rule.code,
                                "message": rule.message,
                            },
                            "data": {rule.metric: firing.value},
                        }
                    )
                    hub.fanout.publish(device_id, info.owner, OTHER, payload)
        hub.counters.samples_in += len(message.samples)
