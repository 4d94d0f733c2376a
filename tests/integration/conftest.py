"""The real hub as a `hypercorn -k trio ems.hub:app` subprocess, and clients to talk to it.

`hub` starts one per test (fresh data directory, port chosen by hypercorn on 127.0.0.1:0 and
read back from its log), waits until `/health` answers, and always stops it. Tests talk to it
with httpx (REST) and trio-websocket (links), as an outside client would.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

ADMIN_PASSWORD = "admin-password-for-tests"
BIND_LINE = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
HANG_GUARD_S = 15.0
"""A test that waits longer than this for a message has failed (a guard, not a timing check)."""


@attrs.define
class HubProcess:
    """One hub subprocess; restartable on the same data directory."""

    data_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path | None = None
    _admin_token: str | None = None
    lines: LogLines = attrs.field(factory=lambda: LogLines())
    """Every line the hub printed, across restarts, for tests that wait on a log event."""

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        assert self.process is None
        self.log_path = self.data_dir / f"hub-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypercorn",
                "-k",
                "trio",
                "-b",
                f"127.0.0.1:{port}",
                "--graceful-timeout",
                "2",
                "ems.hub:app",
            ],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,  # hypercorn forks workers: stop them as one group
        )
        # A thread copies the hub's output to its log file (until the process ends) and
        # reports the port hypercorn bound, which it prints once the app has started.
        bound: queue.Queue[int | None] = queue.Queue()
        threading.Thread(
            target=_copy_output,
            args=(self.process, self.log_path, bound, self.lines),
            daemon=True,
        ).start()
        try:
            found = bound.get(timeout=30)
        except queue.Empty:
            found = None
        if found is None:
            raise RuntimeError(f"hub did not start:\n{self.log()}")
        self.port = found
        status = httpx.get(f"{self.http}/health", timeout=30).status_code
        if status not in (200, 503):
            raise RuntimeError(f"hub answered /health with {status}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the hub (SIGTERM: graceful; SIGKILL: a crash); its exit code."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        code = process.poll()
        if code is None:
            # SIGTERM goes to hypercorn's main process, which shuts its workers down
            # gracefully; SIGKILL goes to the whole group, workers included (a crash).
            if sig == signal.SIGKILL:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.send_signal(sig)
            try:
                code = process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait(timeout=10)
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything left of the group
        except ProcessLookupError:
            pass
        return code

    def restart(self, sig: int = signal.SIGTERM) -> None:
        port = self.port
        self.stop(sig)
        self._admin_token = None
        self.start(port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    # --- REST helpers (sync; call from trio tests through `call`) --------------------------

    def admin_token(self) -> str:
        if self._admin_token is None:
            self._admin_token = self.login("admin", ADMIN_PASSWORD)
        return self._admin_token

    def login(self, username: str, password: str) -> str:
        response = httpx.post(
            f"{self.http}/api/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    def request(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if token is None:
            token = self.admin_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.request(method, f"{self.http}{path}", headers=headers, timeout=30, **kwargs)

    def create_device(self, device_id: str, **fields: Any) -> str:
        response = self.request("POST", "/api/devices", json={"device_id": device_id, **fields})
        assert response.status_code == 201, response.text
        return str(response.json()["token"])

    def create_user(self, username: str, role: str = "viewer", password: str = "password-1") -> str:
        response = self.request(
            "POST", "/api/users", json={"username": username, "password": password, "role": role}
        )
        assert response.status_code == 201, response.text
        return self.login(username, password)


class LogLines:
    """A hub's output lines, and a way to wait (in a thread) for one containing a text."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._changed = threading.Condition()

    def append(self, line: bytes) -> None:
        with self._changed:
            self._lines.append(line)
            self._changed.notify_all()

    def mark(self) -> int:
        """Where the output is now: `wait_for(..., after=mark)` ignores what came before."""
        with self._changed:
            return len(self._lines)

    def wait_for(self, text: str, *, after: int = 0, timeout: float = HANG_GUARD_S) -> str:
        needle = text.encode()
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(needle in line for line in self._lines[after:]), timeout=timeout
            )
            if not found:
                raise AssertionError(f"the hub never logged {text!r}")
            return next(line for line in self._lines[after:] if needle in line).decode()


def _copy_output(
    process: subprocess.Popen[bytes],
    log_path: Path,
    bound: queue.Queue[int | None],
    lines: LogLines,
) -> None:
    reported = False
    assert process.stdout is not None
    with log_path.open("wb") as log:
        for line in process.stdout:
            log.write(line)
            log.flush()
            lines.append(line)
            match = None if reported else BIND_LINE.search(line)
            if match:
                reported = True
                bound.put(int(match.group(1)))
    if not reported:
        bound.put(None)  # the hub exited before it was up


def hub_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}
    env.update(
        {
            "EMS_DATA_DIR": str(data_dir / "data"),
            "EMS_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(overrides)
    return env


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Any]:
    """Start hubs with extra `EMS_*` settings; every one is stopped at the end."""
    started: list[HubProcess] = []

    def start(**settings: str) -> HubProcess:
        data_dir = tmp_path / f"hub{len(started)}"
        data_dir.mkdir()
        hub = HubProcess(data_dir=data_dir, env=hub_env(data_dir, **settings))
        started.append(hub)
        hub.start()
        return hub

    yield start
    for hub in started:
        hub.stop(signal.SIGKILL)


@pytest.fixture
def hub(hub_factory: Any) -> HubProcess:
    return hub_factory()


# --- WebSocket clients ----------------------------------------------------------------------


@asynccontextmanager
async def device_ws(
    hub: HubProcess, device_id: str, token: str | None
) -> AsyncIterator[WebSocketConnection]:
    headers = [("Authorization", f"Bearer {token}")] if token else []
    async with open_websocket_url(f"{hub.ws}/ws/device/{device_id}", extra_headers=headers) as ws:
        yield ws


@asynccontextmanager
async def dashboard_ws(hub: HubProcess, token: str) -> AsyncIterator[WebSocketConnection]:
    headers = [("Authorization", f"Bearer {token}")]
    async with open_websocket_url(f"{hub.ws}/ws/dashboard", extra_headers=headers) as ws:
        yield ws


async def send_json(ws: WebSocketConnection, message: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(message).decode())


async def receive_json(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(HANG_GUARD_S):
        return orjson.loads(await ws.get_message())  # type: ignore[no-any-return]


_unread: weakref.WeakKeyDictionary[WebSocketConnection, deque[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)
"""Messages already read from a link (the rest of a `batch` frame) and not yet looked at."""


async def next_of(ws: WebSocketConnection, *kinds: str) -> dict[str, Any]:
    """The next message of one of `kinds`, skipping others and unpacking `batch` frames; the
    rest of a batch is kept for the next call (a hub may pack several updates in one frame)."""
    unread = _unread.setdefault(ws, deque())
    with trio.fail_after(HANG_GUARD_S):
        while True:
            while unread:
                item = unread.popleft()
                if item["type"] in kinds:
                    return item
            message = orjson.loads(await ws.get_message())
            unread.extend(message["messages"] if message["type"] == "batch" else [message])


async def receive_until(ws: WebSocketConnection, kind: str) -> dict[str, Any]:
    """The next message of `type` `kind` (see `next_of`)."""
    return await next_of(ws, kind)


async def hello(ws: WebSocketConnection, stream: str = "stream-1", **fields: Any) -> dict[str, Any]:
    await send_json(ws, {"type": "hello", "stream": stream, "agent": "tests/1", **fields})
    welcome = await receive_until(ws, "welcome")
    return welcome


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking helper (REST call, process control) off the trio thread."""
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))
