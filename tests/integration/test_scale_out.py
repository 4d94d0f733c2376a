"""Several hub processes over a real PostgreSQL and a real Redis (step 7).

Two `hypercorn -k trio ems.hub:app` subprocesses on different ports share one PostgreSQL
database and one redis-server, both started by the fixtures. Devices and dashboards are plain
WebSocket clients speaking the contract, each pointed at the hub the test chooses.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import AsyncExitStack
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from tests.integration.conftest import (
    HANG_GUARD_S,
    HubProcess,
    call,
    dashboard_ws,
    device_ws,
    hello,
    hub_env,
    next_of,
    receive_until,
    send_json,
)
from tests.services import RedisServer

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

GHOST_CLOSE_S = 1.0
"""The contract for step 7: a ghost on another hub is closed within a second."""


@attrs.define
class Cluster:
    a: HubProcess
    b: HubProcess
    redis: RedisServer
    database_url: str


@pytest.fixture
def cluster(hub_factory: Any, postgres_db_url: str, redis_server: RedisServer) -> Cluster:
    settings = {"EMS_DATABASE_URL": postgres_db_url, "EMS_REDIS_URL": redis_server.url}
    a = hub_factory(**settings)
    b = hub_factory(**settings)
    return Cluster(a=a, b=b, redis=redis_server, database_url=postgres_db_url)


async def update_for(
    dashboard: WebSocketConnection, kind: str, device_id: str, **fields: Any
) -> dict[str, Any]:
    """The next dashboard update of `kind` about `device_id` with these field values."""
    with trio.fail_after(HANG_GUARD_S):
        while True:
            item = await next_of(dashboard, kind)
            if item.get("device_id") == device_id and all(
                item.get(k) == v for k, v in fields.items()
            ):
                return item


async def updates_until(
    dashboard: WebSocketConnection, device_id: str, kinds: set[str]
) -> dict[str, dict[str, Any]]:
    """Updates about `device_id` until one of each kind came (in whatever order)."""
    seen: dict[str, dict[str, Any]] = {}
    with trio.fail_after(HANG_GUARD_S):
        while not kinds <= seen.keys():
            item = await next_of(dashboard, *kinds)
            if item.get("device_id") == device_id:
                seen.setdefault(item["type"], item)
    return seen


async def watching(
    stack: AsyncExitStack, hub: HubProcess, token: str, devices: list[str]
) -> WebSocketConnection:
    dashboard = await stack.enter_async_context(dashboard_ws(hub, token))
    await send_json(dashboard, {"type": "subscribe", "devices": devices})
    await receive_until(dashboard, "subscribed")
    return dashboard


async def close_code(ws: WebSocketConnection) -> int:
    """Read (and drop) messages until the hub closes the link; its close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as closed:
        return int(closed.reason.code)


def telemetry(seq: int, ts: int, **data: Any) -> dict[str, Any]:
    return {"type": "telemetry", "seq": seq, "samples": [{"ts": ts, "data": data}]}


async def acked(ws: WebSocketConnection, seq: int) -> None:
    with trio.fail_after(HANG_GUARD_S):
        while (await next_of(ws, "ack"))["seq"] < seq:
            pass


async def stored_seqs(hub: HubProcess, device_id: str) -> list[int]:
    response = await call(hub.request, "GET", f"/api/devices/{device_id}/telemetry")
    assert response.status_code == 200, response.text
    return [s["seq"] for s in response.json()["samples"]]


@attrs.define
class LoggedOn:
    """Waits for a hub to log an event after the moment it was made."""

    hub: HubProcess
    mark: int

    @classmethod
    def now(cls, hub: HubProcess) -> LoggedOn:
        return cls(hub, hub.lines.mark())

    async def event(self, name: str) -> str:
        return str(await call(self.hub.lines.wait_for, f'"event":"{name}"', after=self.mark))


# --- fan-out --------------------------------------------------------------------------------------


async def test_a_dashboard_on_one_hub_sees_devices_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    await call(a.create_user, "alice", "viewer")
    alice = await call(b.login, "alice", "password-1")
    mine = await call(a.create_device, "van-alice", owner="alice")
    theirs = await call(a.create_device, "van-other")
    async with AsyncExitStack() as stack:
        admin_view = await watching(stack, b, await call(b.admin_token), ["*"])
        alice_view = await watching(stack, b, alice, ["*"])
        for device_id, token, ts in (("van-other", theirs, 1000), ("van-alice", mine, 2000)):
            ws = await stack.enter_async_context(device_ws(a, device_id, token))
            await hello(ws)
            await update_for(admin_view, "device_status", device_id, online=True)
            await send_json(ws, telemetry(1, ts, batteryVoltage=11.5))
            seen = await updates_until(admin_view, device_id, {"telemetry_update", "alert"})
            assert seen["telemetry_update"]["ts"] == ts
            assert seen["telemetry_update"]["data"] == {"batteryVoltage": 11.5}
            assert seen["alert"]["alert"]["code"] == "LOW_BATTERY"
        # Ownership holds across hubs: alice's `*` covers her device and nothing else.
        first = await next_of(alice_view, "telemetry_update", "alert")
        assert first["device_id"] == "van-alice"
    health = (await call(b.request, "GET", "/health", token="")).json()
    assert health["status"] == "ok"
    assert health["bus"] == "ok"
    assert health["hubs"] == 2


async def test_health_and_realtime_show_the_whole_cluster(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    token = await call(a.create_device, "d1")
    async with device_ws(b, "d1", token) as ws:
        welcome = await hello(ws)
        for hub in (a, b):
            health = (await call(hub.request, "GET", "/health", token="")).json()
            assert health["connected_devices"] == 1
            assert health["hubs"] == 2
            listed = (await call(hub.request, "GET", "/api/realtime/devices")).json()["devices"]
            assert [(d["device_id"], d["session_id"]) for d in listed] == [
                ("d1", welcome["session_id"])
            ]
        on_b = (await call(b.request, "GET", "/health", token="")).json()["hub"]
        assert listed[0]["hub"] == on_b["hub_id"]
        device = (await call(a.request, "GET", "/api/devices/d1")).json()
        assert device["online"] is True


# --- presence -------------------------------------------------------------------------------------


async def test_a_ghost_on_the_other_hub_is_closed_with_4000(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    token = await call(a.create_device, "d1")
    async with AsyncExitStack() as stack:
        dashboard = await watching(stack, a, await call(a.admin_token), ["d1"])
        ghost = await stack.enter_async_context(device_ws(a, "d1", token))
        await hello(ghost)
        await update_for(dashboard, "device_status", "d1", online=True)
        await send_json(ghost, telemetry(1, 1000, soc=50))
        await acked(ghost, 1)
        # The device comes back through hub B while its old link on A still looks alive.
        newer = await stack.enter_async_context(device_ws(b, "d1", token))
        with trio.fail_after(GHOST_CLOSE_S):
            assert await close_code(ghost) == 4000
        welcome = await hello(newer)
        assert welcome["acked_seq"] == 1
        await send_json(newer, telemetry(2, 2000, soc=51))
        await acked(newer, 2)
        # The dashboard on A follows the device to B without ever seeing it offline.
        update = await update_for(dashboard, "telemetry_update", "d1", seq=2)
        assert update["data"] == {"soc": 51}
        listed = (await call(a.request, "GET", "/api/realtime/devices")).json()["devices"]
        assert [d["device_id"] for d in listed] == ["d1"]
    assert await stored_seqs(a, "d1") == [1, 2]


# --- wake-ups -------------------------------------------------------------------------------------


async def test_commands_and_config_made_on_one_hub_reach_a_device_on_the_other(
    cluster: Cluster,
) -> None:
    a, b = cluster.a, cluster.b
    token = await call(b.create_device, "d1")
    async with AsyncExitStack() as stack:
        dashboard = await watching(stack, a, await call(a.admin_token), ["d1"])
        ws = await stack.enter_async_context(device_ws(b, "d1", token))
        await hello(ws)
        await update_for(dashboard, "device_status", "d1", online=True)

        response = await call(
            a.request, "POST", "/api/devices/d1/commands", json={"name": "ping", "params": {"n": 1}}
        )
        assert response.status_code == 202, response.text
        command = response.json()
        delivered = await next_of(ws, "command")
        assert (delivered["id"], delivered["params"]) == (command["id"], {"n": 1})
        for seq, status in enumerate(("received", "succeeded"), start=1):
            await send_json(
                ws, {"type": "command_result", "seq": seq, "id": command["id"], "status": status}
            )
        # The status made on hub B reaches the dashboard on A and the shared store.
        with trio.fail_after(HANG_GUARD_S):
            while True:
                update = await next_of(dashboard, "command_status")
                if update["command"]["status"] == "succeeded":
                    break
        stored = (await call(a.request, "GET", f"/api/commands/{command['id']}")).json()
        assert stored["status"] == "succeeded"

        response = await call(
            a.request, "PUT", "/api/devices/d1/config", json={"config": {"interval_s": 5}}
        )
        assert response.status_code == 200, response.text
        pushed = await next_of(ws, "config")
        assert pushed["config"] == {"interval_s": 5}

        # An online-only realtime event is not refused: the device is online, on hub B.
        response = await call(
            a.request, "POST", "/api/realtime/device/d1", json={"event": "blink", "data": {}}
        )
        assert response.status_code == 202, response.text
        assert (await next_of(ws, "command"))["name"] == "blink"


async def test_a_token_rotated_on_one_hub_closes_the_link_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    token = await call(a.create_device, "d1")
    async with device_ws(b, "d1", token) as ws:
        await hello(ws)
        response = await call(a.request, "POST", "/api/devices/d1/token")
        assert response.status_code == 200
        with trio.fail_after(HANG_GUARD_S):
            assert await close_code(ws) == 4003


# --- Redis lost and back --------------------------------------------------------------------------


async def test_redis_lost_and_back(cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    token = await call(a.create_device, "d1")
    admin_a, admin_b = await call(a.admin_token), await call(b.admin_token)
    async with AsyncExitStack() as stack:
        local = await watching(stack, a, admin_a, ["d1"])
        remote = await watching(stack, b, admin_b, ["d1"])
        ws = await stack.enter_async_context(device_ws(a, "d1", token))
        await hello(ws)
        await send_json(ws, telemetry(1, 1000, soc=1))
        await update_for(remote, "telemetry_update", "d1", seq=1)

        watch_a, watch_b = LoggedOn.now(a), LoggedOn.now(b)
        cluster.redis.kill()
        await watch_a.event("bus_down")
        await watch_b.event("bus_down")
        for hub in (a, b):
            health_response = await call(hub.request, "GET", "/health", token="")
            assert health_response.status_code == 200  # the store is fine: degraded, not down
            health = health_response.json()
            assert health["status"] == "degraded"
            assert health["bus"] == "down"
            assert "redis" in health["reason"]
        # Hub A keeps serving its own device and dashboard: stored, acked, fanned out.
        watch_lost = LoggedOn.now(a)
        for seq in (2, 3):
            await send_json(ws, telemetry(seq, seq * 1000, soc=seq))
            await update_for(local, "telemetry_update", "d1", seq=seq)
        await acked(ws, 3)
        assert "redis unreachable" in await watch_lost.event("bus_updates_lost")

        watch_a, watch_b = LoggedOn.now(a), LoggedOn.now(b)
        cluster.redis.start()
        await watch_a.event("bus_up")
        await watch_b.event("bus_up")
        await send_json(ws, telemetry(4, 4000, soc=4))
        # The dashboard on B missed seqs 2 and 3 (A could not relay them): it is told so, in
        # order, before what comes next.
        with trio.fail_after(HANG_GUARD_S):
            missed = await next_of(remote, "lagged", "telemetry_update")
        assert missed == {"type": "lagged", "dropped": 2}
        await update_for(remote, "telemetry_update", "d1", seq=4)
        await acked(ws, 4)
        metrics = (await call(a.request, "GET", "/metrics", token="")).text
        assert "ems_bus_dropped_total 2.0" in metrics, metrics
        health = (await call(b.request, "GET", "/health", token="")).json()
        assert health["status"] == "ok"
        assert health["connected_devices"] == 1
    assert await stored_seqs(b, "d1") == [1, 2, 3, 4]


async def test_a_hub_starts_without_redis_and_serves_degraded(
    hub_factory: Any, postgres_db_url: str
) -> None:
    # A port nobody listens on: Redis is down from the start.
    closed_port = RedisServer("redis-server").port
    hub = hub_factory(
        EMS_DATABASE_URL=postgres_db_url, EMS_REDIS_URL=f"redis://127.0.0.1:{closed_port}/0"
    )
    token = await call(hub.create_device, "d1")
    async with device_ws(hub, "d1", token) as ws:
        await hello(ws)
        await send_json(ws, telemetry(1, 1000, soc=1))
        await acked(ws, 1)
    health = (await call(hub.request, "GET", "/health", token="")).json()
    assert health["status"] == "degraded"
    assert health["bus"] == "down"


# --- refused set-ups ------------------------------------------------------------------------------


def _run_refused(env: dict[str, str], cwd: Any, *extra: str) -> str:
    """Run a hub that must refuse to start; its output (it must exit by itself)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            *extra,
            "-b",
            "127.0.0.1:0",
            "ems.hub:app",
        ],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


async def test_several_workers_on_sqlite_are_refused(tmp_path: Any) -> None:
    env = hub_env(tmp_path)
    output = await call(_run_refused, env, tmp_path, "-w", "2")
    assert "refusing to start" in output
    assert "EMS_DATABASE_URL" in output
    assert "EMS_REDIS_URL" in output


async def test_a_second_hub_on_postgres_without_redis_is_refused(
    hub_factory: Any, postgres_db_url: str, tmp_path: Any
) -> None:
    first = hub_factory(EMS_DATABASE_URL=postgres_db_url)
    assert (await call(first.request, "GET", "/health", token="")).status_code == 200
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    env = hub_env(second_dir, EMS_DATABASE_URL=postgres_db_url)
    output = await call(_run_refused, env, second_dir)
    assert "refusing to start" in output
    assert "EMS_REDIS_URL" in output
    # The first one is unharmed.
    assert (await call(first.request, "GET", "/health", token="")).status_code == 200


async def test_broadcasts_and_user_notifications_reach_dashboards_on_every_hub(
    cluster: Cluster,
) -> None:
    a, b = cluster.a, cluster.b
    await call(a.create_user, "bob", "viewer")
    bob = await call(b.login, "bob", "password-1")
    async with AsyncExitStack() as stack:
        admin_on_b = await watching(stack, b, await call(b.admin_token), [])
        bob_on_b = await watching(stack, b, bob, [])
        response = await call(
            a.request, "POST", "/api/realtime/broadcast", json={"event": "maintenance", "data": 1}
        )
        assert response.status_code == 202, response.text
        for dashboard in (admin_on_b, bob_on_b):
            note = await next_of(dashboard, "notification")
            assert (note["event"], note["data"]) == ("maintenance", 1)
        response = await call(
            a.request, "POST", "/api/realtime/user/bob", json={"event": "hello", "data": {"x": 1}}
        )
        assert response.status_code == 202, response.text
        note = await next_of(bob_on_b, "notification")
        assert (note["event"], note["data"]) == ("hello", {"x": 1})
