"""The dashboard link driver: `GET /ws/dashboard`, served straight from ASGI.

Authenticated by a user's Bearer token or the login session cookie (browsers cannot set headers
on a WebSocket); 403 before the upgrade otherwise. Each connection has a reader (subscribe /
unsubscribe) and a writer that drains the connection's `DashboardQueue` once per flush tick,
packing what gathered into one `batch` frame. A dashboard that reads slowly only fills its own
queue, which drops its oldest telemetry and reports `lagged`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
import trio
from werkzeug.http import parse_cookie

from ems.hub.device_link import bearer_token, deny
from ems.hub.fanout import FRAME_BYTES, OTHER, DashboardQueue, Subscriber
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from ems.hub.hub import Hub
    from ems.hub.store import UserRecord

log = get_logger("ems.hub.dashboard")

SESSION_COOKIE = "ems_session"


def session_cookie(scope: dict[str, Any]) -> str | None:
    """The login session cookie, parsed as REST parses it (werkzeug): other cookies the browser
    holds for this host, in whatever shape, do not hide it (`http.cookies` stops at the first
    cookie it dislikes, such as a JSON value)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"cookie":
            for token in parse_cookie(value.decode("latin-1")).getlist(SESSION_COOKIE):
                if token:
                    return token  # type: ignore[no-any-return]
    return None


async def serve_dashboard(hub: Hub, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI handler for `GET /ws/dashboard`."""
    if (await receive())["type"] != "websocket.connect":
        return
    token = bearer_token(scope) or session_cookie(scope)
    user = await hub.user_for_token(token) if token else None
    if user is None:
        hub.counters.auth_failures += 1
        await deny(scope, send, 403, "AUTHENTICATION_FAILED", "log in first")
        return
    await send({"type": "websocket.accept"})
    await DashboardConnection(hub, user, send).run(receive)


class DashboardConnection:
    def __init__(self, hub: Hub, user: UserRecord, send: Any) -> None:
        self.hub = hub
        self.user = user
        self.send = send
        self.subscriber = Subscriber(
            username=user.username,
            is_admin=user.role == "admin",
            queue=DashboardQueue(hub.settings.dashboard_queue),
            connected_at=hub.now_ms(),
        )

    async def run(self, receive: Any) -> None:
        hub = self.hub
        hub.fanout.add(self.subscriber)
        log.info("dashboard_connected", username=self.user.username)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader(receive)
                nursery.cancel_scope.cancel()
        except* trio.Cancelled:
            # Cancelled from outside: the hub is shutting down. Say so (1001), briefly; the
            # page reconnects by itself.
            with trio.move_on_after(1, shield=True):
                await self.send(
                    {"type": "websocket.close", "code": 1001, "reason": "hub shutting down"}
                )
            raise
        finally:
            hub.fanout.remove(self.subscriber)
            log.info("dashboard_disconnected", username=self.user.username)

    async def _reader(self, receive: Any) -> None:
        while True:
            event = await receive()
            if event["type"] == "websocket.disconnect":
                return
            if event["type"] != "websocket.receive":
                continue
            text = event.get("text")
            if text is None:
                text = event.get("bytes") or b""
            try:
                request = self.hub.codec.decode_dashboard_message(text)
            except ProtocolError as exc:
                self._reply({"type": "error", "code": exc.code.value, "message": exc.message})
                continue
            if isinstance(request, m.Subscribe):
                await self._subscribe(request.devices)
            else:
                self.hub.fanout.unsubscribe(self.subscriber, request.devices)
                self._reply({"type": "unsubscribed", "devices": list(request.devices)})

    async def _subscribe(self, requested: tuple[str, ...]) -> None:
        hub = self.hub
        subscriber = self.subscriber
        allowed: list[str] = []
        refused: list[str] = []
        for device_id in requested:
            if device_id == "*" or hub.can_see(subscriber.username, subscriber.is_admin, device_id):
                allowed.append(device_id)
            else:
                refused.append(device_id)
        if allowed or not refused:  # every request is answered, an empty one too
            if "*" in allowed:
                covered = [
                    d
                    for d in hub.devices
                    if hub.can_see(subscriber.username, subscriber.is_admin, d)
                ]
            else:
                covered = list(dict.fromkeys(allowed))
            snapshot = await hub.snapshot(covered)
            hub.fanout.subscribe(subscriber, allowed)
            self._reply({"type": "subscribed", "devices": allowed, "snapshot": snapshot})
        if refused:
            self._reply(
                {
                    "type": "error",
                    "code": ErrorCode.SUBSCRIPTION_FAILED.value,
                    "message": "not allowed to subscribe to: " + ", ".join(refused),
                    "devices": refused,
                }
            )

    def _reply(self, message: dict[str, Any]) -> None:
        self.subscriber.queue.put(OTHER, orjson.dumps(message))

    async def _writer(self) -> None:
        queue = self.subscriber.queue
        settings = self.hub.settings
        flush_s = settings.dashboard_flush_ms / 1000.0
        max_bytes = min(FRAME_BYTES, settings.max_frame_bytes)
        counters = self.hub.counters
        while True:
            await queue.wait()
            await trio.sleep(flush_s)  # let a tick's worth of updates gather into one frame
            while (frame := queue.take_frame(max_bytes=max_bytes)) is not None:
                await self.send({"type": "websocket.send", "text": frame})
                counters.dashboard_frames_out += 1
