"""The REST API (protocol.md §3, device-control routes aside) against a real hub subprocess.

Plain `def` tests talk only HTTP; `async def` tests also drive a device or a dashboard over a
WebSocket and run blocking HTTP calls through `call`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from tests.integration.conftest import (
    ADMIN_PASSWORD,
    HANG_GUARD_S,
    HubProcess,
    call,
    dashboard_ws,
    device_ws,
    hello,
    receive_until,
    send_json,
)

CONTRACT_CODES = {
    "AUTHENTICATION_FAILED",
    "INVALID_MESSAGE_FORMAT",
    "TELEMETRY_VALIDATION_FAILED",
    "DEVICE_NOT_FOUND",
    "COMMAND_EXECUTION_FAILED",
    "SUBSCRIPTION_FAILED",
    "RATE_LIMIT_EXCEEDED",
    "MESSAGE_TOO_LARGE",
    "NOT_FOUND",
    "FORBIDDEN",
    "CONFLICT",
}
DEFAULT_RULES = {
    ("LOW_BATTERY", "batteryVoltage", "<", 12.0, "warning"),
    ("CRASH_DETECTED", "crashDetection", ">", 0, "critical"),
    ("HIGH_RPM", "engineRpm", ">", 4000, "warning"),
    ("DTC_DETECTED", "dtc", ">", 0, "warning"),
}


def error_of(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, str]:
    """The `error` object of an error answer, checked against the contract's shape."""
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message"}, error
    assert error["code"] in CONTRACT_CODES, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    return error  # type: ignore[no-any-return]


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, (response.status_code, response.text)
    return response.json()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


# --- health and metrics --------------------------------------------------------------------------


def test_health(hub: HubProcess) -> None:
    body = ok(httpx.get(f"{hub.http}/health"))
    assert body["status"] == "ok"
    assert body["store"] == "ok"
    assert isinstance(body["uptime_s"], int | float)
    assert body["uptime_s"] >= 0
    assert body["connected_devices"] == 0
    assert body["connected_dashboards"] == 0


def test_metrics_from_loopback_need_no_login(hub: HubProcess) -> None:
    hub.create_device("dev-1")
    response = httpx.get(f"{hub.http}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for family in (
        "ems_connected_devices",
        "ems_connected_dashboards",
        "ems_frames_in",
        "ems_frames_out",
        "ems_samples_rejected",
        "ems_store_batch_seconds",
        "ems_dashboard_dropped",
    ):
        assert f"# TYPE {family}" in text, family
    assert "ems_auth_failures_total" in text


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_device_traffic(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with device_ws(hub, "dev-1", token) as ws:
        await hello(ws)
        await send_telemetry(ws, 1, [{"ts": 1, "data": {"voltage": 1.0}}])
        await send_telemetry(ws, 2, [{"ts": 2, "data": {"voltage": "high"}}])
        text = (await call(httpx.get, f"{hub.http}/metrics")).text
    assert metric_value(text, "ems_connected_devices") == 1
    assert metric_value(text, "ems_frames_in_total") >= 3
    assert metric_value(text, "ems_samples_in_total") >= 1
    assert metric_value(text, "ems_samples_rejected_total") == 1
    assert metric_value(text, "ems_store_batches_total") >= 1


async def test_metrics_count_acks(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with device_ws(hub, "dev-1", token) as ws:
        await hello(ws)
        await send_telemetry(ws, 1, [{"ts": 1, "data": {"voltage": 1.0}}])
        text = (await call(httpx.get, f"{hub.http}/metrics")).text
    assert metric_value(text, "ems_acks_sent_total") >= 1


# --- login, logout, rate limit ------------------------------------------------------------------


def test_login_answers_a_token_and_a_strict_http_only_cookie(hub: HubProcess) -> None:
    response = httpx.post(
        f"{hub.http}/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    body = ok(response)
    assert isinstance(body["token"], str)
    assert len(body["token"]) >= 32
    assert isinstance(body["expires_at"], int | float)
    now_ms = ok(hub.request("GET", "/api/realtime/status", body["token"]))["server_time"]
    assert body["expires_at"] > now_ms
    cookie = response.headers["set-cookie"]
    name, _, rest = cookie.partition("=")
    assert name == "ems_session"
    assert rest.split(";")[0] == body["token"]
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert "httponly" in attributes
    assert "samesite=strict" in attributes
    # Both the Bearer token and the cookie authenticate REST.
    ok(hub.request("GET", "/api/devices", body["token"]))
    with_cookie = httpx.get(
        f"{hub.http}/api/devices", headers={"Cookie": f"ems_session={body['token']}"}
    )
    assert ok(with_cookie) == {"devices": []}


def test_wrong_credentials_are_refused(hub: HubProcess) -> None:
    for credentials in (
        {"username": "admin", "password": "wrong-password"},
        {"username": "nobody", "password": ADMIN_PASSWORD},
    ):
        response = httpx.post(f"{hub.http}/api/auth/login", json=credentials)
        assert error_of(response, 401)["code"] == "AUTHENTICATION_FAILED"
        assert "set-cookie" not in response.headers


def test_logout_invalidates_the_token(hub: HubProcess) -> None:
    hub.create_user("alice", "viewer", "alice-password")
    token = hub.login("alice", "alice-password")
    other = hub.login("alice", "alice-password")
    ok(hub.request("GET", "/api/devices", token))
    response = hub.request("POST", "/api/auth/logout", token)
    assert response.status_code == 204
    assert error_of(hub.request("GET", "/api/devices", token), 401)["code"] == (
        "AUTHENTICATION_FAILED"
    )
    cookie_auth = httpx.get(f"{hub.http}/api/devices", headers={"Cookie": f"ems_session={token}"})
    error_of(cookie_auth, 401)
    # Other sessions of the same user live on.
    ok(hub.request("GET", "/api/devices", other))
    # Logging out with the cookie works too.
    response = httpx.post(f"{hub.http}/api/auth/logout", headers={"Cookie": f"ems_session={other}"})
    assert response.status_code == 204
    error_of(hub.request("GET", "/api/devices", other), 401)


def _login_from(hub: HubProcess, address: str, username: str, password: str) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=30) as c:
        return c.post(
            f"{hub.http}/api/auth/login", json={"username": username, "password": password}
        )


def test_ten_failed_logins_block_the_username_and_the_address(hub: HubProcess) -> None:
    hub.create_user("alice", "viewer", "alice-password")
    hub.create_user("bob", "viewer", "bob-password")
    # Distinct loopback source addresses separate the per-address and per-username limits.
    for _ in range(10):
        error_of(_login_from(hub, "127.0.0.2", "alice", "wrong-password"), 401)
    # The 11th try is refused, even with the right password ...
    blocked = _login_from(hub, "127.0.0.2", "alice", "alice-password")
    assert error_of(blocked, 429)["code"] == "RATE_LIMIT_EXCEEDED"
    # ... for that username from anywhere ...
    blocked = _login_from(hub, "127.0.0.3", "alice", "alice-password")
    assert error_of(blocked, 429)["code"] == "RATE_LIMIT_EXCEEDED"
    # ... and for anyone from that address.
    blocked = _login_from(hub, "127.0.0.2", "bob", "bob-password")
    assert error_of(blocked, 429)["code"] == "RATE_LIMIT_EXCEEDED"
    # Other users from other addresses log in as usual.
    ok(_login_from(hub, "127.0.0.4", "bob", "bob-password"))


def test_failed_logins_for_unknown_users_count_per_address(hub: HubProcess) -> None:
    hub.create_user("carol", "viewer", "carol-password")
    for index in range(10):
        error_of(_login_from(hub, "127.0.0.5", f"ghost-{index}", "whatever-1"), 401)
    blocked = _login_from(hub, "127.0.0.5", "carol", "carol-password")
    assert error_of(blocked, 429)["code"] == "RATE_LIMIT_EXCEEDED"
    ok(_login_from(hub, "127.0.0.6", "carol", "carol-password"))


# --- users ---------------------------------------------------------------------------------------


def test_users_are_created_and_listed_by_admins(hub: HubProcess) -> None:
    response = hub.request(
        "POST",
        "/api/users",
        json={"username": "alice", "password": "alice-password", "role": "operator"},
    )
    assert ok(response, 201) == {"username": "alice", "role": "operator"}
    ok(
        hub.request(
            "POST",
            "/api/users",
            json={"username": "bob", "password": "bob-password", "role": "viewer"},
        ),
        201,
    )
    duplicate = hub.request(
        "POST",
        "/api/users",
        json={"username": "alice", "password": "other-password", "role": "viewer"},
    )
    assert error_of(duplicate, 409)["code"] == "CONFLICT"
    bad_role = hub.request(
        "POST", "/api/users", json={"username": "carl", "password": "carl-password", "role": "root"}
    )
    error_of(bad_role, (400, 422))
    missing = hub.request("POST", "/api/users", json={"username": "dora"})
    error_of(missing, (400, 422))

    users = ok(hub.request("GET", "/api/users"))["users"]
    roles = {u["username"]: u["role"] for u in users}
    assert roles == {"admin": "admin", "alice": "operator", "bob": "viewer"}
    assert not any("password" in key for u in users for key in u)

    alice = hub.login("alice", "alice-password")
    assert error_of(hub.request("GET", "/api/users", alice), 403)["code"] == "FORBIDDEN"
    forbidden = hub.request(
        "POST", "/api/users", alice, json={"username": "eve", "password": "eve-password"}
    )
    assert error_of(forbidden, 403)["code"] == "FORBIDDEN"
    assert error_of(hub.request("GET", "/api/users", ""), 401)["code"] == "AUTHENTICATION_FAILED"


# --- devices -------------------------------------------------------------------------------------


def test_device_create_list_get_and_delete(hub: HubProcess) -> None:
    hub.create_user("alice")
    created = ok(
        hub.request(
            "POST",
            "/api/devices",
            json={
                "device_id": "ems_001",
                "name": "Pump",
                "owner": "alice",
                "metadata": {"site": 3},
            },
        ),
        201,
    )
    assert created["device_id"] == "ems_001"
    assert isinstance(created["token"], str)
    assert len(created["token"]) >= 32
    duplicate = hub.request("POST", "/api/devices", json={"device_id": "ems_001"})
    assert error_of(duplicate, 409)["code"] == "CONFLICT"
    ok(hub.request("POST", "/api/devices", json={"device_id": "A.b-9_z"}), 201)

    device = ok(hub.request("GET", "/api/devices/ems_001"))
    assert device["device_id"] == "ems_001"
    assert device["owner"] == "alice"
    assert device["name"] == "Pump"
    assert device["metadata"] == {"site": 3}
    assert device["online"] is False
    assert device["last_seen"] is None
    assert device["firmware"] is None
    assert "token" not in orjson.dumps(device).decode()
    listed = ok(hub.request("GET", "/api/devices"))["devices"]
    assert sorted(d["device_id"] for d in listed) == ["A.b-9_z", "ems_001"]
    for d in listed:
        assert "token" not in d
        assert "token_hash" not in d
        assert {"online", "last_seen", "firmware"} <= set(d)

    assert hub.request("DELETE", "/api/devices/ems_001").status_code == 204
    assert error_of(hub.request("GET", "/api/devices/ems_001"), 404)["code"] in (
        "DEVICE_NOT_FOUND",
        "NOT_FOUND",
    )
    error_of(hub.request("DELETE", "/api/devices/ems_001"), 404)
    error_of(hub.request("GET", "/api/devices/ems_001/telemetry"), 404)
    assert [d["device_id"] for d in ok(hub.request("GET", "/api/devices"))["devices"]] == [
        "A.b-9_z"
    ]


def test_invalid_device_fields_are_422(hub: HubProcess) -> None:
    for body in (
        {"device_id": "has space"},
        {"device_id": "x" * 65},
        {"device_id": ""},
        {"device_id": "slash/id"},
        {"device_id": 42},
        {"device_id": "ok-id", "metadata": "not an object"},
    ):
        response = hub.request("POST", "/api/devices", json=body)
        assert error_of(response, 422)["code"] == "INVALID_MESSAGE_FORMAT", body
    assert ok(hub.request("GET", "/api/devices")) == {"devices": []}


def test_roles_and_ownership_on_devices(hub: HubProcess) -> None:
    alice = hub.create_user("alice", "viewer")
    bob = hub.create_user("bob", "operator")
    hub.create_device("dev-a", owner="alice")
    device_token = hub.create_device("dev-b", owner="bob")
    hub.create_device("dev-none")

    for token in (alice, bob):
        response = hub.request("POST", "/api/devices", token, json={"device_id": "mine"})
        assert error_of(response, 403)["code"] == "FORBIDDEN"
        error_of(hub.request("DELETE", "/api/devices/dev-a", token), 403)
        error_of(hub.request("POST", "/api/devices/dev-a/token", token), 403)
    for token in ("", device_token, "emsu_made-up"):
        response = hub.request("GET", "/api/devices", token)
        assert error_of(response, 401)["code"] == "AUTHENTICATION_FAILED"
        error_of(hub.request("POST", "/api/devices", token, json={"device_id": "x"}), 401)

    assert [d["device_id"] for d in ok(hub.request("GET", "/api/devices", alice))["devices"]] == [
        "dev-a"
    ]
    assert [d["device_id"] for d in ok(hub.request("GET", "/api/devices", bob))["devices"]] == [
        "dev-b"
    ]
    ok(hub.request("GET", "/api/devices/dev-a", alice))
    # Someone else's device and a missing one look the same: existence is not disclosed.
    for path in ("dev-b", "dev-none", "does-not-exist"):
        for suffix in ("", "/telemetry", "/latest"):
            error = error_of(hub.request("GET", f"/api/devices/{path}{suffix}", alice), 404)
            assert error["code"] in ("DEVICE_NOT_FOUND", "NOT_FOUND")
    others = hub.request("GET", "/api/devices/dev-b", alice).json()
    missing = hub.request("GET", "/api/devices/does-not-exist", alice).json()
    assert others["error"]["code"] == missing["error"]["code"]
    assert ok(hub.request("GET", "/api/devices/dev-b", bob))["owner"] == "bob"
    assert len(ok(hub.request("GET", "/api/devices"))["devices"]) == 3


async def test_device_shows_online_last_seen_and_firmware(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    admin = await call(hub.admin_token)
    async with dashboard_ws(hub, admin) as dashboard:
        await send_json(dashboard, {"type": "subscribe", "devices": ["dev-1"]})
        await receive_until(dashboard, "subscribed")
        async with device_ws(hub, "dev-1", token) as ws:
            await hello(ws, firmware="1.4.2", config_version=3)
            await receive_until(dashboard, "device_status")
            online = ok(await call(hub.request, "GET", "/api/devices/dev-1"))
            assert online["online"] is True
            assert online["firmware"] == "1.4.2"
            assert isinstance(online["last_seen"], int | float)
            assert online["last_seen"] > 1.7e12
            [listed] = ok(await call(hub.request, "GET", "/api/devices"))["devices"]
            assert listed["online"] is True
            assert listed["firmware"] == "1.4.2"
        offline_status = await receive_until(dashboard, "device_status")
        assert offline_status["online"] is False
    offline = ok(await call(hub.request, "GET", "/api/devices/dev-1"))
    assert offline["online"] is False
    assert offline["firmware"] == "1.4.2"
    assert offline["last_seen"] >= online["last_seen"]


async def _read_forever(ws: Any) -> None:
    while True:
        await ws.get_message()


async def closed_code(ws: Any) -> int:
    """The close code of a link the hub closes (what arrives before it is skipped)."""
    with trio.fail_after(HANG_GUARD_S), pytest.raises(ConnectionClosed) as closed:
        await _read_forever(ws)
    return closed.value.reason.code  # type: ignore[no-any-return]


async def test_token_rotation_revokes_the_old_token(hub: HubProcess) -> None:
    old_token = await call(hub.create_device, "dev-1")
    async with device_ws(hub, "dev-1", old_token) as ws:
        await hello(ws)
        rotated = ok(await call(hub.request, "POST", "/api/devices/dev-1/token"))
        assert set(rotated) == {"device_id", "token"}
        assert rotated["device_id"] == "dev-1"
        assert rotated["token"] != old_token
        assert await closed_code(ws) == 4003
    with pytest.raises(ConnectionRejected) as refused:
        async with device_ws(hub, "dev-1", old_token):
            pass
    assert refused.value.status_code == 403
    async with device_ws(hub, "dev-1", rotated["token"]) as ws:
        assert (await hello(ws))["type"] == "welcome"
    missing = await call(hub.request, "POST", "/api/devices/nope/token")
    error_of(missing, 404)


async def test_deleting_a_device_closes_its_link(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    async with device_ws(hub, "dev-1", token) as ws:
        await hello(ws)
        assert (await call(hub.request, "DELETE", "/api/devices/dev-1")).status_code == 204
        assert await closed_code(ws) == 4003
    with pytest.raises(ConnectionRejected) as refused:
        async with device_ws(hub, "dev-1", token):
            pass
    assert refused.value.status_code == 403


async def test_a_user_token_never_opens_a_device_link(hub: HubProcess) -> None:
    await call(hub.create_device, "dev-1")
    admin = await call(hub.admin_token)
    with pytest.raises(ConnectionRejected) as refused:
        async with device_ws(hub, "dev-1", admin):
            pass
    assert refused.value.status_code == 403


# --- telemetry -----------------------------------------------------------------------------------


async def send_telemetry(ws: Any, seq: int, samples: list[dict[str, Any]]) -> None:
    await send_json(ws, {"type": "telemetry", "seq": seq, "samples": samples})
    with trio.fail_after(HANG_GUARD_S):
        while True:
            message = orjson.loads(await ws.get_message())
            if message["type"] == "ack" and message["seq"] >= seq:
                return


async def test_telemetry_ranges_limits_and_latest(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    latest = await call(hub.request, "GET", "/api/devices/dev-1/latest")
    assert error_of(latest, 404)["code"] in ("NOT_FOUND", "DEVICE_NOT_FOUND")
    assert ok(await call(hub.request, "GET", "/api/devices/dev-1/telemetry")) == {"samples": []}
    async with device_ws(hub, "dev-1", token) as ws:
        await hello(ws)
        # 11,000 samples, ts 0..10999, in eleven messages of 1000 (seq 1..11).
        for seq in range(1, 12):
            base = (seq - 1) * 1000
            await send_telemetry(
                ws, seq, [{"ts": base + i, "data": {"n": base + i}} for i in range(1000)]
            )

    async def samples(query: str) -> list[dict[str, Any]]:
        response = await call(hub.request, "GET", f"/api/devices/dev-1/telemetry{query}")
        return ok(response)["samples"]  # type: ignore[no-any-return]

    default = await samples("")
    assert [s["ts"] for s in default] == list(range(10_000, 11_000))
    assert default[0] == {"seq": 11, "ts": 10_000, "data": {"n": 10_000}}
    capped = await samples("?limit=50000")
    assert [s["ts"] for s in capped] == list(range(1_000, 11_000))
    assert [s["ts"] for s in await samples("?since=100&until=110")] == list(range(100, 111))
    assert [s["ts"] for s in await samples("?since=100&until=110&limit=3")] == [108, 109, 110]
    assert [s["ts"] for s in await samples("?until=2&limit=10")] == [0, 1, 2]
    assert [s["ts"] for s in await samples("?since=10998")] == [10_998, 10_999]
    assert [s["ts"] for s in await samples("?since=5000&until=5000")] == [5000]
    assert await samples("?since=20000") == []
    assert (await samples("?since=1999&until=2000"))[1]["seq"] == 3
    for bad in ("?limit=abc", "?since=yesterday", "?limit=0"):
        response = await call(hub.request, "GET", f"/api/devices/dev-1/telemetry{bad}")
        error_of(response, (400, 422))

    latest = ok(await call(hub.request, "GET", "/api/devices/dev-1/latest"))
    assert latest == {"device_id": "dev-1", "seq": 11, "ts": 10_999, "data": {"n": 10_999}}


# --- alerts and rules ----------------------------------------------------------------------------


async def test_alerts_are_stored_and_filtered(hub: HubProcess) -> None:
    alice = await call(hub.create_user, "alice")
    token_a = await call(hub.create_device, "dev-a", owner="alice")
    token_b = await call(hub.create_device, "dev-b")
    async with device_ws(hub, "dev-a", token_a) as ws:
        await hello(ws)
        await send_telemetry(ws, 1, [{"ts": 1000, "data": {"batteryVoltage": 11.0}}])
    async with device_ws(hub, "dev-b", token_b) as ws:
        await hello(ws)
        await send_telemetry(ws, 1, [{"ts": 2000, "data": {"engineRpm": 5000}}])
        await send_telemetry(ws, 2, [{"ts": 3000, "data": {"crashDetection": 1, "dtc": 0}}])

    async def alerts(query: str = "", token: str | None = None) -> list[dict[str, Any]]:
        response = await call(hub.request, "GET", f"/api/alerts{query}", token)
        return ok(response)["alerts"]  # type: ignore[no-any-return]

    every = await alerts()
    assert [(a["device_id"], a["ts"], a["code"], a["level"]) for a in every] == [
        ("dev-a", 1000, "LOW_BATTERY", "warning"),
        ("dev-b", 2000, "HIGH_RPM", "warning"),
        ("dev-b", 3000, "CRASH_DETECTED", "critical"),
    ]
    for alert in every:
        assert set(alert) >= {"id", "device_id", "ts", "level", "code", "message"}
        assert isinstance(alert["message"], str)
        assert alert["message"]
    assert len({a["id"] for a in every}) == 3
    assert [a["code"] for a in await alerts("?device_id=dev-b")] == ["HIGH_RPM", "CRASH_DETECTED"]
    assert [a["code"] for a in await alerts("?since=2000")] == ["HIGH_RPM", "CRASH_DETECTED"]
    assert [a["code"] for a in await alerts("?since=2001")] == ["CRASH_DETECTED"]
    assert [a["code"] for a in await alerts("?device_id=dev-b&since=2500")] == ["CRASH_DETECTED"]
    # A viewer sees the alerts of their own devices only.
    assert [a["device_id"] for a in await alerts(token=alice)] == ["dev-a"]
    assert [a["device_id"] for a in await alerts("?device_id=dev-a", alice)] == ["dev-a"]
    response = await call(hub.request, "GET", "/api/alerts?device_id=dev-b", alice)
    error_of(response, 404)


def test_alert_rules_defaults_and_validation(hub: HubProcess) -> None:
    viewer = hub.create_user("alice")
    rules = ok(hub.request("GET", "/api/alert-rules", viewer))["rules"]
    assert {(r["code"], r["metric"], r["op"], r["threshold"], r["level"]) for r in rules} == (
        DEFAULT_RULES
    )
    for rule in rules:
        assert set(rule) == {"code", "metric", "op", "threshold", "level", "message"}
    good = {
        "code": "HOT",
        "metric": "temperature",
        "op": ">",
        "threshold": 80,
        "level": "critical",
        "message": "Too hot",
    }
    forbidden = hub.request("PUT", "/api/alert-rules", viewer, json={"rules": [good]})
    assert error_of(forbidden, 403)["code"] == "FORBIDDEN"
    for rule, place in (
        ({**good, "op": "~"}, "rules[0].op"),
        ({**good, "threshold": "eighty"}, "rules[0].threshold"),
        ({**good, "level": "panic"}, "rules[0].level"),
        ({**good, "metric": "9lives"}, "rules[0].metric"),
        ({k: v for k, v in good.items() if k != "code"}, "rules[0].code"),
    ):
        response = hub.request("PUT", "/api/alert-rules", json={"rules": [rule]})
        error = error_of(response, 422)
        assert place in error["message"], (place, error)
    response = hub.request(
        "PUT", "/api/alert-rules", json={"rules": [good, {**good, "metric": "soc"}]}
    )
    assert "rules[1].code" in error_of(response, 422)["message"]
    error_of(hub.request("PUT", "/api/alert-rules", json={"rules": "all of them"}), 422)
    # Nothing invalid was kept.
    assert len(ok(hub.request("GET", "/api/alert-rules"))["rules"]) == 4


async def test_new_alert_rules_take_effect_and_persist(hub: HubProcess) -> None:
    token = await call(hub.create_device, "dev-1")
    rule = {
        "code": "HIGH_VOLTAGE",
        "metric": "voltage",
        "op": ">=",
        "threshold": 250,
        "level": "critical",
        "message": "Voltage at or above 250 V",
    }
    response = await call(hub.request, "PUT", "/api/alert-rules", json={"rules": [rule]})
    assert ok(response)["rules"] == [{**rule, "threshold": 250.0}]
    admin = await call(hub.admin_token)
    async with dashboard_ws(hub, admin) as dashboard:
        await send_json(dashboard, {"type": "subscribe", "devices": ["dev-1"]})
        await receive_until(dashboard, "subscribed")
        async with device_ws(hub, "dev-1", token) as ws:
            await hello(ws)
            # The old LOW_BATTERY rule is gone; the new rule fires.
            await send_telemetry(ws, 1, [{"ts": 1, "data": {"batteryVoltage": 5.0}}])
            await send_telemetry(ws, 2, [{"ts": 2, "data": {"voltage": 250}}])
            alert = await receive_until(dashboard, "alert")
    assert alert["device_id"] == "dev-1"
    assert alert["ts"] == 2
    assert alert["alert"] == {
        "level": "critical",
        "code": "HIGH_VOLTAGE",
        "message": "Voltage at or above 250 V",
    }
    stored = ok(await call(hub.request, "GET", "/api/alerts"))["alerts"]
    assert [(a["code"], a["ts"]) for a in stored] == [("HIGH_VOLTAGE", 2)]
    await call(hub.restart)
    rules = ok(await call(hub.request, "GET", "/api/alert-rules"))["rules"]
    assert [r["code"] for r in rules] == ["HIGH_VOLTAGE"]


# --- realtime ------------------------------------------------------------------------------------


async def test_realtime_views_of_connections(hub: HubProcess) -> None:
    alice = await call(hub.create_user, "alice")
    token = await call(hub.create_device, "dev-1", owner="alice")
    for path in ("connections", "devices", "users", "status"):
        response = await call(hub.request, "GET", f"/api/realtime/{path}", alice)
        assert error_of(response, 403)["code"] == "FORBIDDEN"
    async with dashboard_ws(hub, alice) as dashboard:
        await send_json(dashboard, {"type": "subscribe", "devices": ["*"]})
        await receive_until(dashboard, "subscribed")
        async with device_ws(hub, "dev-1", token) as ws:
            welcome = await hello(ws)
            connections = ok(await call(hub.request, "GET", "/api/realtime/connections"))
            [dev] = connections["devices"]
            assert {k: dev[k] for k in ("device_id", "session_id", "owner")} == {
                "device_id": "dev-1",
                "session_id": welcome["session_id"],
                "owner": "alice",
            }
            assert isinstance(dev["connected_at"], int | float)
            assert isinstance(dev["last_seen"], int | float)
            assert [u["username"] for u in connections["users"]] == ["alice"]
            assert connections["total_connections"] == 2
            devices = ok(await call(hub.request, "GET", "/api/realtime/devices"))
            assert [d["device_id"] for d in devices["devices"]] == ["dev-1"]
            users = ok(await call(hub.request, "GET", "/api/realtime/users"))
            assert [u["username"] for u in users["users"]] == ["alice"]
            status = ok(await call(hub.request, "GET", "/api/realtime/status"))
            assert status["connected_devices"] == 1
            assert status["connected_dashboards"] == 1
            health = ok(await call(httpx.get, f"{hub.http}/health"))
            assert (health["connected_devices"], health["connected_dashboards"]) == (1, 1)


def test_realtime_notifications_are_for_admins_and_validated(hub: HubProcess) -> None:
    viewer = hub.create_user("alice")
    body = {"event": "maintenance", "data": {"at": 1}}
    for path in ("/api/realtime/broadcast", "/api/realtime/user/alice"):
        assert hub.request("POST", path, json=body).status_code in (200, 202)
        assert error_of(hub.request("POST", path, viewer, json=body), 403)["code"] == "FORBIDDEN"
        error_of(hub.request("POST", path, "", json=body), 401)
        error_of(hub.request("POST", path, json={"data": 1}), (400, 422))
        error_of(hub.request("POST", path, json={"event": 5}), (400, 422))
        error_of(hub.request("POST", path, content=b"{oops"), 400)


# --- bodies and error shapes ---------------------------------------------------------------------


def test_non_json_bodies_are_400(hub: HubProcess) -> None:
    for content in (b"not json", b"{", b"\xff\xfe"):
        response = hub.request(
            "POST", "/api/devices", content=content, headers={"content-type": "application/json"}
        )
        assert error_of(response, 400)["code"] == "INVALID_MESSAGE_FORMAT"
    for body in ([1, 2], "a string", 7):
        response = hub.request("POST", "/api/devices", json=body)
        assert error_of(response, 400)["code"] == "INVALID_MESSAGE_FORMAT"
    response = httpx.post(f"{hub.http}/api/auth/login", content=b"username=admin")
    assert error_of(response, 400)["code"] == "INVALID_MESSAGE_FORMAT"


def test_bodies_over_the_limit_are_413_and_the_connection_stays_usable(
    hub_factory: Any, client: httpx.Client
) -> None:
    hub: HubProcess = hub_factory(EMS_MAX_BODY_BYTES="4096")
    viewer = hub.create_user("alice")
    admin = {"Authorization": f"Bearer {hub.admin_token()}"}
    big = {"device_id": "big", "metadata": {"blob": "z" * 5000}}
    response = client.post(f"{hub.http}/api/devices", json=big, headers=admin)
    assert error_of(response, 413)["code"] == "MESSAGE_TOO_LARGE"
    # The same kept-alive connection answers the next request.
    assert client.get(f"{hub.http}/api/devices", headers=admin).status_code == 200

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size shows while reading
        yield b'{"device_id": "big", "metadata": {"blob": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}}'

    response = client.post(f"{hub.http}/api/devices", content=chunks(), headers=admin)
    assert error_of(response, 413)["code"] == "MESSAGE_TOO_LARGE"
    assert client.get(f"{hub.http}/api/devices", headers=admin).status_code == 200
    response = client.post(
        f"{hub.http}/api/auth/login", json={"username": "a" * 5000, "password": "x"}
    )
    error_of(response, 413)
    # A refused caller's large body is read too, so the connection goes on.
    response = client.post(
        f"{hub.http}/api/devices", json=big, headers={"Authorization": f"Bearer {viewer}"}
    )
    error_of(response, (403, 413))
    assert client.get(f"{hub.http}/api/devices", headers=admin).status_code == 200
    # Just under the limit is fine.
    small = {"device_id": "small", "metadata": {"blob": "z" * 3000}}
    ok(client.post(f"{hub.http}/api/devices", json=small, headers=admin), 201)


def test_early_answers_read_the_body_first(hub: HubProcess) -> None:
    """Refusals that come before the handler reads the body (no login, no route, wrong method)
    still answer, and the kept-alive connection goes on: the body is read first."""
    body = b'{"device_id": "x", "metadata": {"blob": "' + b"z" * 900_000 + b'"}}'
    admin = {"Authorization": f"Bearer {hub.admin_token()}"}
    with httpx.Client(timeout=HANG_GUARD_S) as client:
        for method, path, headers, status in (
            ("POST", "/api/devices", {}, 401),
            ("POST", "/api/realtime/broadcast", {}, 401),
            ("PUT", "/api/alert-rules", {"Authorization": "Bearer emsu_nope"}, 401),
            ("POST", "/api/no-such-route", admin, 404),
            ("PUT", "/api/devices", admin, 405),
        ):
            response = client.request(method, f"{hub.http}{path}", content=body, headers=headers)
            assert response.status_code == status, (method, path, response.text)
            assert response.json()["error"]["message"]
            assert client.get(f"{hub.http}/health").status_code == 200


def test_unknown_routes_answer_the_error_shape(hub: HubProcess) -> None:
    assert error_of(hub.request("GET", "/api/no-such-thing"), 404)["code"] == "NOT_FOUND"
    assert error_of(httpx.get(f"{hub.http}/nowhere"), 404)["code"] == "NOT_FOUND"
