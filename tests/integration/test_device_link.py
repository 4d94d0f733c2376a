"""The device link (protocol.md §1) against the real hub, line by line of the contract.

The hub runs as a `hypercorn -k trio` subprocess and is spoken to with trio-websocket, as an
outside device would. Tests that need no special settings share one hub per module (each on
devices of its own); the others start theirs through `hub_factory` with the settings they need.
Nothing here sleeps: every wait is for a message, a close, or a REST answer, under a hang guard.
"""

from __future__ import annotations

import itertools
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from tests.integration.conftest import (
    HANG_GUARD_S,
    HubProcess,
    call,
    dashboard_ws,
    device_ws,
    hello,
    hub_env,
    receive_json,
    receive_until,
    send_json,
)

Message = dict[str, Any]

_ids = itertools.count(1)


@pytest.fixture(scope="module")
def shared_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    """One hub with default settings for the tests that need nothing else (hub start-up is
    most of an integration test's time); each test works on devices of its own."""
    data_dir: Path = tmp_path_factory.mktemp("shared-hub")
    hub = HubProcess(data_dir=data_dir, env=hub_env(data_dir))
    hub.start()
    yield hub
    hub.stop(signal.SIGKILL)


# --- helpers ------------------------------------------------------------------------------------


async def new_device(hub: HubProcess) -> tuple[str, str]:
    """A freshly created device: (device_id, token)."""
    device_id = f"dev-{next(_ids)}"
    return device_id, await call(hub.create_device, device_id)


def sample(ts: float, **data: Any) -> Message:
    return {"ts": ts, "data": data}


def telemetry(seq: int, *samples: Message) -> Message:
    return {"type": "telemetry", "seq": seq, "samples": list(samples or [sample(seq, voltage=1)])}


def heartbeat() -> Message:
    return {"type": "heartbeat", "ts": time.time() * 1000}


async def handshake_status(
    hub: HubProcess, device_id: str, token: str | None, *, query: str = "", scheme: str = "Bearer"
) -> int:
    """The HTTP status the hub answers a device-link upgrade with (101 when the link opens)."""
    headers = [("Authorization", f"{scheme} {token}")] if token else []
    url = f"{hub.ws}/ws/device/{device_id}{query}"
    try:
        with trio.fail_after(HANG_GUARD_S):
            async with open_websocket_url(url, extra_headers=headers):
                return 101
    except ConnectionRejected as exc:
        return exc.status_code


async def collect_until(ws: WebSocketConnection, done: Callable[[Message], bool]) -> list[Message]:
    """Every message up to and including the first one `done` accepts."""
    seen: list[Message] = []
    with trio.fail_after(HANG_GUARD_S):
        while True:
            seen.append(orjson.loads(await ws.get_message()))
            if done(seen[-1]):
                return seen


async def until_ack(ws: WebSocketConnection, seq: int) -> list[Message]:
    """Every message up to the `ack` that covers `seq` (acks are cumulative)."""
    return await collect_until(ws, lambda msg: msg["type"] == "ack" and msg["seq"] >= seq)


async def until_closed(ws: WebSocketConnection) -> tuple[int, list[Message]]:
    """Read until the hub closes the link: its close code, and every message before it."""
    seen: list[Message] = []
    with trio.fail_after(HANG_GUARD_S):
        try:
            while True:
                seen.append(orjson.loads(await ws.get_message()))
        except ConnectionClosed as exc:
            return exc.reason.code, seen


def of_type(messages: list[Message], kind: str) -> list[Message]:
    return [msg for msg in messages if msg["type"] == kind]


async def stored(hub: HubProcess, device_id: str) -> list[Message]:
    response = await call(hub.request, "GET", f"/api/devices/{device_id}/telemetry")
    assert response.status_code == 200, response.text
    return response.json()["samples"]  # type: ignore[no-any-return]


async def subscribe(dashboard: WebSocketConnection, device_id: str) -> None:
    await send_json(dashboard, {"type": "subscribe", "devices": [device_id]})
    await receive_until(dashboard, "subscribed")


async def dashboard_until(
    dashboard: WebSocketConnection, done: Callable[[Message], bool]
) -> list[Message]:
    """Dashboard updates (batches unpacked) up to and including the first one `done` accepts."""
    seen: list[Message] = []
    with trio.fail_after(HANG_GUARD_S):
        while True:
            frame = orjson.loads(await dashboard.get_message())
            for item in frame["messages"] if frame["type"] == "batch" else [frame]:
                seen.append(item)
                if done(item):
                    return seen


def is_status(device_id: str, online: bool) -> Callable[[Message], bool]:
    return lambda msg: (
        msg["type"] == "device_status" and msg["device_id"] == device_id and msg["online"] is online
    )


# --- handshake ------------------------------------------------------------------------------------


async def test_valid_token_opens_the_link(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    assert await handshake_status(shared_hub, device_id, token) == 101
    # A query string without a credential in it is no reason to refuse.
    assert await handshake_status(shared_hub, device_id, token, query="?lang=en") == 101


async def test_no_token_is_403(shared_hub: HubProcess) -> None:
    device_id, _ = await new_device(shared_hub)
    assert await handshake_status(shared_hub, device_id, None) == 403


async def test_wrong_token_is_403(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    assert await handshake_status(shared_hub, device_id, token[:-2] + "xx") == 403
    assert await handshake_status(shared_hub, device_id, "not-a-token") == 403
    # The device's token under another scheme is not a bearer token.
    assert await handshake_status(shared_hub, device_id, token, scheme="Basic") == 403


async def test_another_devices_token_is_403(shared_hub: HubProcess) -> None:
    device_id, _ = await new_device(shared_hub)
    _, other_token = await new_device(shared_hub)
    assert await handshake_status(shared_hub, device_id, other_token) == 403


async def test_user_token_is_403(shared_hub: HubProcess) -> None:
    device_id, _ = await new_device(shared_hub)
    user_token = await call(shared_hub.create_user, f"user-{next(_ids)}", "operator")
    assert await handshake_status(shared_hub, device_id, user_token) == 403
    admin_token = await call(shared_hub.admin_token)
    assert await handshake_status(shared_hub, device_id, admin_token) == 403


async def test_revoked_token_is_403(shared_hub: HubProcess) -> None:
    device_id, old_token = await new_device(shared_hub)
    response = await call(shared_hub.request, "POST", f"/api/devices/{device_id}/token")
    assert response.status_code == 200, response.text
    new_token = response.json()["token"]
    assert await handshake_status(shared_hub, device_id, old_token) == 403
    assert await handshake_status(shared_hub, device_id, new_token) == 101


async def test_deleted_device_is_403(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    response = await call(shared_hub.request, "DELETE", f"/api/devices/{device_id}")
    assert response.status_code == 204, response.text
    assert await handshake_status(shared_hub, device_id, token) == 403


async def test_unknown_device_is_403(shared_hub: HubProcess) -> None:
    _, token = await new_device(shared_hub)
    assert await handshake_status(shared_hub, "no-such-device", token) == 403


@pytest.mark.parametrize("name", ["token", "access_token", "auth", "key"])
async def test_credential_in_query_is_400_and_not_logged(shared_hub: HubProcess, name: str) -> None:
    device_id, token = await new_device(shared_hub)
    # Refused even with a valid header: the query is checked before anything else...
    assert await handshake_status(shared_hub, device_id, token, query=f"?{name}={token}") == 400
    # ...so also without one, on a device that does not exist, among other parameters.
    decoy = f"secret-{next(_ids)}-value"
    query = f"?lang=en&{name}={decoy}"
    assert await handshake_status(shared_hub, "no-such-device", None, query=query) == 400
    log = shared_hub.log()
    assert token not in log
    assert decoy not in log


# --- session start ------------------------------------------------------------------------------


async def test_welcome_answers_hello(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        welcome = await hello(ws, stream="9f2c0d6e", firmware="1.4.2", config_version=0)
    assert welcome["type"] == "welcome"
    assert isinstance(welcome["session_id"], str)
    assert welcome["session_id"]
    assert welcome["stream"] == "9f2c0d6e"
    assert welcome["acked_seq"] == 0
    assert isinstance(welcome["config_version"], int)
    assert welcome["heartbeat_s"] == 20
    # epoch milliseconds, not seconds
    assert abs(welcome["server_time"] - time.time() * 1000) < 60_000


async def test_welcome_reports_what_the_stream_has_stored(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws, stream="stream-a")
        for seq in (1, 2, 3):
            await send_json(ws, telemetry(seq))
        await until_ack(ws, 3)
    async with device_ws(shared_hub, device_id, token) as ws:
        first = await hello(ws, stream="stream-a")
    async with device_ws(shared_hub, device_id, token) as ws:
        other = await hello(ws, stream="stream-b")
    assert first["acked_seq"] == 3
    assert other["acked_seq"] == 0
    assert first["session_id"] != other["session_id"]


async def test_no_hello_in_time_closes_4001(hub_factory: Any) -> None:
    hub = await call(hub_factory, EMS_HELLO_TIMEOUT_S="0.5")
    device_id, token = await new_device(hub)
    async with device_ws(hub, device_id, token) as ws:
        code, messages = await until_closed(ws)
    assert code == 4001
    assert of_type(messages, "welcome") == []


@pytest.mark.parametrize(
    "first",
    [telemetry(1), heartbeat(), {"type": "ack", "seq": 1}, {"type": "hello", "stream": 7}],
    ids=["telemetry", "heartbeat", "unknown-on-this-link", "invalid-hello"],
)
async def test_message_before_hello_closes_4001(shared_hub: HubProcess, first: Message) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await send_json(ws, first)
        code, messages = await until_closed(ws)
    assert code == 4001
    assert of_type(messages, "welcome") == []
    assert of_type(messages, "ack") == []
    assert await stored(shared_hub, device_id) == []


async def test_second_hello_closes_4001(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        await send_json(ws, {"type": "hello", "stream": "other", "agent": "tests/1"})
        code, messages = await until_closed(ws)
    assert code == 4001
    assert of_type(messages, "welcome") == []


# --- reliable messages and acks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        {"type": "event", "ts": 1000, "level": "warning", "code": "DOOR", "message": "open"},
        {"type": "command_result", "id": "cmd-unknown", "status": "received"},
        {"type": "config_applied", "version": 1, "status": "applied"},
        {"type": "history", "request_id": None, "samples": [sample(1000, soc=50)], "final": True},
    ],
    ids=["event", "command_result", "config_applied", "history"],
)
async def test_every_reliable_type_is_acked(shared_hub: HubProcess, message: Message) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws, stream="s")
        await send_json(ws, {**message, "seq": 1})
        assert await receive_json(ws) == {"type": "ack", "seq": 1}
    async with device_ws(shared_hub, device_id, token) as ws:
        assert (await hello(ws, stream="s"))["acked_seq"] == 1


async def test_ack_comes_once_the_message_is_stored(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        await send_json(
            ws, telemetry(57, sample(1763800000123, voltage=230.1, current=4.2, soc=87))
        )
        assert await receive_until(ws, "ack") == {"type": "ack", "seq": 57}
        # Read only now, and while the link is still open: the ack promised it is stored.
        assert await stored(shared_hub, device_id) == [
            {"seq": 57, "ts": 1763800000123, "data": {"voltage": 230.1, "current": 4.2, "soc": 87}}
        ]


async def test_acks_are_cumulative(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    count = 200
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        for seq in range(1, count + 1):
            await send_json(ws, telemetry(seq))
        acks = [msg["seq"] for msg in await until_ack(ws, count) if msg["type"] == "ack"]
    # Each ack names a seq that was sent and covers every one before it; the last covers all.
    assert acks == sorted(set(acks))
    assert set(acks) <= set(range(1, count + 1))
    assert acks[-1] == count
    assert [s["seq"] for s in await stored(shared_hub, device_id)] == list(range(1, count + 1))


async def test_duplicates_are_reacked_not_stored_or_broadcast_twice(
    shared_hub: HubProcess,
) -> None:
    device_id, token = await new_device(shared_hub)
    admin = await call(shared_hub.admin_token)
    async with dashboard_ws(shared_hub, admin) as dashboard:
        await subscribe(dashboard, device_id)
        async with device_ws(shared_hub, device_id, token) as ws:
            await hello(ws)
            await send_json(ws, telemetry(1, sample(1000, voltage=1)))
            await send_json(ws, telemetry(2, sample(2000, voltage=2)))
            await until_ack(ws, 2)
            # The same seqs again, with other content: acknowledged again, nothing else.
            await send_json(ws, telemetry(1, sample(1500, voltage=99)))
            assert await receive_json(ws) == {"type": "ack", "seq": 2}
            await send_json(ws, telemetry(2, sample(2500, voltage=99)))
            assert await receive_json(ws) == {"type": "ack", "seq": 2}
            await send_json(ws, telemetry(3, sample(3000, voltage=3)))
            assert await receive_json(ws) == {"type": "ack", "seq": 3}
        # And after a reconnect on the same stream.
        async with device_ws(shared_hub, device_id, token) as ws:
            assert (await hello(ws))["acked_seq"] == 3
            await send_json(ws, telemetry(3, sample(3500, voltage=99)))
            assert await receive_json(ws) == {"type": "ack", "seq": 3}
            await send_json(ws, telemetry(4, sample(4000, voltage=4)))
            assert await receive_json(ws) == {"type": "ack", "seq": 4}
        updates = of_type(
            await dashboard_until(
                dashboard, lambda msg: msg["type"] == "telemetry_update" and msg["seq"] == 4
            ),
            "telemetry_update",
        )
    assert [(u["seq"], u["ts"]) for u in updates] == [(1, 1000), (2, 2000), (3, 3000), (4, 4000)]
    assert [(s["seq"], s["ts"]) for s in await stored(shared_hub, device_id)] == [
        (1, 1000),
        (2, 2000),
        (3, 3000),
        (4, 4000),
    ]


# --- invalid input ------------------------------------------------------------------------------

GOOD_SAMPLE = sample(1000, voltage=230)


@pytest.mark.parametrize(
    ("frame", "seq"),
    [
        ("{not json", None),
        ('[{"type":"telemetry","seq":1}]', None),
        ('"telemetry"', None),
        ('{"type":"no_such_type","ts":1}', None),
        ('{"samples":[{"ts":1,"data":{}}]}', None),
        ('{"type":"heartbeat","ts":"now"}', None),
        ('{"type":"telemetry","seq":"1","samples":[{"ts":1,"data":{"voltage":1}}]}', None),
        ('{"type":"telemetry","seq":1.5,"samples":[{"ts":1,"data":{"voltage":1}}]}', None),
        ('{"type":"telemetry","samples":[{"ts":1,"data":{"voltage":1}}]}', None),
        ('{"type":"telemetry","seq":1,"samples":[]}', 1),
        ('{"type":"telemetry","seq":1,"samples":{"ts":1}}', 1),
        ('{"type":"telemetry","seq":1,"samples":[1,2]}', 1),
        (orjson.dumps(telemetry(1, *[sample(i, voltage=1) for i in range(1001)])).decode(), 1),
        ('{"type":"event","seq":1,"ts":1,"level":"bad","code":"X","message":"m"}', 1),
    ],
    ids=[
        "bad-json",
        "json-array",
        "json-string",
        "unknown-type",
        "missing-type",
        "heartbeat-ts-string",
        "seq-string",
        "seq-float",
        "missing-seq",
        "zero-samples",
        "samples-not-a-list",
        "sample-not-an-object",
        "1001-samples",
        "event-bad-level",
    ],
)
async def test_invalid_message_gets_error_and_link_stays_open(
    shared_hub: HubProcess, frame: str, seq: int | None
) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        await ws.send_message(frame)
        error = await receive_json(ws)
        await send_json(ws, telemetry(100, GOOD_SAMPLE))
        after = await until_ack(ws, 100)
    assert error["type"] == "error"
    assert error["code"] == "INVALID_MESSAGE_FORMAT"
    assert isinstance(error["message"], str)
    assert error.get("seq") == seq
    assert of_type(after, "error") == []
    # Discarded whole: only the good message that followed is stored.
    assert await stored(shared_hub, device_id) == [{"seq": 100, **GOOD_SAMPLE}]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_number_rejects_that_sample_only(
    shared_hub: HubProcess, literal: str
) -> None:
    device_id, token = await new_device(shared_hub)
    frame = (
        '{"type":"telemetry","seq":7,"samples":['
        f'{{"ts":1000,"data":{{"voltage":230}}}},{{"ts":2000,"data":{{"voltage":{literal}}}}},'
        f'{{"ts":3000,"data":{{"custom":{literal}}}}},{{"ts":4000,"data":{{"voltage":231}}}}]}}'
    )
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        await ws.send_message(frame)
        messages = await until_ack(ws, 7)
    errors = of_type(messages, "error")
    assert len(errors) == 1
    assert errors[0]["code"] == "TELEMETRY_VALIDATION_FAILED"
    assert errors[0]["seq"] == 7
    assert "samples[1]" in errors[0]["message"]
    assert "samples[2]" in errors[0]["message"]
    assert messages[-1] == {"type": "ack", "seq": 7}
    assert await stored(shared_hub, device_id) == [
        {"seq": 7, "ts": 1000, "data": {"voltage": 230}},
        {"seq": 7, "ts": 4000, "data": {"voltage": 231}},
    ]


async def test_known_metric_of_wrong_type_rejects_that_sample_only(
    shared_hub: HubProcess,
) -> None:
    device_id, token = await new_device(shared_hub)
    admin = await call(shared_hub.admin_token)
    async with dashboard_ws(shared_hub, admin) as dashboard:
        await subscribe(dashboard, device_id)
        async with device_ws(shared_hub, device_id, token) as ws:
            await hello(ws)
            await send_json(
                ws, telemetry(5, sample(1000, voltage="high"), sample(2000, voltage=230.1))
            )
            messages = await until_ack(ws, 5)
            # Anything else the hub had to say about seq 5 comes before the next ack.
            await send_json(ws, telemetry(6, sample(3000, voltage=229.9)))
            messages += await until_ack(ws, 6)
        updates = await dashboard_until(
            dashboard, lambda msg: msg["type"] == "telemetry_update" and msg["seq"] == 6
        )
    errors = of_type(messages, "error")
    assert len(errors) == 1
    assert errors[0]["code"] == "TELEMETRY_VALIDATION_FAILED"
    assert errors[0]["seq"] == 5
    assert "samples[0].data.voltage" in errors[0]["message"]
    assert "samples[1]" not in errors[0]["message"]
    assert messages.index(errors[0]) < messages.index({"type": "ack", "seq": 5})
    assert [(u["seq"], u["ts"]) for u in of_type(updates, "telemetry_update")] == [
        (5, 2000),
        (6, 3000),
    ]
    assert await stored(shared_hub, device_id) == [
        {"seq": 5, "ts": 2000, "data": {"voltage": 230.1}},
        {"seq": 6, "ts": 3000, "data": {"voltage": 229.9}},
    ]


async def test_invalid_reliable_message_is_acked_as_rejected_in_order(
    shared_hub: HubProcess,
) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws, stream="s")
        await send_json(ws, telemetry(1, sample(1000, voltage=1)))
        await send_json(ws, {"type": "telemetry", "seq": 2, "samples": []})
        await send_json(ws, telemetry(3, sample(3000, voltage=3)))
        messages = await until_ack(ws, 3)
    errors = of_type(messages, "error")
    assert [(e["code"], e["seq"]) for e in errors] == [("INVALID_MESSAGE_FORMAT", 2)]
    acks = [msg["seq"] for msg in of_type(messages, "ack")]
    assert acks == sorted(set(acks))
    assert acks[-1] == 3
    # An ack that covers seq 2 comes after its error.
    assert all(
        messages.index(errors[0]) < messages.index(a)
        for a in of_type(messages, "ack")
        if a["seq"] >= 2
    )
    # Rejected for good: the stream's acked seq includes it, and a resend is only re-acked.
    async with device_ws(shared_hub, device_id, token) as ws:
        assert (await hello(ws, stream="s"))["acked_seq"] == 3
        await send_json(ws, telemetry(2, sample(2000, voltage=2)))
        assert await receive_json(ws) == {"type": "ack", "seq": 3}
    assert [(s["seq"], s["ts"]) for s in await stored(shared_hub, device_id)] == [
        (1, 1000),
        (3, 3000),
    ]


async def test_oversize_frame_closes_1009(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    limit = 1_048_576  # the default EMS_MAX_FRAME_BYTES

    def heartbeat_of(size: int) -> str:
        head = '{"type":"heartbeat","ts":1,"pad":"'
        return head + "x" * (size - len(head) - 2) + '"}'

    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        # A frame of exactly the limit is fine...
        await ws.send_message(heartbeat_of(limit))
        await send_json(ws, telemetry(1))
        assert of_type(await until_ack(ws, 1), "error") == []
        # ...one byte more is not.
        await ws.send_message(heartbeat_of(limit + 1))
        code, messages = await until_closed(ws)
    assert code == 1009
    assert [msg["code"] for msg in of_type(messages, "error")] == ["MESSAGE_TOO_LARGE"]


async def test_frame_limit_is_a_setting(hub_factory: Any) -> None:
    hub = await call(hub_factory, EMS_MAX_FRAME_BYTES="1000")
    device_id, token = await new_device(hub)
    async with device_ws(hub, device_id, token) as ws:
        await hello(ws)
        samples = [sample(i, voltage=i) for i in range(1, 100)]
        await send_json(ws, telemetry(1, *samples))
        code, messages = await until_closed(ws)
    assert code == 1009
    assert [msg["code"] for msg in of_type(messages, "error")] == ["MESSAGE_TOO_LARGE"]
    assert of_type(messages, "ack") == []
    assert await stored(hub, device_id) == []


# --- liveness -----------------------------------------------------------------------------------


async def test_silent_device_is_closed_4002_and_a_live_one_is_not(hub_factory: Any) -> None:
    hub = await call(hub_factory, EMS_HEARTBEAT_S="0.5")
    silent_id, silent_token = await new_device(hub)
    live_id, live_token = await new_device(hub)
    admin = await call(hub.admin_token)
    silent_closed = trio.Event()
    outcome: dict[str, Any] = {}

    async def silent() -> None:
        async with device_ws(hub, silent_id, silent_token) as ws:
            assert (await hello(ws))["heartbeat_s"] == 0.5
            outcome["silent"] = await until_closed(ws)
        silent_closed.set()

    async def live() -> None:
        async with device_ws(hub, live_id, live_token) as ws:
            await hello(ws)
            # Answer every hub heartbeat. Four of them span at least three intervals after the
            # first, past the point where a silent device is dropped.
            heartbeats = 0
            while heartbeats < 4 or not silent_closed.is_set():
                message = await receive_json(ws)
                assert message["type"] == "heartbeat"
                heartbeats += 1
                await send_json(ws, heartbeat())
            await send_json(ws, telemetry(1))
            assert await receive_until(ws, "ack") == {"type": "ack", "seq": 1}
            outcome["live"] = heartbeats

    async with dashboard_ws(hub, admin) as dashboard:
        await subscribe(dashboard, silent_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(silent)
            nursery.start_soon(live)
        await dashboard_until(dashboard, is_status(silent_id, False))

    code, messages = outcome["silent"]
    assert code == 4002
    beats = of_type(messages, "heartbeat")
    assert beats
    assert all(isinstance(beat["ts"], int | float) for beat in beats)
    assert outcome["live"] >= 4
    response = await call(hub.request, "GET", "/api/realtime/connections")
    assert silent_id not in [d["device_id"] for d in response.json()["devices"]]
    response = await call(hub.request, "GET", f"/api/devices/{silent_id}")
    assert response.json()["online"] is False


async def test_any_traffic_updates_last_seen(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)

    async def last_seen() -> float:
        response = await call(shared_hub.request, "GET", f"/api/devices/{device_id}")
        return response.json()["last_seen"]  # type: ignore[no-any-return]

    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        welcomed = await last_seen()
        await send_json(ws, heartbeat())
        await ws.send_message("{not json")  # answered: the heartbeat before it has been read
        assert (await receive_json(ws))["type"] == "error"
        assert await last_seen() > welcomed


# --- one device, one connection -----------------------------------------------------------------


@pytest.mark.parametrize("hello_first", [False, True], ids=["at-upgrade", "after-hello"])
async def test_second_connection_replaces_the_first_4000(
    shared_hub: HubProcess, hello_first: bool
) -> None:
    device_id, token = await new_device(shared_hub)
    admin = await call(shared_hub.admin_token)
    async with dashboard_ws(shared_hub, admin) as dashboard:
        await subscribe(dashboard, device_id)
        async with device_ws(shared_hub, device_id, token) as first:
            await hello(first)
            await dashboard_until(dashboard, is_status(device_id, True))
            await send_json(first, telemetry(1))
            await until_ack(first, 1)
            async with device_ws(shared_hub, device_id, token) as second:
                # The older link is closed once the newer one is accepted (101), whether or
                # not the newer one has said hello yet.
                welcome = await hello(second) if hello_first else None
                code, _ = await until_closed(first)
                assert code == 4000
                welcome = welcome or await hello(second)
                assert welcome["acked_seq"] == 1
                await send_json(second, telemetry(2))
                assert await receive_until(second, "ack") == {"type": "ack", "seq": 2}
        # The second link's end is the first time the device goes offline.
        seen = await dashboard_until(dashboard, is_status(device_id, False))
    statuses = [msg["online"] for msg in of_type(seen, "device_status")]
    assert statuses.count(False) == 1
    assert [u["seq"] for u in of_type(seen, "telemetry_update")] == [1, 2]
    assert seen.index(of_type(seen, "telemetry_update")[-1]) < len(seen) - 1


async def test_replacement_that_never_says_hello_leaves_the_device_offline(
    shared_hub: HubProcess,
) -> None:
    device_id, token = await new_device(shared_hub)
    admin = await call(shared_hub.admin_token)
    async with dashboard_ws(shared_hub, admin) as dashboard:
        await subscribe(dashboard, device_id)
        async with device_ws(shared_hub, device_id, token) as first:
            await hello(first)
            await dashboard_until(dashboard, is_status(device_id, True))
            async with device_ws(shared_hub, device_id, token) as second:
                assert (await until_closed(first))[0] == 4000
                await send_json(second, telemetry(1))  # not a hello: 4001
                assert (await until_closed(second))[0] == 4001
        seen = await dashboard_until(dashboard, is_status(device_id, False))
    assert [msg["online"] for msg in of_type(seen, "device_status")] == [False]
    response = await call(shared_hub.request, "GET", f"/api/devices/{device_id}")
    assert response.json()["online"] is False


# --- revocation ---------------------------------------------------------------------------------


async def test_token_rotation_closes_the_live_link_4003(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        response = await call(shared_hub.request, "POST", f"/api/devices/{device_id}/token")
        assert response.status_code == 200, response.text
        code, _ = await until_closed(ws)
    assert code == 4003
    assert await handshake_status(shared_hub, device_id, token) == 403
    assert await handshake_status(shared_hub, device_id, response.json()["token"]) == 101


async def test_token_rotation_closes_a_link_still_before_hello(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        response = await call(shared_hub.request, "POST", f"/api/devices/{device_id}/token")
        assert response.status_code == 200, response.text
        try:
            await send_json(ws, {"type": "hello", "stream": "s", "agent": "tests/1"})
        except ConnectionClosed:
            pass
        code, messages = await until_closed(ws)
    assert code == 4003
    assert of_type(messages, "welcome") == []


async def test_device_deletion_closes_the_live_link_4003(shared_hub: HubProcess) -> None:
    device_id, token = await new_device(shared_hub)
    async with device_ws(shared_hub, device_id, token) as ws:
        await hello(ws)
        response = await call(shared_hub.request, "DELETE", f"/api/devices/{device_id}")
        assert response.status_code == 204, response.text
        code, _ = await until_closed(ws)
    assert code == 4003
    assert await handshake_status(shared_hub, device_id, token) == 403


# --- rate limit ---------------------------------------------------------------------------------

RATE_LIMITED = {"EMS_RATE_LIMIT_PER_S": "5", "EMS_RATE_LIMIT_BURST": "5"}


async def test_heartbeat_flood_gets_errors_then_closes_4008(hub_factory: Any) -> None:
    hub = await call(hub_factory, **RATE_LIMITED)
    device_id, token = await new_device(hub)

    async def flood(ws: WebSocketConnection) -> None:
        for _ in range(500):
            try:
                await send_json(ws, heartbeat())
            except ConnectionClosed:
                return

    # The guard covers the flooder too, and the close handshake: a hub that stops reading
    # once it has closed would leave this device blocked in a send for ever.
    with trio.fail_after(HANG_GUARD_S):
        async with device_ws(hub, device_id, token) as ws:
            await hello(ws)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood, ws)
                code, messages = await until_closed(ws)
    assert code == 4008
    errors = of_type(messages, "error")
    assert errors
    assert {e["code"] for e in errors} == {"RATE_LIMIT_EXCEEDED"}
    # A burst over the limit is answered with errors; only keeping it up closes the link.
    assert len(errors) > 1


async def test_reliable_message_over_the_limit_closes_4008_unacked(hub_factory: Any) -> None:
    hub = await call(hub_factory, **RATE_LIMITED)
    device_id, token = await new_device(hub)
    async with device_ws(hub, device_id, token) as ws:
        await hello(ws, stream="s")
        for _ in range(10):  # the bucket (5, minus the hello) runs dry
            await send_json(ws, heartbeat())
        await send_json(ws, telemetry(1, sample(1000, voltage=1)))
        code, messages = await until_closed(ws)
    assert code == 4008
    assert of_type(messages, "ack") == []
    errors = of_type(messages, "error")
    assert {e["code"] for e in errors} == {"RATE_LIMIT_EXCEEDED"}
    assert errors[-1].get("seq") == 1, messages
    # Not acked, so the device still has it and sends it on its next connection.
    async with device_ws(hub, device_id, token) as ws:
        assert (await hello(ws, stream="s"))["acked_seq"] == 0
        await send_json(ws, telemetry(1, sample(1000, voltage=1)))
        assert await receive_until(ws, "ack") == {"type": "ack", "seq": 1}
    assert await stored(hub, device_id) == [{"seq": 1, "ts": 1000, "data": {"voltage": 1}}]


# --- graceful shutdown --------------------------------------------------------------------------


async def test_shutdown_acks_then_goaway_then_1001_and_nothing_is_lost(hub: HubProcess) -> None:
    device_id, token = await new_device(hub)
    count = 300
    async with device_ws(hub, device_id, token) as ws:
        await hello(ws, stream="s")
        await send_json(ws, telemetry(1))
        await until_ack(ws, 1)
        async with trio.open_nursery() as nursery:
            for seq in range(2, count + 1):
                await send_json(ws, telemetry(seq))
            nursery.start_soon(call, hub.stop)
            code, messages = await until_closed(ws)
    assert code == 1001
    assert [msg["type"] for msg in messages[-2:]] == ["ack", "goaway"]
    # Everything it sent is acked before the hub says goodbye.
    assert messages[-2] == {"type": "ack", "seq": count}
    goaway = messages[-1]
    assert isinstance(goaway["retry_after_ms"], int)
    assert isinstance(goaway["spread_ms"], int)
    assert goaway["retry_after_ms"] >= 0
    assert goaway["spread_ms"] >= 0

    await call(hub.start, hub.port)
    async with device_ws(hub, device_id, token) as ws:
        assert (await hello(ws, stream="s"))["acked_seq"] == count
        await send_json(ws, telemetry(count + 1))
        await until_ack(ws, count + 1)
    assert [s["seq"] for s in await stored(hub, device_id)] == list(range(1, count + 2))


def stored_last_seen(hub: HubProcess, device_id: str) -> float | None:
    """The `last_seen` in the hub's SQLite file (read beside the running hub: WAL mode)."""
    with closing(sqlite3.connect(hub.data_dir / "data" / "ems.db")) as db:
        query = "SELECT last_seen FROM devices WHERE device_id = ?"
        row = db.execute(query, (device_id,)).fetchone()
    return None if row is None else row[0]


async def rest_last_seen(hub: HubProcess, device_id: str) -> float:
    response = await call(hub.request, "GET", f"/api/devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()["last_seen"]  # type: ignore[no-any-return]


async def test_stored_last_seen_is_written_first_then_coalesced_and_caught_up_at_the_end(
    hub: HubProcess,
) -> None:
    device_id, token = await new_device(hub)
    async with device_ws(hub, device_id, token) as ws:
        await hello(ws)
        await send_json(ws, telemetry(1))
        await until_ack(ws, 1)
        first = stored_last_seen(hub, device_id)
        assert first is not None  # the first message writes it
        for seq in range(2, 6):
            await send_json(ws, heartbeat())
            await send_json(ws, telemetry(seq))
        await until_ack(ws, 5)
        # Within 10 s of the first write: not rewritten per message; the hub's memory is exact.
        assert stored_last_seen(hub, device_id) == first
        latest = await rest_last_seen(hub, device_id)
        assert latest > first  # moved on in memory: the check above could tell a rewrite
    # The link ends: the stored value catches up (committed by the time the hub has stopped).
    await call(hub.stop)
    assert stored_last_seen(hub, device_id) == latest
    await call(hub.start, hub.port)
    assert await rest_last_seen(hub, device_id) == latest


# --- observability ------------------------------------------------------------------------------


async def test_health_and_connections_show_the_device(hub: HubProcess) -> None:
    device_id, token = await new_device(hub)
    admin = await call(hub.admin_token)
    health = (await call(hub.request, "GET", "/health", token="")).json()
    assert health["connected_devices"] == 0
    async with dashboard_ws(hub, admin) as dashboard:
        await subscribe(dashboard, device_id)
        async with device_ws(hub, device_id, token) as ws:
            welcome = await hello(ws)
            health = (await call(hub.request, "GET", "/health", token="")).json()
            assert health["status"] == "ok"
            assert health["connected_devices"] == 1
            response = await call(hub.request, "GET", "/api/realtime/connections")
            assert response.status_code == 200, response.text
            body = response.json()
            [entry] = body["devices"]
            assert entry["device_id"] == device_id
            assert entry["session_id"] == welcome["session_id"]
            assert isinstance(entry["connected_at"], int | float)
            assert "last_seen" in entry
            assert "owner" in entry
            assert body["total_connections"] >= 1
        await dashboard_until(dashboard, is_status(device_id, False))
        health = (await call(hub.request, "GET", "/health", token="")).json()
        assert health["connected_devices"] == 0
        response = await call(hub.request, "GET", "/api/realtime/connections")
        assert response.json()["devices"] == []
