"""`Agent.stop()` arriving while a batch is being handed over (written to the outbox and the
history store) loses nothing: every sample in the history is queued for the hub, in seq order.

The agent runs in-process against an unreachable hub, so whatever it queues stays in its outbox.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from ems.edge.agent import Agent
from ems.edge.config import load_settings
from ems.edge.history import HistoryStore
from ems.edge.outbox import Outbox


class Gate:
    """Blocks the first write (history or outbox) made after `arm()` until `release()`."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = trio.Event()
        self.released = threading.Event()
        self.token: trio.lowlevel.TrioToken | None = None

    def arm(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.armed = True

    def hold(self) -> None:
        """Called in a worker thread by the wrapped writes."""
        if self.armed:
            self.armed = False
            trio.from_thread.run_sync(self.entered.set, trio_token=self.token)
            assert self.released.wait(timeout=30)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Gate:
    gate = Gate()
    history_add = HistoryStore.add
    append_many = Outbox.append_many

    def add(self: HistoryStore, samples: Any) -> int:
        gate.hold()
        return history_add(self, samples)

    def append(self: Outbox, messages: Any, *args: Any, **kwargs: Any) -> Any:
        if messages and messages[0].TYPE == "telemetry":
            gate.hold()
        return append_many(self, messages, *args, **kwargs)

    monkeypatch.setattr(HistoryStore, "add", add)
    monkeypatch.setattr(Outbox, "append_many", append)
    return gate


async def test_stop_during_a_batch_handover_keeps_history_and_outbox_in_step(
    tmp_path: Path, gate: Gate
) -> None:
    (tmp_path / "token").write_text("t" * 32)
    settings = load_settings(
        None,
        {
            "EMS_HUB_URL": "ws://127.0.0.1:9",
            "EMS_DEVICE_ID": "edge-stop",
            "EMS_TOKEN_FILE": str(tmp_path / "token"),
            "EMS_DATA_DIR": str(tmp_path / "data"),
            "EMS_SENSORS": "simulated_ems",
            "EMS_BATCH_INTERVAL_S": "0.05",
        },
    )
    agent = Agent(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        gate.arm()
        with trio.fail_after(30):
            await gate.entered.wait()  # a batch is half-way through its handover
            nursery.start_soon(agent.stop)
            await trio.testing.wait_all_tasks_blocked()
        gate.released.set()

    with sqlite3.connect(tmp_path / "data" / "history.db") as db:
        history = {ts for (ts,) in db.execute("SELECT ts FROM samples")}
    with sqlite3.connect(tmp_path / "data" / "outbox.db") as db:
        queued = [
            (seq, sample["ts"])
            for seq, text in db.execute("SELECT seq, text FROM outbox WHERE kind = 'telemetry'")
            for sample in orjson.loads(text)["samples"]
        ]
    assert history, "no sample was taken"
    assert history <= {ts for _, ts in queued}, "samples in the history never queued"
    assert [ts for _, ts in sorted(queued)] == sorted(ts for _, ts in queued)
