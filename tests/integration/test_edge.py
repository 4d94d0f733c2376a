"""The real edge agent (`python -m ems.edge`) against the real hub, both as subprocesses.

Each test breaks something on the way — the hub crashes, the agent is killed, the link is cut,
the outbox overflows, the agent is restarted — and then checks the delivery contract end to end:
every sample in the agent's local history reaches the hub's store exactly once, with the `seq` of
a message the agent sent, and nothing arrives that the agent did not take (protocol.md §1, §3).

Nothing here sleeps for a fixed time: every wait is for a log line, a file's content or a REST
answer, polled in a bounded loop with a hang guard (see `edge_helpers.wait_for`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from tests.integration.conftest import HubProcess, call, dashboard_ws, send_json
from tests.integration.edge_helpers import (
    FAST_SENSORS_TOML,
    GUARD_S,
    RECONNECT_GUARD_S,
    AgentProcess,
    TcpProxy,
    agent_env,
    hub_events,
    hub_latest_ts,
    hub_samples,
    read_only,
    wait_for,
    wait_stored_after,
)

MakeAgent = Callable[..., AgentProcess]


@pytest.fixture
def agents(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MakeAgent]:
    """Make agents (not started); every one is killed at the end, and on failure its log is
    printed."""
    made: list[AgentProcess] = []
    failed_before = request.session.testsfailed

    def make(
        hub_url: str, device_id: str, token: str, *, sample_s: float = 0.05, **env: str
    ) -> AgentProcess:
        root = tmp_path / f"agent{len(made)}"
        root.mkdir()
        config = root / "edge.toml"
        config.write_text(FAST_SENSORS_TOML % sample_s)
        agent = AgentProcess(
            root=root,
            env=agent_env(root, hub_url, device_id, token, **env),
            args=["--config", str(config)],
        )
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.kill()
    if request.session.testsfailed > failed_before:
        text = "".join(f"\n===== agent {a.device_id} ({a.root})\n{a.log_text()}" for a in made)
        text += f"\n(hub logs: {tmp_path}/hub*/hub-*.log)"
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            sys.stderr.write(text + "\n")


def stored_max_ts(hub: HubProcess, device_id: str) -> float:
    """The newest stored ts, from the hub's SQLite file (works while the hub is down)."""
    with read_only(hub.data_dir / "data" / "ems.db") as db:
        (top,) = db.execute(
            "SELECT coalesce(max(ts), 0) FROM telemetry WHERE device_id = ?", (device_id,)
        ).fetchone()
    return float(top)


def check_delivery(
    agent: AgentProcess, stored: list[dict[str, Any]], *, may_lack_history: bool = False
) -> dict[float, dict[str, Any]]:
    """The delivery contract after the agent stopped with an empty outbox: every history sample
    is stored exactly once, with its data, and seqs are the agent's. Returns the samples stored
    that the history lacks (allowed only with `may_lack_history`: a `kill -9` between the outbox
    write and the history write)."""
    history = agent.history()
    outbox = agent.outbox()
    assert outbox.queued == [], "the agent stopped with unacknowledged messages"
    by_ts = {float(s["ts"]): s for s in stored}
    assert len(by_ts) == len(stored), "a ts is stored twice"
    missing = sorted(set(history) - set(by_ts))
    assert not missing, f"{len(missing)} of {len(history)} history samples never stored"
    for ts, data in history.items():
        assert by_ts[ts]["data"] == data, f"sample {ts} stored with other data"
    extra = {ts: by_ts[ts] for ts in set(by_ts) - set(history)}
    if not may_lack_history:
        assert not extra, f"{len(extra)} stored samples the agent never recorded"
    # Seqs: each one the agent gave out, growing with ts (batches are taken and queued in order).
    seqs = [by_ts[ts]["seq"] for ts in sorted(by_ts)]
    assert all(1 <= seq <= outbox.last_seq for seq in seqs), (min(seqs), outbox.last_seq)
    assert seqs == sorted(seqs), "a sample carries the seq of a message out of ts order"
    assert agent.token not in agent.log_text(), "the token appeared in the agent's log"
    return extra


def signal_group(pid: int, sig: int) -> None:
    os.killpg(pid, sig)


# --- a dashboard that counts broadcasts -----------------------------------------------------


@attrs.define
class Broadcasts:
    updates: list[tuple[float, int]] = attrs.field(factory=list)
    """(ts, seq) of every `telemetry_update` for the device, in arrival order."""
    lagged: int = 0


async def watch(
    hub: HubProcess,
    device_id: str,
    seen: Broadcasts,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    token = await call(hub.admin_token)
    async with dashboard_ws(hub, token) as ws:
        await send_json(ws, {"type": "subscribe", "devices": [device_id]})
        while True:
            frame = orjson.loads(await ws.get_message())
            for item in frame["messages"] if frame["type"] == "batch" else [frame]:
                if item["type"] == "subscribed":
                    task_status.started()
                elif item["type"] == "telemetry_update" and item["device_id"] == device_id:
                    seen.updates.append((float(item["ts"]), item["seq"]))
                elif item["type"] == "lagged":
                    seen.lagged += item["dropped"]


async def check_broadcasts(seen: Broadcasts, stored: list[dict[str, Any]]) -> None:
    """Each stored sample went to the dashboard once, with its stored seq."""
    wanted = {float(s["ts"]): s["seq"] for s in stored}
    await wait_for(
        lambda: seen.lagged or wanted.keys() <= {ts for ts, _ in seen.updates},
        "every stored sample broadcast",
    )
    twice = [ts for ts, n in Counter(ts for ts, _ in seen.updates).items() if n > 1]
    assert not twice, f"{len(twice)} samples broadcast more than once"
    assert all(wanted.get(ts) == seq for ts, seq in seen.updates), "broadcast with another seq"
    assert seen.lagged == 0, "the dashboard lagged: completeness unchecked"


# --- the tests ----------------------------------------------------------------------------------


async def test_hub_crash_and_restart_loses_and_repeats_nothing(
    hub: HubProcess, agents: MakeAgent
) -> None:
    device_id = "edge-crash"
    agent = agents(hub.ws, device_id, await call(hub.create_device, device_id))
    await call(agent.start)
    await agent.wait_event("link_up")
    await wait_stored_after(hub, device_id, 0, agent)

    port = hub.port
    await call(hub.stop, signal.SIGKILL)
    await agent.wait_event("link_down")
    await wait_for(lambda: len(agent.outbox().queued) >= 5, "telemetry queued while down")
    before = await call(stored_max_ts, hub, device_id)

    await call(hub.start, port)
    ready = trio.current_time()
    await wait_stored_after(hub, device_id, before, agent, guard_s=RECONNECT_GUARD_S)
    back_s = trio.current_time() - ready
    await agent.wait_event("link_up", 2)
    # ...and it streams on: a sample taken after the hub came back is stored.
    taken_after = max(await call(agent.history))
    await wait_stored_after(hub, device_id, taken_after, agent)

    assert await call(agent.stop) == 0
    check_delivery(agent, await call(hub_samples, hub, device_id))
    sys.stdout.write(f"agent back and streaming {back_s:.2f} s after the hub was ready\n")


async def test_agent_killed_mid_stream_replays_its_outbox(
    hub: HubProcess, agents: MakeAgent
) -> None:
    device_id = "edge-kill9"
    agent = agents(hub.ws, device_id, await call(hub.create_device, device_id))
    seen = Broadcasts()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch, hub, device_id, seen)
        await call(agent.start)
        await agent.wait_event("link_up")
        await wait_stored_after(hub, device_id, 0, agent)

        # Freeze the hub so nothing is acknowledged, let the outbox fill, then kill -9 the agent
        # with messages in flight, and let the hub go on (it may still read what was sent).
        assert hub.process is not None
        await call(signal_group, hub.process.pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: len(agent.outbox().queued) >= 5, "unacknowledged telemetry")
            assert await call(agent.stop, signal.SIGKILL) == -signal.SIGKILL
        finally:
            await call(signal_group, hub.process.pid, signal.SIGCONT)
        at_kill = await call(agent.outbox)
        history_at_kill = max(await call(agent.history))
        assert at_kill.queued, "nothing left to replay"

        await call(agent.start)
        started = await agent.wait_event("agent_started")
        assert started["stream"] == at_kill.stream
        assert started["last_seq"] == at_kill.last_seq
        welcome = await agent.wait_event("link_up")
        assert welcome["acked_seq"] <= at_kill.last_seq
        await wait_for(
            lambda: agent.outbox().last_seq > at_kill.last_seq, "a message of the new run"
        )
        restarted_ts = await call(lambda: max(agent.history()))
        await wait_stored_after(hub, device_id, restarted_ts, agent)

        assert await call(agent.stop) == 0
        stored = await call(hub_samples, hub, device_id)
        extra = check_delivery(agent, stored, may_lack_history=True)
        # Only the batch written to the outbox but not yet to the history when the kill came.
        assert len({s["seq"] for s in extra.values()}) <= 1, extra
        assert all(history_at_kill < ts <= restarted_ts for ts in extra), extra
        await check_broadcasts(seen, stored)
        nursery.cancel_scope.cancel()


async def test_link_cut_repeatedly_by_a_proxy(hub: HubProcess, agents: MakeAgent) -> None:
    device_id = "edge-cuts"
    token = await call(hub.create_device, device_id)
    seen = Broadcasts()
    cuts = 5
    async with trio.open_nursery() as nursery:
        proxy: TcpProxy = await nursery.start(TcpProxy(upstream_port=hub.port).run)
        await nursery.start(watch, hub, device_id, seen)
        agent = agents(f"ws://127.0.0.1:{proxy.port}", device_id, token)
        await call(agent.start)
        for cut in range(1, cuts + 1):
            await agent.wait_event("link_up", cut, guard_s=RECONNECT_GUARD_S)
            # Odd cuts come after progress on this link (a sample newer than anything stored
            # before it); even ones right after `welcome`, while the replay is in flight.
            if cut % 2:
                latest = await call(hub_latest_ts, hub, device_id)
                await wait_stored_after(hub, device_id, latest, agent)
            assert proxy.cut() >= 1
            await agent.wait_event("link_down", cut)
        await agent.wait_event("link_up", cuts + 1, guard_s=RECONNECT_GUARD_S)
        latest = await call(hub_latest_ts, hub, device_id)
        await wait_stored_after(hub, device_id, latest, agent)

        assert await call(agent.stop) == 0
        stored = await call(hub_samples, hub, device_id)
        check_delivery(agent, stored)
        await check_broadcasts(seen, stored)
        assert proxy.cuts == cuts
        nursery.cancel_scope.cancel()


async def test_outbox_bound_drops_oldest_and_reports_it(
    hub_factory: Any, agents: MakeAgent
) -> None:
    hub: HubProcess = hub_factory(EMS_GOAWAY_RETRY_MS="100", EMS_GOAWAY_SPREAD_MS="100")
    device_id = "edge-overflow"
    agent = agents(
        hub.ws,
        device_id,
        await call(hub.create_device, device_id),
        sample_s=0.01,
        EMS_OUTBOX_MAX_BYTES="20000",
    )
    await call(agent.start)
    await agent.wait_event("link_up")
    await wait_stored_after(hub, device_id, 0, agent)

    port = hub.port
    await call(hub.stop)  # graceful: last acks, goaway, 1001
    overflowed = await wait_for(
        lambda: (view := agent.outbox()).dropped_total >= 5 and view, "outbox drops"
    )
    before = await call(stored_max_ts, hub, device_id)

    await call(hub.start, port)
    ready = trio.current_time()
    await wait_stored_after(hub, device_id, before, agent, guard_s=RECONNECT_GUARD_S)
    back_s = trio.current_time() - ready
    taken_after = max(await call(agent.history))
    await wait_stored_after(hub, device_id, taken_after, agent)
    assert await call(agent.stop) == 0

    history = sorted(await call(agent.history))
    stored = await call(hub_samples, hub, device_id)
    stored_ts = {float(s["ts"]) for s in stored}
    assert stored_ts <= set(history), "stored samples the agent never recorded"
    present = [ts in stored_ts for ts in history]
    # One run of lost samples — the oldest of what was queued while the hub was away — with
    # what was delivered before it and everything newer after it.
    first_lost = present.index(False)
    last_lost = len(present) - 1 - present[::-1].index(False)
    assert first_lost > 0, "nothing was delivered before the outage"
    assert not any(present[first_lost : last_lost + 1]), "the drops are not the oldest queued"
    assert present[-1], "the newest sample is missing"
    assert all(present[last_lost + 1 :]), "a gap among the newest samples"
    final = await call(agent.outbox)
    assert final.queued == []
    assert final.dropped_total >= overflowed.dropped_total
    assert last_lost - first_lost + 1 >= final.dropped_total  # each message held a sample or more
    reports = [e for e in await call(hub_events, hub, device_id) if e["code"] == "OUTBOX_OVERFLOW"]
    assert len(reports) == 1, reports
    (report,) = reports
    assert report["level"] == "warning"
    assert report["data"]["dropped"] >= overflowed.dropped_total
    # Every drop is reported once: in this event, or (made by the event itself) at the next
    # welcome.
    assert report["data"]["dropped_total"] + final.dropped_unreported == final.dropped_total
    assert agent.token not in agent.log_text()
    sys.stdout.write(f"agent back and streaming {back_s:.2f} s after the hub was ready\n")


async def test_sigterm_exits_zero_and_a_restart_resumes_the_stream(
    hub: HubProcess, agents: MakeAgent
) -> None:
    device_id = "edge-restart"
    agent = agents(hub.ws, device_id, await call(hub.create_device, device_id))
    await call(agent.start)
    first = await agent.wait_event("agent_started")
    assert (await agent.wait_event("link_up"))["acked_seq"] == 0  # a new stream
    await wait_stored_after(hub, device_id, 0, agent)
    await wait_for(lambda: agent.outbox().last_seq >= 5, "a few messages")

    assert await call(agent.stop) == 0
    assert agent.events("agent_stopping")
    stopped = await call(agent.outbox)
    assert stopped.queued == [], "SIGTERM did not flush the outbox"
    assert stopped.stream == first["stream"]

    await call(agent.start)
    second = await agent.wait_event("agent_started")
    assert second["stream"] == first["stream"]
    assert second["last_seq"] == stopped.last_seq
    assert (await agent.wait_event("link_up"))["acked_seq"] == stopped.last_seq
    latest = await call(hub_latest_ts, hub, device_id)
    await wait_stored_after(hub, device_id, latest, agent)
    newest = (await call(hub.request, "GET", f"/api/devices/{device_id}/latest")).json()
    assert newest["seq"] > stopped.last_seq

    assert await call(agent.stop) == 0
    check_delivery(agent, await call(hub_samples, hub, device_id))


TOKEN = "tok_" + "S3cr3t" * 8


@pytest.mark.parametrize(
    ("env", "toml", "names"),
    [
        ({"EMS_HUB_URL": "http://x"}, None, "EMS_HUB_URL"),
        ({"EMS_HUB_URL": f"ws://edge:{TOKEN}@hub.example"}, None, "EMS_HUB_URL"),
        ({"EMS_BATCH_INTERVAL_S": "fast"}, None, "EMS_BATCH_INTERVAL_S"),
        ({}, "[sensors]\nbatch_interval = 0.5\n", '"batch_interval"'),
        ({}, '[outbox]\nmax_bytes = "big"\n', "[outbox].max_bytes"),
    ],
)
def test_bad_config_exits_at_once_naming_the_key(
    tmp_path: Path, env: dict[str, str], toml: str | None, names: str
) -> None:
    environ = agent_env(tmp_path, "ws://127.0.0.1:9", "edge-config", TOKEN, **env)
    argv = [sys.executable, "-m", "ems.edge"]
    if toml is not None:
        (tmp_path / "edge.toml").write_text(toml)
        argv += ["--config", str(tmp_path / "edge.toml")]
    done = subprocess.run(
        argv, env=environ, cwd=tmp_path, capture_output=True, timeout=GUARD_S, check=False
    )
    out = (done.stdout + done.stderr).decode()
    assert done.returncode != 0, out
    assert TOKEN not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("ems-edge: "), out
    assert names in lines[0], out
    assert not (tmp_path / "data").exists(), "the agent started anyway"
