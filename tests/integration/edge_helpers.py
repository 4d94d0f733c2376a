"""The real edge agent as a subprocess, a TCP proxy that can cut links, and read-only views of
the SQLite files the agent and the hub keep.

`AgentProcess` runs `python -m ems.edge` in a process group of its own (so a stop reaches every
thread and child), with a fresh data directory, a token file (mode 600) and its JSON log lines in
one file per start. `TcpProxy` sits between agent and hub on 127.0.0.1 and forwards bytes both
ways until `cut()` aborts every connection it carries (RST, as a dropped NAT mapping would).
Waits poll files or the REST API in bounded loops: each has a hang guard, none is a timing check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from tests.integration.conftest import HubProcess, call

GUARD_S = 30.0
"""A wait that lasts longer than this has failed (a hang guard, not a timing check)."""
RECONNECT_GUARD_S = 90.0
"""The guard for a wait across a reconnect: the agent's backoff may reach its 60 s cap."""
POLL_S = 0.02

FAST_SENSORS_TOML = "[sensors]\nintervals = { simulated_ems = %s }\n"


# --- the agent ------------------------------------------------------------------------------


@attrs.define
class AgentProcess:
    """One agent subprocess; restartable on the same data directory."""

    root: Path
    env: dict[str, str]
    args: list[str] = attrs.field(factory=list)
    process: subprocess.Popen[bytes] | None = None
    logs: list[Path] = attrs.field(factory=list)
    """One log file per start, oldest first."""

    @property
    def data_dir(self) -> Path:
        return Path(self.env["EMS_DATA_DIR"])

    @property
    def device_id(self) -> str:
        return self.env["EMS_DEVICE_ID"]

    @property
    def token(self) -> str:
        return Path(self.env["EMS_TOKEN_FILE"]).read_text().strip()

    def start(self) -> None:
        assert self.process is None, "already running"
        log_path = self.root / f"agent-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ems.edge", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM, guard_s: float = GUARD_S) -> int:
        """Send `sig` to the agent's process group and reap it; its exit code. A process still
        there after `guard_s` is killed and the test fails."""
        process, self.process = self.process, None
        assert process is not None, "not running"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            return process.wait(timeout=guard_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise AssertionError(f"the agent did not exit within {guard_s} s of {sig!r}") from None
        finally:
            _kill_group(process)  # anything left of the group

    def kill(self) -> None:
        """Cleanup: SIGKILL whatever is left (never fails)."""
        process, self.process = self.process, None
        if process is not None:
            _kill_group(process)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # --- its log -------------------------------------------------------------------------------

    def log_text(self) -> str:
        return "".join(
            f"--- {path.name}\n{path.read_text(errors='replace')}"
            for path in self.logs
            if path.exists()
        )

    def events(self, name: str | None = None, *, run: int = -1) -> list[dict[str, Any]]:
        """The JSON log lines of start number `run` (default: the latest), optionally only
        those whose `event` is `name`. Lines that are not JSON (a traceback) are skipped."""
        if not self.logs:
            return []
        out = []
        for line in self.logs[run].read_bytes().splitlines():
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(item, dict) and (name is None or item.get("event") == name):
                out.append(item)
        return out

    async def wait_event(
        self, name: str, count: int = 1, *, guard_s: float = GUARD_S
    ) -> dict[str, Any]:
        """The `count`-th log line `name` of the current run (polls the log file)."""

        def seen() -> dict[str, Any] | None:
            found = self.events(name)
            return found[count - 1] if len(found) >= count else None

        return await wait_for(
            seen, f"agent log event {name!r} #{count}", agent=self, guard_s=guard_s
        )

    # --- its files (read-only) -------------------------------------------------------------------

    def history(self) -> dict[float, dict[str, Any]]:
        """ts -> data of every sample in the agent's history store."""
        with read_only(self.data_dir / "history.db") as db:
            return {
                float(ts): orjson.loads(data)
                for ts, data in db.execute("SELECT ts, data FROM samples")
            }

    def history_count(self) -> int:
        with read_only(self.data_dir / "history.db") as db:
            return int(db.execute("SELECT count(*) FROM samples").fetchone()[0])

    def outbox(self) -> OutboxView:
        with read_only(self.data_dir / "outbox.db") as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            rows = db.execute("SELECT seq, kind FROM outbox ORDER BY seq").fetchall()
        return OutboxView(
            stream=meta.get("stream", ""),
            last_seq=int(meta.get("last_seq", 0)),
            dropped_total=int(meta.get("dropped_total", 0)),
            dropped_unreported=int(meta.get("dropped_unreported", 0)),
            queued=[(int(seq), str(kind)) for seq, kind in rows],
        )


@attrs.frozen
class OutboxView:
    stream: str
    last_seq: int
    dropped_total: int
    dropped_unreported: int
    queued: list[tuple[int, str]]


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def agent_env(
    root: Path, hub_url: str, device_id: str, token: str, **overrides: str
) -> dict[str, str]:
    """The agent's environment: no inherited `EMS_*`, a token file (mode 600) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    token_file = root / "token"
    token_file.touch(mode=0o600)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}
    env.update(
        {
            "EMS_HUB_URL": hub_url,
            "EMS_DEVICE_ID": device_id,
            "EMS_TOKEN_FILE": str(token_file),
            "EMS_DATA_DIR": str(root / "data"),
            "EMS_SENSORS": "simulated_ems",
            "EMS_BATCH_INTERVAL_S": "0.2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


# --- waiting ------------------------------------------------------------------------------------


async def wait_for(
    probe: Callable[[], Any],
    what: str,
    *,
    agent: AgentProcess | None = None,
    guard_s: float = GUARD_S,
) -> Any:
    """Poll the blocking `probe` (in a thread) until it returns something truthy; return that.
    Fails after `guard_s`, or as soon as `agent` has exited."""
    deadline = trio.current_time() + guard_s
    while True:
        result = await call(probe)
        if result:
            return result
        if agent is not None and agent.process is not None and agent.process.poll() is not None:
            raise AssertionError(
                f"the agent exited ({agent.process.returncode}) waiting for {what}"
            )
        if trio.current_time() > deadline:
            raise AssertionError(f"no {what} within {guard_s} s (hang guard)")
        await trio.sleep(POLL_S)


# --- the hub's side -------------------------------------------------------------------------


def hub_samples(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    """Every stored sample of `device_id` (REST; the tests stay far below the 10000 cap)."""
    response = hub.request("GET", f"/api/devices/{device_id}/telemetry?limit=10000")
    assert response.status_code == 200, response.text
    samples: list[dict[str, Any]] = response.json()["samples"]
    assert len(samples) < 10_000, "the test produced more samples than one query returns"
    return samples


def hub_latest_ts(hub: HubProcess, device_id: str) -> float:
    """The newest stored sample's ts (0 when none); -1 when the hub does not answer."""
    try:
        response = hub.request("GET", f"/api/devices/{device_id}/latest")
    except Exception:  # the hub is down or restarting: no progress to see
        return -1.0
    if response.status_code == 404:
        return 0.0
    assert response.status_code == 200, response.text
    return float(response.json()["ts"])


async def wait_stored_after(
    hub: HubProcess, device_id: str, ts: float, agent: AgentProcess, *, guard_s: float = GUARD_S
) -> float:
    """Until the hub stores a sample newer than `ts`; that sample's ts."""

    def newer() -> float | None:
        latest = hub_latest_ts(hub, device_id)
        return latest if latest > ts else None

    return float(
        await wait_for(newer, f"a sample stored after ts {ts}", agent=agent, guard_s=guard_s)
    )


def hub_events(hub: HubProcess, device_id: str) -> list[dict[str, Any]]:
    """The hub's stored `event`s of `device_id`, read from its SQLite file (read-only)."""
    with read_only(hub.data_dir / "data" / "ems.db") as db:
        rows = db.execute(
            "SELECT seq, ts, level, code, message, data FROM events WHERE device_id = ? "
            "ORDER BY id",
            (device_id,),
        ).fetchall()
    return [
        {
            "seq": seq,
            "ts": ts,
            "level": level,
            "code": code,
            "message": message,
            "data": None if data is None else orjson.loads(data),
        }
        for seq, ts, level, code, message, data in rows
    ]


@contextlib.contextmanager
def read_only(path: Path) -> Any:
    """A read-only connection to a SQLite file another process may be writing (WAL)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        yield db
    finally:
        db.close()


# --- a TCP proxy that can cut the link ----------------------------------------------------------


@attrs.define(eq=False)
class _Pipe:
    client: trio.SocketStream
    upstream: trio.SocketStream
    scope: trio.CancelScope


@attrs.define(eq=False)
class TcpProxy:
    """Forward 127.0.0.1:`port` to 127.0.0.1:`upstream_port`; `cut()` aborts every connection."""

    upstream_port: int
    port: int = 0
    accepted: int = 0
    cuts: int = 0
    _pipes: set[_Pipe] = attrs.field(factory=set)
    _upstream_open: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._upstream_open.set()

    def hold_upstream(self) -> None:
        """Stop forwarding what clients send (what the hub sends still flows)."""
        if self._upstream_open.is_set():
            self._upstream_open = trio.Event()

    def release_upstream(self) -> None:
        self._upstream_open.set()

    async def run(
        self, *, task_status: trio.TaskStatus[TcpProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    def cut(self) -> int:
        """Abort every current connection (RST both ways); how many there were."""
        pipes = list(self._pipes)
        for pipe in pipes:
            for stream in (pipe.client, pipe.upstream):
                _abortive(stream)
            pipe.scope.cancel()
        self.cuts += 1
        return len(pipes)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            _abortive(client)
            await trio.aclose_forcefully(client)
            return
        pipe = _Pipe(client, upstream, trio.CancelScope())
        self._pipes.add(pipe)
        try:
            with pipe.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_up, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
        finally:
            self._pipes.discard(pipe)
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    async def _pump_up(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await self._upstream_open.wait()
                await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()  # one side ended: end both


def _abortive(stream: trio.SocketStream) -> None:
    """Make the next close send RST instead of FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
