"""Commands and config between the real hub and the real agent, both as subprocesses.

- A command whose results never reached the hub (the link dropped first) is delivered again
  after the reconnect and does not run a second time: the agent answers from its record.
- A config pushed while the agent is offline is applied after it reconnects, and is still the
  agent's config after a restart (its `hello` carries the version; the hub sends nothing new).
"""

from __future__ import annotations

import stat
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from tests.integration.conftest import (
    HANG_GUARD_S,
    HubProcess,
    call,
    dashboard_ws,
    receive_until,
    send_json,
)
from tests.integration.edge_helpers import AgentProcess, TcpProxy, agent_env, wait_for

COUNTING_COMMAND = """#!{python}
import sys
with open({marker!r}, "a") as f:
    f.write("ran\\n")
"""


@pytest.fixture
def agent_root(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    made: list[AgentProcess] = []
    yield made
    for agent in made:
        agent.kill()


def make_agent(
    made: list[AgentProcess], root: Path, hub_url: str, device_id: str, token: str, toml: str = ""
) -> AgentProcess:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "edge.toml"
    config.write_text(toml)
    agent = AgentProcess(
        root=root,
        env=agent_env(root, hub_url, device_id, token, EMS_BATCH_INTERVAL_S="0.5"),
        args=["--config", str(config)],
    )
    made.append(agent)
    return agent


async def dashboard_items(dashboard: Any) -> list[dict[str, Any]]:
    """Every update in the next frame (a `batch` unpacked)."""
    frame = orjson.loads(await dashboard.get_message())
    return frame["messages"] if frame["type"] == "batch" else [frame]  # type: ignore[no-any-return]


SEEN: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
"""Per dashboard connection: every (command id, status) seen so far."""


async def command_reaches(dashboard: Any, command_id: str, status: str) -> dict[str, Any]:
    """The `command_status` of `command_id` with `status`, whenever it arrived on this
    dashboard (statuses of other commands met meanwhile are remembered, not lost)."""
    seen = SEEN.setdefault(dashboard, {})
    with trio.fail_after(HANG_GUARD_S * 2):
        while (command_id, status) not in seen:
            for item in await dashboard_items(dashboard):
                if item["type"] == "command_status":
                    command = item["command"]
                    seen[(command["id"], command["status"])] = command
    return seen[(command_id, status)]


async def test_command_redelivered_after_a_drop_runs_once(
    hub: HubProcess, tmp_path: Path, agent_root: list[AgentProcess]
) -> None:
    marker = tmp_path / "ran.txt"
    script = tmp_path / "count.py"
    script.write_text(COUNTING_COMMAND.format(python=sys.executable, marker=str(marker)))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    toml = f'[commands]\nallowed = ["ping", "reboot"]\n[commands.argv]\nreboot = ["{script}"]\n'
    token = await call(hub.create_device, "pi-1")
    async with trio.open_nursery() as nursery:
        proxy = await nursery.start(TcpProxy(hub.port).run)
        agent = make_agent(
            agent_root, tmp_path / "agent", f"ws://127.0.0.1:{proxy.port}", "pi-1", token, toml
        )
        admin = await call(hub.admin_token)
        async with dashboard_ws(hub, admin) as dashboard:
            await send_json(dashboard, {"type": "subscribe", "devices": ["pi-1"]})
            await receive_until(dashboard, "subscribed")
            await call(agent.start)
            await agent.wait_event("link_up")
            # What the agent sends from now on does not reach the hub: the command arrives and
            # runs, but its `received`/`succeeded` are lost with the connection.
            proxy.hold_upstream()
            response = await call(
                hub.request, "POST", "/api/devices/pi-1/commands", json={"name": "reboot"}
            )
            command = response.json()
            await command_reaches(dashboard, command["id"], "sent")
            await wait_for(lambda: marker.exists() and marker.read_text(), "the command to run")
            assert proxy.cut() == 1
            proxy.release_upstream()
            # After the reconnect the hub sends it again (it was never `received`); the agent
            # answers from its record and the hub learns the outcome.
            done = await command_reaches(dashboard, command["id"], "succeeded")
            assert done["result"]["exit_code"] == 0
        await call(agent.stop)
        nursery.cancel_scope.cancel()
    assert marker.read_text() == "ran\n", "the command ran more than once"
    assert any(e.get("acked_seq") is not None for e in agent.events("link_up"))
    assert len(agent.events("link_up")) >= 2, "the agent never reconnected"


async def test_config_pushed_offline_is_applied_on_reconnect_and_survives_restart(
    hub: HubProcess, tmp_path: Path, agent_root: list[AgentProcess]
) -> None:
    token = await call(hub.create_device, "pi-1")
    agent = make_agent(agent_root, tmp_path / "agent", hub.ws, "pi-1", token)
    await call(agent.start)
    await agent.wait_event("link_up")
    assert await call(agent.stop) == 0
    put = await call(
        hub.request,
        "PUT",
        "/api/devices/pi-1/config",
        json={"config": {"batch_interval_s": 2, "site": "north"}},
    )
    assert put.json()["desired"]["version"] == 1
    admin = await call(hub.admin_token)
    async with dashboard_ws(hub, admin) as dashboard:
        await send_json(dashboard, {"type": "subscribe", "devices": ["pi-1"]})
        await receive_until(dashboard, "subscribed")
        await call(agent.start)
        status: dict[str, Any] = {}
        with trio.fail_after(HANG_GUARD_S * 2):
            while status.get("reported_version") != 1:
                for item in await dashboard_items(dashboard):
                    if item["type"] == "config_status" and item["reported_version"] == 1:
                        status = item
        assert status == {
            "type": "config_status",
            "device_id": "pi-1",
            "desired_version": 1,
            "reported_version": 1,
            "status": "applied",
        }
    applied = await agent.wait_event("config_applied")
    assert applied["version"] == 1
    document = (await call(hub.request, "GET", "/api/devices/pi-1/config")).json()
    assert document["reported"] == {"version": 1, "status": "applied", "error": None}
    # Restart: the agent starts with version 1 applied and the hub has nothing to send.
    assert await call(agent.stop) == 0
    await call(agent.start)
    started = await agent.wait_event("agent_started")
    assert started["config_version"] == 1
    await agent.wait_event("link_up")
    assert await call(agent.stop) == 0
    assert agent.events("config_applied") == [], "the config was sent (and applied) again"


async def config_status_reaching(dashboard: Any, version: int) -> dict[str, Any]:
    with trio.fail_after(HANG_GUARD_S * 2):
        while True:
            for item in await dashboard_items(dashboard):
                if item["type"] == "config_status" and item["reported_version"] == version:
                    return item


async def admin_dashboard(hub: HubProcess, stack: Any, device_id: str) -> Any:
    dashboard = await stack.enter_async_context(dashboard_ws(hub, await call(hub.admin_token)))
    await send_json(dashboard, {"type": "subscribe", "devices": [device_id]})
    await receive_until(dashboard, "subscribed")
    return dashboard


async def test_commands_to_an_offline_agent_run_when_it_connects_unless_expired(
    hub: HubProcess, tmp_path: Path, agent_root: list[AgentProcess]
) -> None:
    from contextlib import AsyncExitStack

    token = await call(hub.create_device, "pi-1")
    agent = make_agent(agent_root, tmp_path / "agent", hub.ws, "pi-1", token)
    async with AsyncExitStack() as stack:
        dashboard = await admin_dashboard(hub, stack, "pi-1")
        post = await call(
            hub.request,
            "POST",
            "/api/devices/pi-1/commands",
            json={"name": "ping", "params": {"payload": "hi"}},
        )
        ping = post.json()
        short = await call(
            hub.request,
            "POST",
            "/api/devices/pi-1/commands",
            json={"name": "ping", "expires_in_s": 0.2},
        )
        unknown = await call(
            hub.request, "POST", "/api/devices/pi-1/commands", json={"name": "self_destruct"}
        )
        await command_reaches(dashboard, short.json()["id"], "expired")
        await call(agent.start)
        done = await command_reaches(dashboard, ping["id"], "succeeded")
        assert done["result"]["payload"] == "hi"
        rejected = await command_reaches(dashboard, unknown.json()["id"], "rejected")
        assert "unknown command" in rejected["error"]
    assert await call(agent.stop) == 0
    expired = (await call(hub.request, "GET", f"/api/commands/{short.json()['id']}")).json()
    assert expired["status"] == "expired"
    # the expired one never reached the agent
    assert short.json()["id"] not in agent.log_text()


async def test_config_pushed_online_and_a_rejected_one_reports_the_reason(
    hub: HubProcess, tmp_path: Path, agent_root: list[AgentProcess]
) -> None:
    from contextlib import AsyncExitStack

    token = await call(hub.create_device, "pi-1")
    agent = make_agent(agent_root, tmp_path / "agent", hub.ws, "pi-1", token)
    async with AsyncExitStack() as stack:
        dashboard = await admin_dashboard(hub, stack, "pi-1")
        await call(agent.start)
        await agent.wait_event("link_up")
        await call(
            hub.request, "PUT", "/api/devices/pi-1/config", json={"config": {"batch_interval_s": 1}}
        )
        applied = await config_status_reaching(dashboard, 1)
        assert applied["status"] == "applied"
        await call(
            hub.request,
            "PUT",
            "/api/devices/pi-1/config",
            json={"config": {"batch_interval_s": "often"}},
        )
        rejected = await config_status_reaching(dashboard, 2)
        assert rejected["status"] == "rejected"
    document = (await call(hub.request, "GET", "/api/devices/pi-1/config")).json()
    assert document["reported"]["status"] == "rejected"
    assert "batch_interval_s" in document["reported"]["error"]
    assert await call(agent.stop) == 0


async def test_history_request_over_an_outage_returns_every_sample_once(
    hub: HubProcess, tmp_path: Path, agent_root: list[AgentProcess]
) -> None:
    from contextlib import AsyncExitStack

    from tests.integration.edge_helpers import hub_samples

    token = await call(hub.create_device, "pi-1")
    agent = make_agent(agent_root, tmp_path / "agent", hub.ws, "pi-1", token)
    await call(agent.start)
    await agent.wait_event("link_up")
    await wait_for(lambda: len(hub_samples(hub, "pi-1")) >= 3, "samples stored before the outage")
    port = hub.port
    await call(hub.stop)  # outage: the agent keeps sampling into its history and outbox
    await wait_for(
        lambda: agent.history_count() >= len(agent.history()) and agent.history_count() >= 8,
        "samples during the outage",
    )
    await call(hub.start, port)
    async with AsyncExitStack() as stack:
        dashboard = await admin_dashboard(hub, stack, "pi-1")
        history = agent.history()
        start, end = min(history), max(history)
        request = await call(
            hub.request,
            "POST",
            "/api/devices/pi-1/history-request",
            json={"from": start, "to": end},
        )
        assert request.status_code == 202
        await command_reaches(dashboard, request.json()["id"], "succeeded")
    stored = [s for s in hub_samples(hub, "pi-1") if start <= s["ts"] <= end]
    assert len({s["ts"] for s in stored}) == len(stored), "a sample is stored twice"
    assert {s["ts"] for s in stored} == {ts for ts in history if start <= ts <= end}
    assert await call(agent.stop) == 0


async def test_simulate_runs_several_devices_in_one_process(
    hub: HubProcess, tmp_path: Path
) -> None:
    import json
    import os
    import signal
    import subprocess

    from tests.integration.edge_helpers import hub_samples

    tokens = {d: await call(hub.create_device, d) for d in ("sim-a", "sim-b")}
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}
    argv = [sys.executable, "-m", "ems.edge", "simulate", "--count", "2", "--hub", hub.ws]
    argv += ["--tokens", str(tokens_file), "--data-dir", str(tmp_path / "sim")]
    process = await call(
        subprocess.Popen,
        argv,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for(
            lambda: all(hub_samples(hub, d) for d in tokens), "samples from both simulated devices"
        )
        os.killpg(process.pid, signal.SIGTERM)
        assert await call(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
