"""The dashboard link (protocol.md §2) against a real hub subprocess, with trio-websocket clients.

Handshake authentication, subscribe / unsubscribe with snapshots and ownership, every update a
dashboard can receive, the slow-dashboard policy (drop oldest telemetry, `lagged`, devices never
held up) and invalid requests. Messages are accepted plain or packed in `batch` frames.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

from tests.integration.conftest import (
    HANG_GUARD_S,
    HubProcess,
    call,
    device_ws,
    hello,
    send_json,
)

Message = dict[str, Any]


class Inbox:
    """A dashboard's incoming messages, one at a time, with `batch` frames unpacked.

    Unlike `receive_until`, nothing that arrived in the same frame after a match is lost.
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.pending: deque[Message] = deque()

    async def next(self) -> Message:
        with trio.fail_after(HANG_GUARD_S):
            while not self.pending:
                frame = orjson.loads(await self.ws.get_message())
                if frame["type"] == "batch":
                    self.pending.extend(frame["messages"])
                else:
                    self.pending.append(frame)
        return self.pending.popleft()

    async def until(self, predicate: Callable[[Message], bool]) -> list[Message]:
        """Every message up to and including the first that matches `predicate`."""
        seen: list[Message] = []
        with trio.fail_after(HANG_GUARD_S):
            while True:
                message = await self.next()
                seen.append(message)
                if predicate(message):
                    return seen

    async def first(self, kind: str, **fields: Any) -> Message:
        """The next message of type `kind` whose fields include `fields` (others skipped)."""
        seen = await self.until(lambda msg: msg["type"] == kind and _has(msg, fields))
        return seen[-1]

    async def send(self, message: Message) -> None:
        await send_json(self.ws, message)


def _has(message: Message, fields: dict[str, Any]) -> bool:
    return all(message.get(key) == value for key, value in fields.items())


@asynccontextmanager
async def dashboard(
    hub: HubProcess, token: str | None = None, *, cookie: str | None = None
) -> AsyncIterator[Inbox]:
    headers: list[tuple[str, str]] = []
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if cookie is not None:
        headers.append(("Cookie", cookie))
    async with open_websocket_url(f"{hub.ws}/ws/dashboard", extra_headers=headers) as ws:  # type: ignore[arg-type]
        yield Inbox(ws)


async def subscribe(inbox: Inbox, devices: list[str]) -> Message:
    await inbox.send({"type": "subscribe", "devices": devices})
    return await inbox.first("subscribed")


class Device:
    """A device client: telemetry and events, waiting for the cumulative ack."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.seq = 0

    async def send(self, message: Message) -> int:
        self.seq += 1
        await send_json(self.ws, {**message, "seq": self.seq})
        return self.seq

    async def acked(self, seq: int) -> None:
        with trio.fail_after(HANG_GUARD_S):
            while True:
                message = orjson.loads(await self.ws.get_message())
                if message["type"] == "ack" and message["seq"] >= seq:
                    return
                assert message["type"] in ("heartbeat", "ack", "error"), message

    async def telemetry(self, samples: list[Message], *, wait: bool = True) -> int:
        seq = await self.send({"type": "telemetry", "samples": samples})
        if wait:
            await self.acked(seq)
        return seq


@asynccontextmanager
async def device(
    hub: HubProcess, device_id: str, token: str, **hello_fields: Any
) -> AsyncIterator[Device]:
    async with device_ws(hub, device_id, token) as ws:
        await hello(ws, stream=f"{device_id}-stream", **hello_fields)
        yield Device(ws)


async def _read_forever(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


async def closed_code(ws: WebSocketConnection) -> int:
    """The close code of a link the hub closes (what arrives before it is skipped)."""
    with trio.fail_after(HANG_GUARD_S), pytest.raises(ConnectionClosed) as closed:
        await _read_forever(ws)
    return closed.value.reason.code  # type: ignore[no-any-return]


async def rejected_status(hub: HubProcess, headers: list[tuple[str, str]]) -> int:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(f"{hub.ws}/ws/dashboard", extra_headers=headers):  # type: ignore[arg-type]
            pass
    return info.value.status_code


# --- handshake -----------------------------------------------------------------------------------


async def test_handshake_needs_a_user_credential(hub: HubProcess) -> None:
    device_token = await call(hub.create_device, "dev-1")
    viewer = await call(hub.create_user, "alice")
    bearer = "Authorization"
    assert await rejected_status(hub, []) == 403
    assert await rejected_status(hub, [(bearer, f"Bearer {device_token}")]) == 403
    assert await rejected_status(hub, [(bearer, "Bearer emsu_not-a-real-token")]) == 403
    assert await rejected_status(hub, [(bearer, f"Basic {viewer}")]) == 403
    assert await rejected_status(hub, [("Cookie", f"ems_session={device_token}")]) == 403
    assert await rejected_status(hub, [("Cookie", "ems_session=emsu_forged")]) == 403
    # A logged-out token no longer opens the link.
    response = await call(hub.request, "POST", "/api/auth/logout", viewer)
    assert response.status_code == 204
    assert await rejected_status(hub, [(bearer, f"Bearer {viewer}")]) == 403


async def test_bearer_token_and_login_cookie_are_accepted(hub: HubProcess) -> None:
    await call(hub.create_user, "alice", "viewer", "alice-password")
    await call(hub.create_device, "dev-a", owner="alice")
    token = await call(hub.login, "alice", "alice-password")
    async with dashboard(hub, token) as inbox:
        subscribed = await subscribe(inbox, ["dev-a"])
        assert subscribed["devices"] == ["dev-a"]

    response = await call(
        httpx.post,
        f"{hub.http}/api/auth/login",
        json={"username": "alice", "password": "alice-password"},
    )
    assert response.status_code == 200
    session = response.cookies["ems_session"]
    # Browsers send other cookies too, in any shape; the session cookie is picked out.
    for header in (
        f"ems_session={session}",
        f"theme=dark; ems_session={session}; lang=en",
        f'prefs={{"a":1}}; note=two words; ems_session={session}',
    ):
        async with dashboard(hub, cookie=header) as inbox:
            subscribed = await subscribe(inbox, ["*"])
            assert [s["device_id"] for s in subscribed["snapshot"]] == ["dev-a"]


# --- subscriptions -------------------------------------------------------------------------------


async def test_subscribe_answers_with_a_snapshot_and_unsubscribe_stops_updates(
    hub: HubProcess,
) -> None:
    token_1 = await call(hub.create_device, "dev-1")
    token_2 = await call(hub.create_device, "dev-2")
    admin = await call(hub.admin_token)
    async with device(hub, "dev-1", token_1) as dev1:
        await dev1.telemetry([{"ts": 1000, "data": {"voltage": 230.1}}])
        await dev1.telemetry([{"ts": 2000, "data": {"voltage": 231.5, "soc": 80}}])
        async with dashboard(hub, admin) as inbox:
            subscribed = await subscribe(inbox, ["dev-1", "dev-2"])
            assert subscribed["devices"] == ["dev-1", "dev-2"]
            snapshot = {s["device_id"]: s for s in subscribed["snapshot"]}
            assert set(snapshot) == {"dev-1", "dev-2"}
            one = snapshot["dev-1"]
            assert one["online"] is True
            assert isinstance(one["last_seen"], int | float)
            assert one["last_seen"] > 1.7e12
            assert one["latest"] == {"ts": 2000, "data": {"voltage": 231.5, "soc": 80}}
            two = snapshot["dev-2"]
            assert two["online"] is False
            assert two["last_seen"] is None
            assert two["latest"] is None

            await dev1.telemetry([{"ts": 3000, "data": {"voltage": 229.0}}])
            update = await inbox.first("telemetry_update")
            assert update == {
                "type": "telemetry_update",
                "device_id": "dev-1",
                "seq": 3,
                "ts": 3000,
                "data": {"voltage": 229.0},
            }

            await inbox.send({"type": "unsubscribe", "devices": ["dev-1"]})
            unsubscribed = await inbox.first("unsubscribed")
            assert unsubscribed == {"type": "unsubscribed", "devices": ["dev-1"]}
            # dev-1's sample is fanned out (acked) before dev-2 sends: had it reached this
            # dashboard, it would come before dev-2's messages.
            await dev1.telemetry([{"ts": 4000, "data": {"voltage": 228.0}}])
            async with device(hub, "dev-2", token_2) as dev2:
                await dev2.telemetry([{"ts": 5000, "data": {"voltage": 1.0}}])
                seen = await inbox.until(lambda m: m["type"] == "telemetry_update")
    assert all(m.get("device_id") != "dev-1" for m in seen), seen
    assert seen[-1]["device_id"] == "dev-2"
    assert {k: v for k, v in seen[0].items() if k != "ts"} == {
        "type": "device_status",
        "device_id": "dev-2",
        "online": True,
    }


async def test_snapshot_latest_comes_from_the_store_after_a_restart(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with device(hub, "dev-1", token) as dev:
        await dev.telemetry([{"ts": 1000, "data": {"voltage": 1.5}}])
    await call(hub.restart)
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        subscribed = await subscribe(inbox, ["dev-1"])
    [snap] = subscribed["snapshot"]
    assert snap["online"] is False
    assert snap["latest"] == {"ts": 1000, "data": {"voltage": 1.5}}
    assert isinstance(snap["last_seen"], int | float)


async def test_empty_subscribe_is_answered(hub: HubProcess) -> None:
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        subscribed = await subscribe(inbox, [])
    assert subscribed == {"type": "subscribed", "devices": [], "snapshot": []}


async def test_wildcard_covers_own_devices_created_later(hub: HubProcess) -> None:
    alice = await call(hub.create_user, "alice")
    await call(hub.create_user, "bob")
    async with dashboard(hub, alice) as inbox:
        subscribed = await subscribe(inbox, ["*"])
        assert subscribed["devices"] == ["*"]
        assert subscribed["snapshot"] == []
        token_b = await call(hub.create_device, "dev-b", owner="bob")
        token_a = await call(hub.create_device, "dev-a", owner="alice")
        async with device(hub, "dev-b", token_b) as dev_b:
            await dev_b.telemetry([{"ts": 1, "data": {"voltage": 1.0}}])
            async with device(hub, "dev-a", token_a) as dev_a:
                await dev_a.telemetry([{"ts": 2, "data": {"voltage": 2.0}}])
                seen = await inbox.until(lambda m: m["type"] == "telemetry_update")
    assert [m["type"] for m in seen] == ["device_status", "telemetry_update"]
    assert all(m["device_id"] == "dev-a" for m in seen), seen
    assert seen[1]["data"] == {"voltage": 2.0}


async def test_ownership_decides_what_a_user_may_subscribe(hub: HubProcess) -> None:
    alice = await call(hub.create_user, "alice", "viewer")
    bob = await call(hub.create_user, "bob", "operator")
    admin = await call(hub.admin_token)
    await call(hub.create_device, "dev-a", owner="alice")
    await call(hub.create_device, "dev-b", owner="bob")
    await call(hub.create_device, "dev-nobody")

    async with dashboard(hub, alice) as inbox:
        await inbox.send(
            {"type": "subscribe", "devices": ["dev-a", "dev-b", "no-such-device", "dev-nobody"]}
        )
        replies = [await inbox.next(), await inbox.next()]
    by_type = {m["type"]: m for m in replies}
    assert set(by_type) == {"subscribed", "error"}
    assert by_type["subscribed"]["devices"] == ["dev-a"]
    assert [s["device_id"] for s in by_type["subscribed"]["snapshot"]] == ["dev-a"]
    error = by_type["error"]
    assert error["code"] == "SUBSCRIPTION_FAILED"
    for refused in ("dev-b", "no-such-device", "dev-nobody"):
        assert refused in error["message"]
    assert "dev-a," not in error["message"]

    async with dashboard(hub, bob) as inbox:
        # Refused ids are named as given, whether or not they exist.
        await inbox.send({"type": "subscribe", "devices": ["DEV-A", "dev-a"]})
        error = await inbox.next()
        assert error["type"] == "error"
        assert error["code"] == "SUBSCRIPTION_FAILED"
        assert "DEV-A" in error["message"]
        assert "dev-a" in error["message"]
        subscribed = await subscribe(inbox, ["*"])
        assert [s["device_id"] for s in subscribed["snapshot"]] == ["dev-b"]

    async with dashboard(hub, admin) as inbox:
        subscribed = await subscribe(inbox, ["dev-a", "dev-b", "dev-nobody"])
        assert subscribed["devices"] == ["dev-a", "dev-b", "dev-nobody"]
        subscribed = await subscribe(inbox, ["*"])
        assert sorted(s["device_id"] for s in subscribed["snapshot"]) == [
            "dev-a",
            "dev-b",
            "dev-nobody",
        ]


async def test_a_recreated_device_does_not_leak_to_its_old_owners_subscription(
    hub: HubProcess,
) -> None:
    alice = await call(hub.create_user, "alice")
    await call(hub.create_user, "bob")
    await call(hub.create_device, "dev-x", owner="alice")
    async with dashboard(hub, alice) as inbox:
        await subscribe(inbox, ["dev-x"])
        response = await call(hub.request, "DELETE", "/api/devices/dev-x")
        assert response.status_code == 204
        token = await call(hub.create_device, "dev-x", owner="bob")
        async with device(hub, "dev-x", token) as dev:
            await dev.telemetry([{"ts": 1, "data": {"voltage": 1.0}}])
        # Something alice may see, as a marker after bob's device's traffic.
        response = await call(
            hub.request, "POST", "/api/realtime/user/alice", json={"event": "marker", "data": 1}
        )
        assert response.status_code in (200, 202)
        seen = await inbox.until(lambda m: m["type"] == "notification")
    assert [m["type"] for m in seen] == ["notification"], seen


# --- updates -------------------------------------------------------------------------------------


async def test_device_status_follows_welcome_and_disconnect(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device(hub, "dev-1", token):
            online = await inbox.first("device_status")
            assert online["device_id"] == "dev-1"
            assert online["online"] is True
            assert isinstance(online["ts"], int | float)
        offline = await inbox.first("device_status")
        assert offline["device_id"] == "dev-1"
        assert offline["online"] is False
        assert offline["ts"] >= online["ts"]


async def test_a_replaced_connection_does_not_make_the_device_go_offline(
    hub: HubProcess,
) -> None:
    token = await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device_ws(hub, "dev-1", token) as old:
            await hello(old, stream="s")
            assert (await inbox.first("device_status"))["online"] is True
            async with device(hub, "dev-1", token) as new:
                assert await closed_code(old) == 4000
                await new.telemetry([{"ts": 7, "data": {"voltage": 7.0}}])
                seen = await inbox.until(lambda m: m["type"] == "telemetry_update")
    assert [m["type"] for m in seen] == ["telemetry_update"], seen


async def test_one_telemetry_update_per_sample(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device(hub, "dev-1", token) as dev:
            samples = [
                {"ts": 1000, "data": {"voltage": 230.0}},
                {"ts": 1001, "data": {"voltage": "high"}},  # rejected alone
                {"ts": 1002, "data": {"current": 4.2, "position": {"latitude": 1, "longitude": 2}}},
                {"ts": 1003, "data": {"soc": 87, "label": "ok", "on": True}},
            ]
            seq = await dev.telemetry(samples)
            updates = []
            while len(updates) < 3:
                updates.append(await inbox.first("telemetry_update"))
    assert updates == [
        {"type": "telemetry_update", "device_id": "dev-1", "seq": seq, **s}
        for s in (samples[0], samples[2], samples[3])
    ]


async def test_device_event_reaches_the_dashboard(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device(hub, "dev-1", token) as dev:
            seq = await dev.send(
                {
                    "type": "event",
                    "ts": 1234,
                    "level": "critical",
                    "code": "DOOR_OPEN",
                    "message": "cabinet door opened",
                    "data": {"door": 2},
                }
            )
            await dev.acked(seq)
            event = await inbox.first("event")
    assert {k: event[k] for k in ("device_id", "ts", "level", "code", "message")} == {
        "device_id": "dev-1",
        "ts": 1234,
        "level": "critical",
        "code": "DOOR_OPEN",
        "message": "cabinet door opened",
    }


async def test_alert_fires_when_a_rule_starts_to_hold(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device(hub, "dev-1", token) as dev:
            # One message crossing the threshold and staying below it, then single samples.
            await dev.telemetry(
                [
                    {"ts": 1, "data": {"batteryVoltage": 12.6}},
                    {"ts": 2, "data": {"batteryVoltage": 11.5}},  # starts to hold: fires
                    {"ts": 3, "data": {"batteryVoltage": 11.2}},  # still holds: quiet
                ]
            )
            await dev.telemetry([{"ts": 4, "data": {"voltage": 230.0}}])  # metric absent
            await dev.telemetry([{"ts": 5, "data": {"batteryVoltage": 11.0}}])  # still holds
            await dev.telemetry([{"ts": 6, "data": {"batteryVoltage": 12.4}}])  # stops holding
            await dev.telemetry([{"ts": 7, "data": {"batteryVoltage": 11.9}}])  # fires again
            await dev.telemetry([{"ts": 8, "data": {"batteryVoltage": 11.8}}])  # marker
            seen = await inbox.until(lambda m: m["type"] == "telemetry_update" and m["ts"] == 8)
    alerts = [m for m in seen if m["type"] == "alert"]
    assert alerts == [
        {
            "type": "alert",
            "device_id": "dev-1",
            "ts": ts,
            "alert": {
                "level": "warning",
                "code": "LOW_BATTERY",
                "message": alerts[0]["alert"]["message"],
            },
            "data": {"batteryVoltage": value},
        }
        for ts, value in ((2, 11.5), (7, 11.9))
    ]
    assert isinstance(alerts[0]["alert"]["message"], str)
    assert alerts[0]["alert"]["message"]
    # Everything for one device arrives in order: each alert follows its sample's update.
    order = [(m["type"], m["ts"]) for m in seen if m["type"] in ("alert", "telemetry_update")]
    assert order.index(("alert", 2)) == order.index(("telemetry_update", 2)) + 1
    assert order.index(("alert", 7)) == order.index(("telemetry_update", 7)) + 1


async def test_notifications_from_the_broadcast_and_user_apis(hub: HubProcess) -> None:
    alice = await call(hub.create_user, "alice")
    bob = await call(hub.create_user, "bob")
    async with (
        dashboard(hub, alice) as alice_1,
        dashboard(hub, alice) as alice_2,
        dashboard(hub, bob) as bob_1,
    ):
        # Every dashboard is registered once it answered a request.
        for inbox in (alice_1, alice_2, bob_1):
            await subscribe(inbox, ["*"])
        response = await call(
            hub.request,
            "POST",
            "/api/realtime/user/alice",
            json={"event": "maintenance", "data": {"in_minutes": 5}},
        )
        assert response.status_code in (200, 202), response.text
        response = await call(
            hub.request,
            "POST",
            "/api/realtime/broadcast",
            json={"event": "hello-all", "data": [1, "two"]},
        )
        assert response.status_code in (200, 202), response.text
        for inbox in (alice_1, alice_2):
            assert await inbox.first("notification") == {
                "type": "notification",
                "event": "maintenance",
                "data": {"in_minutes": 5},
            }
        for inbox in (alice_1, alice_2, bob_1):
            assert await inbox.first("notification") == {
                "type": "notification",
                "event": "hello-all",
                "data": [1, "two"],
            }


# --- a slow dashboard ----------------------------------------------------------------------------


@asynccontextmanager
async def unread_dashboard(hub: HubProcess, token: str) -> AsyncIterator[Inbox]:
    """A dashboard whose socket has a small receive buffer, so its unread frames back up to
    the hub quickly (the kernel would otherwise buffer many megabytes)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    await sock.connect(("127.0.0.1", hub.port))
    stream = trio.SocketStream(sock)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(
            nursery,
            stream,
            "127.0.0.1",
            "/ws/dashboard",
            extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
        )
        try:
            yield Inbox(ws)
        finally:
            nursery.cancel_scope.cancel()


async def dropped_for(hub: HubProcess, username: str) -> int:
    response = await call(hub.request, "GET", "/api/realtime/users")
    assert response.status_code == 200, response.text
    return sum(u["dropped"] for u in response.json()["users"] if u["username"] == username)


async def test_a_slow_dashboard_lags_alone(hub_factory: Any) -> None:
    hub: HubProcess = await call(hub_factory, EMS_DASHBOARD_QUEUE="50")
    await call(hub.create_user, "fast")
    fast_token = await call(hub.login, "fast", "password-1")
    device_token = await call(hub.create_device, "dev-1", owner="fast")
    admin = await call(hub.admin_token)
    per_message = 40  # below the queue bound: the reading dashboard never overflows
    filler = {f"m{i}": "x" * 250 for i in range(8)}  # about 2 KB per update
    ts = 0
    async with (
        dashboard(hub, fast_token) as fast,
        unread_dashboard(hub, admin) as slow,
        device(hub, "dev-1", device_token) as dev,
    ):
        await subscribe(fast, ["dev-1"])
        await slow.send({"type": "subscribe", "devices": ["dev-1"]})
        received: list[tuple[int, float]] = []
        sent: list[tuple[int, float]] = []
        # The device sends as fast as the reading dashboard takes it, until the unread one's
        # buffers are full and the hub has dropped some of its updates; then a little more.
        messages = 0
        extra = None
        while extra != 0:
            assert messages < 2_000, "the unread dashboard never lagged"
            samples = [{"ts": ts + i, "data": {**filler, "n": ts + i}} for i in range(per_message)]
            ts += per_message
            seq = await dev.telemetry(samples)  # the ack is not held up by the slow reader
            messages += 1
            sent.extend((seq, s["ts"]) for s in samples)
            while len(received) < len(sent):
                update = await fast.next()
                assert update["type"] == "telemetry_update", update
                received.append((update["seq"], update["ts"]))
            if extra is None and messages % 10 == 0 and await dropped_for(hub, "admin") > 0:
                extra = 5
            elif extra is not None:
                extra -= 1
        assert received == sent
        last_ts = sent[-1][1]

        seen = await slow.until(lambda m: m["type"] == "lagged")
        lagged = seen[-1]
        assert lagged["dropped"] > 0
        assert seen[0]["type"] == "subscribed"
        rest = await slow.until(lambda m: m["type"] == "telemetry_update" and m["ts"] == last_ts)
        updates = [m for m in seen + rest if m["type"] == "telemetry_update"]
        # Oldest telemetry went first; what arrived is in order and the newest sample is there.
        assert [u["ts"] for u in updates] == sorted(u["ts"] for u in updates)
        assert len(updates) + lagged["dropped"] <= len(sent)
        assert all(
            m["type"] in ("telemetry_update", "lagged", "subscribed", "device_status")
            for m in seen + rest
        )


# --- invalid requests ----------------------------------------------------------------------------


INVALID_FRAMES = [
    "not json",
    "[1, 2]",
    '{"type": "dance"}',
    '{"devices": ["x"]}',
    '{"type": "subscribe"}',
    '{"type": "subscribe", "devices": "dev-1"}',
    '{"type": "unsubscribe", "devices": [1]}',
]


async def test_invalid_requests_get_an_error_and_the_link_stays_open(hub: HubProcess) -> None:
    await call(hub.create_device, "dev-1")
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        for frame in INVALID_FRAMES:
            await inbox.ws.send_message(frame)
            error = await inbox.next()
            assert error["type"] == "error", frame
            assert error["code"] == "INVALID_MESSAGE_FORMAT", frame
            assert isinstance(error["message"], str)
            assert error["message"]
        await inbox.ws.send_message(b'{"type": "subscribe", "devices": ["dev-1"]}')
        subscribed = await inbox.first("subscribed")
        assert subscribed["devices"] == ["dev-1"]


async def test_batches_stay_within_the_frame_limit(hub: HubProcess) -> None:
    """A full-size telemetry message fans out as many updates; packed into batches they must
    not make a frame larger than the 1 MiB limit that clients (and the hub itself) keep."""
    token = await call(hub.create_device, "dev-1")
    filler = {f"m{i}": "y" * 240 for i in range(4)}
    samples = [{"ts": ts, "data": {**filler, "n": ts}} for ts in range(1000)]
    assert len(orjson.dumps({"type": "telemetry", "seq": 1, "samples": samples})) < 1_048_576
    async with dashboard(hub, await call(hub.admin_token)) as inbox:
        await subscribe(inbox, ["dev-1"])
        async with device(hub, "dev-1", token) as dev:
            await dev.telemetry(samples)
            updates = [await inbox.first("telemetry_update") for _ in samples]
    assert [u["ts"] for u in updates] == list(range(1000))


async def test_hub_shutdown_closes_dashboards_with_1001(hub: HubProcess) -> None:
    admin = await call(hub.admin_token)
    headers = [("Authorization", f"Bearer {admin}")]
    async with open_websocket_url(f"{hub.ws}/ws/dashboard", extra_headers=headers) as ws:
        await send_json(ws, {"type": "subscribe", "devices": ["*"]})
        with trio.fail_after(HANG_GUARD_S):
            assert orjson.loads(await ws.get_message())["type"] == "subscribed"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, hub.stop)
            with trio.fail_after(HANG_GUARD_S), pytest.raises(ConnectionClosed) as closed:
                await _read_until_closed(ws)
    assert closed.value.reason.code == 1001


async def _read_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()
