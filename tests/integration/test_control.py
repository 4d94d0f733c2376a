"""Device control through the real hub: commands, desired config, history requests.

The device side is a plain WebSocket client speaking the contract, so each test sees exactly
what the hub sends and when.
"""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import WebSocketConnection

from tests.integration.conftest import (
    HANG_GUARD_S,
    HubProcess,
    call,
    dashboard_ws,
    device_ws,
    hello,
    next_of,
    receive_until,
    send_json,
)


async def command_status(
    dashboard: WebSocketConnection, command_id: str, status: str
) -> dict[str, Any]:
    with trio.fail_after(HANG_GUARD_S):
        while True:
            update = await receive_until(dashboard, "command_status")
            if update["command"]["id"] == command_id and update["command"]["status"] == status:
                return update["command"]  # type: ignore[no-any-return]


async def post(hub: HubProcess, path: str, body: dict[str, Any]) -> Any:
    return await call(hub.request, "POST", path, json=body)


async def subscribed_dashboard(hub: HubProcess, stack: Any) -> WebSocketConnection:
    dashboard = await stack.enter_async_context(dashboard_ws(hub, await call(hub.admin_token)))
    await send_json(dashboard, {"type": "subscribe", "devices": ["*"]})
    await receive_until(dashboard, "subscribed")
    return dashboard


async def test_command_to_offline_device_is_delivered_after_welcome_and_tracked(
    hub: HubProcess,
) -> None:
    from contextlib import AsyncExitStack

    token = await call(hub.create_device, "d1")
    async with AsyncExitStack() as stack:
        dashboard = await subscribed_dashboard(hub, stack)
        response = await post(hub, "/api/devices/d1/commands", {"name": "ping", "params": {"a": 1}})
        assert response.status_code == 202
        command = response.json()
        assert command["status"] == "pending"
        assert command["delivery"] == "queued"
        assert {
            "id",
            "device_id",
            "name",
            "params",
            "status",
            "progress",
            "result",
            "error",
        } <= set(command)
        async with device_ws(hub, "d1", token) as ws:
            await hello(ws)
            delivered = await next_of(ws, "command")
            assert delivered["id"] == command["id"]
            assert delivered["name"] == "ping"
            assert delivered["params"] == {"a": 1}
            await command_status(dashboard, command["id"], "sent")
            for seq, status in enumerate(("received", "running", "succeeded"), start=1):
                body: dict[str, Any] = {
                    "type": "command_result",
                    "seq": seq,
                    "id": command["id"],
                    "status": status,
                }
                if status == "succeeded":
                    body["result"] = {"pong": True}
                await send_json(ws, body)
            done = await command_status(dashboard, command["id"], "succeeded")
            assert done["result"] == {"pong": True}
    stored = (await call(hub.request, "GET", f"/api/commands/{command['id']}")).json()
    assert stored["status"] == "succeeded"
    listed = (await call(hub.request, "GET", "/api/devices/d1/commands")).json()["commands"]
    assert [c["id"] for c in listed] == [command["id"]]


async def test_command_dropped_before_received_is_sent_again(hub: HubProcess) -> None:
    token = await call(hub.create_device, "d1")
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        command = (await post(hub, "/api/devices/d1/commands", {"name": "reboot"})).json()
        assert (await next_of(ws, "command"))["id"] == command["id"]
    # the link dropped before `received`: the next welcome brings it again
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        assert (await next_of(ws, "command"))["id"] == command["id"]
        await send_json(
            ws, {"type": "command_result", "seq": 1, "id": command["id"], "status": "received"}
        )
        assert (await next_of(ws, "ack"))["seq"] == 1
    # once received, it is not sent again
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        await send_json(ws, {"type": "heartbeat", "ts": 1})
        await send_json(
            ws, {"type": "telemetry", "seq": 2, "samples": [{"ts": 1, "data": {"soc": 1}}]}
        )
        first = await next_of(ws, "command", "ack")
        assert first == {"type": "ack", "seq": 2}


async def test_expired_command_is_never_delivered(hub: HubProcess) -> None:
    from contextlib import AsyncExitStack

    token = await call(hub.create_device, "d1")
    async with AsyncExitStack() as stack:
        dashboard = await subscribed_dashboard(hub, stack)
        command = (
            await post(hub, "/api/devices/d1/commands", {"name": "ping", "expires_in_s": 0.3})
        ).json()
        expired = await command_status(dashboard, command["id"], "expired")
        assert expired["id"] == command["id"]
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        await send_json(
            ws, {"type": "telemetry", "seq": 1, "samples": [{"ts": 1, "data": {"soc": 1}}]}
        )
        assert await next_of(ws, "command", "ack") == {"type": "ack", "seq": 1}


async def test_pending_commands_are_capped(hub_factory: Any) -> None:
    hub = hub_factory(EMS_MAX_PENDING_COMMANDS="2")
    await call(hub.create_device, "d1")
    for _ in range(2):
        assert (await post(hub, "/api/devices/d1/commands", {"name": "ping"})).status_code == 202
    refused = await post(hub, "/api/devices/d1/commands", {"name": "ping"})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"


async def test_invalid_commands_are_refused(hub: HubProcess) -> None:
    await call(hub.create_device, "d1")
    for body in (
        {"name": "Bad Name"},
        {"name": "ping", "params": [1]},
        {"params": {}},
        {"name": "ping", "expires_in_s": -1},
    ):
        response = await post(hub, "/api/devices/d1/commands", body)
        assert response.status_code in (400, 422), body
        assert response.json()["error"]["code"] == "INVALID_MESSAGE_FORMAT"
    assert (await post(hub, "/api/devices/nope/commands", {"name": "ping"})).status_code == 404


async def test_realtime_device_event_is_online_only(hub: HubProcess) -> None:
    token = await call(hub.create_device, "d1")
    offline = await post(hub, "/api/realtime/device/d1", {"event": "blink", "data": {"n": 3}})
    assert offline.status_code == 409
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        response = await post(hub, "/api/realtime/device/d1", {"event": "blink", "data": {"n": 3}})
        assert response.status_code == 202
        assert response.json()["delivery"] == "online_only"
        command = await next_of(ws, "command")
        assert (command["name"], command["params"]) == ("blink", {"n": 3})


async def test_config_push_online_offline_and_reports(hub: HubProcess) -> None:
    token = await call(hub.create_device, "d1")
    # offline: stored as version 1, sent right after the next welcome
    put = await call(
        hub.request, "PUT", "/api/devices/d1/config", json={"config": {"batch_interval_s": 5}}
    )
    assert put.status_code == 200
    assert put.json()["desired"] == {"version": 1, "config": {"batch_interval_s": 5}}
    async with device_ws(hub, "d1", token) as ws:
        welcome = await hello(ws, config_version=0)
        assert welcome["config_version"] == 1
        config = await next_of(ws, "config")
        assert config == {"type": "config", "version": 1, "config": {"batch_interval_s": 5}}
        await send_json(ws, {"type": "config_applied", "seq": 1, "version": 1, "status": "applied"})
        await next_of(ws, "ack")
        # online: pushed at once
        await call(
            hub.request, "PUT", "/api/devices/d1/config", json={"config": {"batch_interval_s": -1}}
        )
        config = await next_of(ws, "config")
        assert config["version"] == 2
        await send_json(
            ws,
            {
                "type": "config_applied",
                "seq": 2,
                "version": 2,
                "status": "rejected",
                "error": "batch_interval_s: bad",
            },
        )
        await next_of(ws, "ack")
    document = (await call(hub.request, "GET", "/api/devices/d1/config")).json()
    assert document["desired"]["version"] == 2
    assert document["reported"] == {
        "version": 2,
        "status": "rejected",
        "error": "batch_interval_s: bad",
    }
    # a device that already has the desired version gets no config after welcome
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws, config_version=2)
        await send_json(
            ws, {"type": "telemetry", "seq": 3, "samples": [{"ts": 1, "data": {"soc": 1}}]}
        )
        assert await next_of(ws, "config", "ack") == {"type": "ack", "seq": 3}


async def test_history_request_succeeds_when_the_final_chunk_is_stored(hub: HubProcess) -> None:
    from contextlib import AsyncExitStack

    token = await call(hub.create_device, "d1")
    async with AsyncExitStack() as stack:
        dashboard = await subscribed_dashboard(hub, stack)
        ws = await stack.enter_async_context(device_ws(hub, "d1", token))
        await hello(ws)
        # one sample already stored live; the history repeats it and adds two
        await send_json(
            ws, {"type": "telemetry", "seq": 1, "samples": [{"ts": 10, "data": {"soc": 1}}]}
        )
        await next_of(ws, "ack")
        command = (
            await post(hub, "/api/devices/d1/history-request", {"from": 0, "to": 100})
        ).json()
        request = await next_of(ws, "history_request")
        assert (request["id"], request["from"], request["to"]) == (command["id"], 0, 100)
        first = [{"ts": 10, "data": {"soc": 9}}, {"ts": 20, "data": {"soc": 2}}]
        chunks = [
            {
                "type": "history",
                "seq": 2,
                "request_id": command["id"],
                "samples": first,
                "final": False,
            },
            {
                "type": "history",
                "seq": 3,
                "request_id": command["id"],
                "samples": [{"ts": 30, "data": {"soc": 3}}],
                "final": True,
            },
        ]
        for chunk in chunks:
            await send_json(ws, chunk)
        await command_status(dashboard, command["id"], "succeeded")
    samples = (await call(hub.request, "GET", "/api/devices/d1/telemetry")).json()["samples"]
    assert [(s["ts"], s["seq"], s["data"]) for s in samples] == [
        (10, 1, {"soc": 1}),  # stored once, with the seq that first delivered it
        (20, 2, {"soc": 2}),
        (30, 3, {"soc": 3}),
    ]
