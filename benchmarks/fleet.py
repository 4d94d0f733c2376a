"""Simulated fleets against a real hub: how many devices, what latency, what it costs the hub.

Starts a hub (`hypercorn -k trio ems.hub:app`, fresh data directory) unless `--hub` names one,
creates the devices through the REST API (concurrently), and runs them in `--fleet-procs`
processes of their own, each device a `DeviceSession` over trio-websocket. Dashboards
(subscribed to `*`) run in processes of their own too, so the fleet's load does not count as
hub latency. Scenarios (`--scenario`):

- `steady`: N devices at `--rate` messages/s each (`--batch` samples per message). Reports
  delivered/sent, stored, latency p50/p99/max (sample `ts` to dashboard receive, one clock),
  hub CPU-seconds per 1,000 samples, hub RSS per connection, fleet CPU.
  `--rate 0` is max throughput: each device keeps one ack window (32 messages) in flight;
  samples/s sent, stored (hub's store counter) and delivered within the window.
- `connect-storm`: every device connects at once (no stagger): time until all are online
  (hello -> welcome), per-device time-to-welcome percentiles, retries by cause.
- `reconnect-storm`: devices stream; the hub gets SIGTERM (last ack, `goaway`, 1001) and is
  started again on the same port and data directory. Time until every device is welcomed again
  and has had a new ack; the devices keep what is unacked and resend it (an agent's outbox).
  Afterwards the SQLite file must hold every seq of every device exactly once.
- `slow-dashboard`: a dashboard that reads `--slow-read-rate` messages/s beside a normal one: the
  normal one's p99 over time, the hub's RSS each second (start/max/end), the slow one's `lagged`.

Run `python benchmarks/fleet.py --devices 1000 --rate 1 --duration 30`; `make bench` runs the
short versions, `make bench-full` all of them. Results go to benchmarks/results/ as JSON (with
machine info, package versions and the parameters) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    connect_websocket_url,
    open_websocket_url,
    wrap_client_stream,
)

from ems.edge.agent import STABLE_LINK_S
from ems.edge.backoff import Backoff
from ems.hub.collector import Collector
from ems.hub.settings import HubSettings
from ems.protocol import messages as m
from ems.protocol._window import CommandRecord, SeqAllocator
from ems.protocol.codec import Codec
from ems.protocol.device_session import Acked, DeviceSession, GoingAway, LinkDead, Welcomed

ADMIN_PASSWORD = "bench-admin-password"
RESULTS = Path(__file__).parent / "results"
BIND_LINE = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
CODEC = Codec()
SCENARIOS = ("steady", "connect-storm", "reconnect-storm", "slow-dashboard")


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the hub, started from here, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the hub under test --------------------------------------------------------------------


@attrs.define
class HubUnderTest:
    data_dir: Path
    env_extra: dict[str, str] = attrs.field(factory=dict)
    workers: int = 1
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    """0: any free port; once started, a second `start()` (after `stop()`) binds the same one."""
    starts: int = 0

    def start(self) -> None:
        raise_nofile_limit()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}
        env.update(
            {
                "EMS_DATA_DIR": str(self.data_dir / "data"),
                "EMS_ADMIN_PASSWORD": ADMIN_PASSWORD,
                **self.env_extra,
            }
        )
        self.starts += 1
        log_path = self.data_dir / ("hub.log" if self.starts == 1 else f"hub-{self.starts}.log")
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hypercorn",
                    "-k",
                    "trio",
                    "-w",
                    str(self.workers),
                    "-b",
                    f"127.0.0.1:{self.port}",
                    "--backlog",
                    "4096",
                    "ems.hub:app",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = BIND_LINE.search(log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                try:
                    httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                    return
                except httpx.TransportError:
                    pass
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("hub did not start:\n" + log_path.read_text(errors="replace"))

    def worker_pids(self) -> list[int]:
        """hypercorn forks its workers; the CPU that matters is theirs."""
        assert self.process is not None
        pid = self.process.pid
        children: list[int] = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            children.extend(int(c) for c in text)
        return children or [pid]

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


async def create_devices(http: str, count: int, concurrency: int = 8) -> list[SimDevice]:
    """Create `bench-00000`... through REST, `concurrency` requests at a time (a device that
    exists gets a new token). Returned in index order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=http, timeout=300, limits=limits) as client:
        login = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        token = login.json()["token"]
        client.headers["Authorization"] = f"Bearer {token}"
        devices: list[SimDevice | None] = [None] * count
        limiter = trio.CapacityLimiter(concurrency)

        async def one(i: int) -> None:
            device_id = f"bench-{i:05d}"
            async with limiter:
                response = await client.post("/api/devices", json={"device_id": device_id})
                if response.status_code == 409:
                    response = await client.post(f"/api/devices/{device_id}/token")
            response.raise_for_status()
            devices[i] = SimDevice(device_id, response.json()["token"], admin_token=token)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        return [d for d in devices if d is not None]


async def hub_metrics(http: str) -> dict[str, float]:
    """The hub's unlabelled /metrics values (loopback needs no login); empty when an
    overloaded hub does not answer within 30 s (the run goes on and reports what it can)."""
    try:
        async with httpx.AsyncClient(base_url=http, timeout=30) as client:
            text = (await client.get("/metrics")).text
    except httpx.TimeoutException:
        print("hub /metrics did not answer within 30 s", file=sys.stderr)
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


async def hub_gc_figures(http: str) -> dict[str, Any]:
    """The hub's GC pauses so far, from /metrics (loopback needs no login)."""
    try:
        async with httpx.AsyncClient(base_url=http, timeout=30) as client:
            text = (await client.get("/metrics")).text
    except httpx.TimeoutException:
        return {}
    figures: dict[str, Any] = {}
    for line in text.splitlines():
        for name, key in (
            ("ems_gc_pause_max_seconds", "hub_gc_max_pause_ms_gen"),
            ("ems_gc_collections_total", "hub_gc_collections_gen"),
        ):
            if line.startswith(name + "{"):
                generation = line.split('generation="', 1)[1][0]
                value = float(line.rsplit(" ", 1)[1])
                figures[f"{key}{generation}"] = round(value * 1000, 1) if "pause" in key else value
    return figures


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# --- the fleet (runs in worker processes) ------------------------------------------------------


@attrs.define(eq=False)
class SimDevice:
    device_id: str
    token: str
    admin_token: str = ""
    sent: int = 0
    acked_seq: int = 0
    last_seq: int = 0
    connects: int = 0
    refused: int = 0


def classify(exc: BaseException) -> str | None:
    """Why a device's connection attempt or link ended, as a retry cause; None: not a link
    failure (re-raise). In an exception group every leaf must be a link failure (the reader and
    the producer both see the close); the first names the cause."""
    if isinstance(exc, BaseExceptionGroup):
        causes = [classify(e) for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        if not causes or None in causes:
            return None
        return causes[0]
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, HandshakeError):
        cause = exc.__cause__
        if isinstance(cause, OSError):
            # trio's open_tcp_stream: "all attempts to connect failed", the refusals inside
            inner = cause.__cause__
            leaves = inner.exceptions if isinstance(inner, BaseExceptionGroup) else (inner,)
            refused = (ConnectionRefusedError, ConnectionResetError)
            if isinstance(cause, refused) or any(isinstance(e, refused) for e in leaves):
                return "refused"
            return "connect_error"
        return "handshake"
    if isinstance(exc, ConnectionClosed):
        code = exc.reason.code if exc.reason is not None else None
        return f"closed_{code}"
    if isinstance(exc, LinkDeadError):
        return "link_dead"
    if isinstance(exc, OSError | trio.BrokenResourceError):
        return "broken"
    return None


class LinkDeadError(Exception):
    pass


@attrs.define(eq=False)
class Fleet:
    url: str
    devices: list[SimDevice]
    rate: float
    metrics: int
    samples_per_message: int = 1
    honour_goaway: bool = True
    short_backoff: bool = False
    stop_sending: trio.Event = attrs.field(factory=trio.Event)
    epoch: int = 0
    """Bumped by `mark()`: connections made after it count towards `welcomed`/`back`."""
    welcomed: int = 0
    back: int = 0
    t0: float = attrs.field(factory=time.monotonic)
    welcome_times: list[float] = attrs.field(factory=list)
    last_welcome_t: float = 0.0
    last_back_t: float = 0.0
    all_welcomed: trio.Event = attrs.field(factory=trio.Event)
    all_back: trio.Event = attrs.field(factory=trio.Event)
    all_acked: trio.Event = attrs.field(factory=trio.Event)
    pending: int = 0
    """Devices with something not acked yet."""
    retries: Counter[str] = attrs.field(factory=Counter)
    connects: int = 0

    def mark(self) -> None:
        self.epoch += 1
        self.welcomed = self.back = 0
        self.welcome_times = []
        self.all_welcomed = trio.Event()
        self.all_back = trio.Event()
        self.t0 = time.monotonic()

    def sent(self) -> int:
        return sum(d.sent for d in self.devices)

    async def run_device(self, device: SimDevice, start_delay: float) -> None:
        """One simulated device: connect, stream, reconnect on failure, until all is acked."""
        await trio.sleep(start_delay)
        rng = random.Random(device.device_id)
        state = SimState(device=device, rng=rng, data=data_strings(rng, self.metrics))
        # The agent's policy (ems.edge.agent): full-jitter exponential backoff, reset after a
        # link that stayed up STABLE_LINK_S; `goaway` overrides it once.
        backoff = Backoff(base=1.0, cap=60.0, rng=rng)
        while not (self.stop_sending.is_set() and not state.outbox):
            epoch = self.epoch
            state.welcomed_at = None
            try:
                async with open_websocket_url(
                    f"{self.url}/ws/device/{device.device_id}",
                    extra_headers=[("Authorization", f"Bearer {device.token}")],
                ) as ws:
                    device.connects += 1
                    self.connects += 1
                    await SimConnection(self, state, ws, epoch).run()
            except BaseException as exc:
                cause = classify(exc)
                if cause is None:
                    raise
                self.retries[cause] += 1
                device.refused += 1
                welcomed = state.welcomed_at
                if welcomed is not None and trio.current_time() - welcomed >= STABLE_LINK_S:
                    backoff.reset()
                if state.goaway_delay is not None:
                    delay, state.goaway_delay = state.goaway_delay, None
                elif self.short_backoff:
                    delay = rng.uniform(0.25, 1.0)
                else:
                    delay = backoff.next_delay()
                await trio.sleep(delay)

    def on_welcome(self, epoch: int) -> None:
        if epoch == self.epoch:
            now = time.monotonic()
            self.welcomed += 1
            self.welcome_times.append(now - self.t0)
            self.last_welcome_t = now
            if self.welcomed == len(self.devices):
                self.all_welcomed.set()

    def on_back(self, epoch: int) -> None:
        if epoch == self.epoch:
            self.back += 1
            self.last_back_t = time.monotonic()
            if self.back == len(self.devices):
                self.all_back.set()

    def on_acked(self, device: SimDevice, seq: int) -> None:
        if seq > device.acked_seq:
            was_pending = device.acked_seq < device.last_seq
            device.acked_seq = seq
            if was_pending and device.acked_seq >= device.last_seq:
                self.pending -= 1
                if self.pending == 0 and self.stop_sending.is_set():
                    self.all_acked.set()


def data_strings(rng: random.Random, metrics: int, count: int = 16) -> list[str]:
    """A few pre-encoded `data` objects per device: sending only formats seq and ts."""
    return [
        orjson.dumps({f"m{k}": round(rng.uniform(0, 100), 2) for k in range(metrics)}).decode()
        for _ in range(count)
    ]


@attrs.define(eq=False)
class SimState:
    """What a simulated device keeps across its connections (its outbox, its seqs)."""

    device: SimDevice
    rng: random.Random
    data: list[str]
    seqs: SeqAllocator = attrs.field(factory=SeqAllocator)
    outbox: dict[int, str] = attrs.field(factory=dict)
    outbox_low: int = 1
    record: CommandRecord = attrs.field(factory=CommandRecord)
    last_us: int = 0
    acked: trio.Event = attrs.field(factory=trio.Event)
    goaway_delay: float | None = None
    welcomed_at: float | None = None
    back_epoch: int = -1
    welcome_epoch: int = -1


@attrs.define(eq=False)
class SimConnection:
    fleet: Fleet
    state: SimState
    ws: Any
    epoch: int
    session: DeviceSession = attrs.field(init=False)
    send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    welcome_acked: int = attrs.field(init=False, default=-1)

    def __attrs_post_init__(self) -> None:
        device = self.state.device
        self.session = DeviceSession(
            hello=m.Hello(stream=f"bench-{device.device_id}", agent="ems-bench/1"),
            now=trio.current_time(),
            record=self.state.record,
            codec=CODEC,
            wall_clock=time.time,
        )

    async def run(self) -> None:
        await self.flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reader, nursery.cancel_scope)
            nursery.start_soon(self.ticker)
            if not self.fleet.stop_sending.is_set():
                nursery.start_soon(self.producer)

    async def flush(self) -> None:
        # One sender at a time: frames must leave in seq order (the contract's rule).
        async with self.send_lock:
            session = self.session
            outbox = self.state.outbox
            if session.state.value == "open":
                seq = session.sent_high + 1
                last = self.state.seqs.last
                free = session.window_free()
                while seq <= last and free > 0:
                    text = outbox.get(seq)
                    if text is not None:
                        session.send_reliable(seq, text, trio.current_time())
                        free -= 1
                    seq += 1
            for text in session.data_to_send():
                await self.ws.send_message(text)

    async def reader(self, scope: trio.CancelScope) -> None:
        session = self.session
        state = self.state
        fleet = self.fleet
        outbox = state.outbox
        while True:
            text = await self.ws.get_message()
            session.receive_text(text, trio.current_time())
            while (event := session.next_event()) is not None:
                if isinstance(event, Acked):
                    seq = event.seq
                    while state.outbox_low <= seq:
                        outbox.pop(state.outbox_low, None)
                        state.outbox_low += 1
                    fleet.on_acked(state.device, seq)
                    if seq > self.welcome_acked >= 0 and state.back_epoch != self.epoch:
                        state.back_epoch = self.epoch
                        fleet.on_back(self.epoch)
                    state.acked.set()
                    state.acked = trio.Event()
                elif isinstance(event, Welcomed):
                    self.welcome_acked = event.welcome.acked_seq
                    state.welcomed_at = trio.current_time()
                    if state.welcome_epoch != self.epoch:
                        state.welcome_epoch = self.epoch
                        fleet.on_welcome(self.epoch)
                elif isinstance(event, GoingAway):
                    if fleet.honour_goaway:
                        spread = state.rng.random() * event.spread_ms
                        state.goaway_delay = (event.retry_after_ms + spread) / 1000.0
                elif isinstance(event, LinkDead):
                    raise LinkDeadError(event.reason)
            await self.flush()
            if fleet.stop_sending.is_set() and not outbox:
                scope.cancel()

    async def producer(self) -> None:
        fleet = self.fleet
        state = self.state
        device = state.device
        outbox = state.outbox
        data = state.data
        batch = fleet.samples_per_message
        interval = 1.0 / fleet.rate if fleet.rate > 0 else 0.0
        next_at = trio.current_time()
        window = self.session.max_in_flight
        while not fleet.stop_sending.is_set():
            count = 1
            if fleet.rate <= 0:
                # As fast as acks allow: keep one window of messages unacknowledged.
                while len(outbox) >= window:
                    await state.acked.wait()
                if fleet.stop_sending.is_set():
                    break
                count = window - len(outbox)
            for _ in range(count):
                # ts grows strictly per device even when the loop runs late and catches up
                # (the hub stores one sample per device and ts)
                # ts in whole microseconds, formatted exactly: distinct per sample
                now_us = max(int(time.time() * 1e6), state.last_us + 1000)
                state.last_us = now_us + batch
                seq = state.seqs.next()
                pick = seq & 15
                if batch == 1:
                    samples = f'{{"ts":{now_us // 1000}.{now_us % 1000:03d},"data":{data[pick]}}}'
                else:
                    samples = ",".join(
                        f'{{"ts":{us // 1000}.{us % 1000:03d},"data":{data[(pick + i) & 15]}}}'
                        for i, us in enumerate(range(now_us, now_us + batch))
                    )
                outbox[seq] = f'{{"type":"telemetry","seq":{seq},"samples":[{samples}]}}'
                if device.acked_seq >= device.last_seq:
                    fleet.pending += 1
                device.sent += batch
                device.last_seq = seq
            await self.flush()
            if fleet.rate > 0:
                next_at += interval
                await trio.sleep_until(next_at)
            else:
                await trio.lowlevel.checkpoint()

    async def ticker(self) -> None:
        session = self.session
        while (deadline := session.next_deadline()) is not None:
            await trio.sleep_until(deadline)
            session.handle_timer(trio.current_time())
            if (event := session.next_event()) is not None and isinstance(event, LinkDead):
                raise LinkDeadError(event.reason)
            await self.flush()


async def worker_main(spec: dict[str, Any]) -> None:
    """A fleet process: runs its share of the devices and answers the parent's commands (one
    per stdin line, one JSON line back each): `online T`, `mark`, `back T`, `sent`, `stop T`."""
    raise_nofile_limit()
    devices = [SimDevice(d, t) for d, t in spec["devices"]]
    fleet = Fleet(
        spec["url"],
        devices,
        rate=spec["rate"],
        metrics=spec["metrics"],
        samples_per_message=spec["batch"],
        honour_goaway=spec["honour_goaway"],
        short_backoff=spec["short_backoff"],
    )
    stagger = spec["stagger_s"]

    def reply(answer: dict[str, Any]) -> None:
        sys.stdout.write(orjson.dumps(answer).decode() + "\n")
        sys.stdout.flush()

    def counts() -> dict[str, Any]:
        return {
            "sent": fleet.sent(),
            "connects": fleet.connects,
            "retries": dict(fleet.retries),
            "welcomed": fleet.welcomed,
            "back": fleet.back,
        }

    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        # Thousands of connections' objects: the hub's collector policy keeps the fleet's own
        # collections from scanning them over and over (ems/hub/collector.py).
        nursery.start_soon(Collector(HubSettings.from_env({}), lambda: len(devices)).run)
        fleet.t0 = time.monotonic()
        for index, device in enumerate(devices):
            nursery.start_soon(fleet.run_device, device, index / max(len(devices), 1) * stagger)
        reply({"t0": fleet.t0})
        async for line in _line_reader(stdin):
            command, _, argument = line.strip().partition(" ")
            if command == "online":
                with trio.move_on_after(float(argument)):
                    await fleet.all_welcomed.wait()
                reply(
                    {
                        **counts(),
                        "t_last": fleet.last_welcome_t,
                        "welcome_after_s": [round(t, 3) for t in fleet.welcome_times],
                    }
                )
            elif command == "mark":
                fleet.mark()
                reply({**counts(), "t": fleet.t0})
            elif command == "back":
                with trio.move_on_after(float(argument)):
                    await fleet.all_back.wait()
                reply(
                    {
                        **counts(),
                        "t_back": fleet.last_back_t,
                        "t_welcomed": fleet.last_welcome_t,
                        "welcome_after_s": [round(t, 3) for t in fleet.welcome_times],
                    }
                )
            elif command == "sent":
                reply(counts())
            elif command == "stop":
                fleet.stop_sending.set()
                with trio.move_on_after(float(argument)):
                    if fleet.pending:
                        await fleet.all_acked.wait()
                reply(
                    {
                        **counts(),
                        "all_acked": fleet.pending == 0,
                        "unacked_devices": fleet.pending,
                        "last_seq": {d.device_id: d.last_seq for d in devices},
                        "acked_seq": {d.device_id: d.acked_seq for d in devices},
                    }
                )
                break
        nursery.cancel_scope.cancel()  # after `stop`, or when the parent went away


@attrs.define(eq=False)
class LineProcess:
    """A child (fleet worker or dashboard probe) driven by lines: commands on its stdin, one JSON
    answer per command on its stdout."""

    argv: list[str]
    env: dict[str, str] = attrs.field(factory=dict)
    process: trio.Process | None = None
    _lines: Any = None

    async def start(self, nursery: trio.Nursery) -> Any:
        """Start the child; returns its first line (JSON), sent once it is under way."""
        self.process = await nursery.start(
            functools.partial(
                trio.run_process,
                self.argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, **self.env},
                check=False,
            )
        )
        assert self.process is not None
        self._lines = _line_reader(self.process.stdout)
        return await self.answer()

    async def answer(self) -> Any:
        return orjson.loads(await self._lines.__anext__())

    async def send(self, command: str) -> None:
        assert self.process is not None
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")

    async def ask(self, command: str) -> Any:
        await self.send(command)
        return await self.answer()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@attrs.define(eq=False)
class FleetProcs:
    """The devices, split round-robin over `procs` worker processes."""

    url: str
    devices: list[SimDevice]
    procs: int
    workdir: Path
    rate: float
    metrics: int
    batch: int
    stagger_s: float
    honour_goaway: bool = True
    short_backoff: bool = False
    workers: list[LineProcess] = attrs.field(factory=list)
    t0: float = 0.0

    async def start(self, nursery: trio.Nursery) -> None:
        procs = max(1, min(self.procs, len(self.devices)))
        for k in range(procs):
            share = self.devices[k::procs]
            spec = {
                "url": self.url,
                "devices": [[d.device_id, d.token] for d in share],
                "rate": self.rate,
                "metrics": self.metrics,
                "batch": self.batch,
                "stagger_s": self.stagger_s,
                "honour_goaway": self.honour_goaway,
                "short_backoff": self.short_backoff,
            }
            path = self.workdir / f"fleet-{k}.json"
            path.write_text(json.dumps(spec))
            self.workers.append(LineProcess([sys.executable, __file__, "--worker", str(path)]))
        starts = []
        for worker in self.workers:
            starts.append(await worker.start(nursery))
        self.t0 = min(s["t0"] for s in starts)

    async def ask(self, command: str) -> list[Any]:
        """The command to every worker at once; their answers in worker order."""
        for worker in self.workers:
            await worker.send(command)
        answers: list[Any] = [None] * len(self.workers)

        async def collect(i: int) -> None:
            answers[i] = await self.workers[i].answer()

        async with trio.open_nursery() as nursery:
            for i in range(len(self.workers)):
                nursery.start_soon(collect, i)
        return answers

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]


def merge_counts(answers: list[dict[str, Any]]) -> dict[str, Any]:
    retries: Counter[str] = Counter()
    for a in answers:
        retries.update(a["retries"])
    return {
        "sent": sum(a["sent"] for a in answers),
        "connects": sum(a["connects"] for a in answers),
        "retries": dict(sorted(retries.items())),
        "welcomed": sum(a["welcomed"] for a in answers),
        "back": sum(a["back"] for a in answers),
    }


# --- dashboards (in processes of their own) ----------------------------------------------------


@attrs.define(eq=False)
class DashboardProbe:
    url: str
    token: str
    read_rate: float = 0.0
    """Messages read per second (0: as fast as they come)."""
    latencies_ms: list[float] = attrs.field(factory=list)
    received_at: list[float] = attrs.field(factory=list)
    received: int = 0
    frames: int = 0
    lagged: int = 0
    lagged_messages: int = 0
    ready: trio.Event = attrs.field(factory=trio.Event)
    all_received: trio.Event = attrs.field(factory=trio.Event)
    expected: float = float("inf")
    pace_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    caught_up: trio.Event = attrs.field(factory=trio.Event)

    def expect(self, total: int) -> None:
        self.expected = total
        if self.received >= total:
            self.all_received.set()

    async def connect(self, nursery: trio.Nursery) -> Any:
        headers = [("Authorization", f"Bearer {self.token}")]
        if not self.read_rate:
            return await connect_websocket_url(
                nursery, f"{self.url}/ws/dashboard", extra_headers=headers
            )
        # A slow reader with a small receive buffer, so the hub's queue (not the kernel's
        # buffers) takes up what it does not read.
        parts = urlsplit(self.url)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        await sock.connect((parts.hostname, parts.port))
        return await wrap_client_stream(
            nursery,
            trio.SocketStream(sock),
            parts.hostname or "127.0.0.1",
            "/ws/dashboard",
            extra_headers=headers,
        )

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            ws = await self.connect(nursery)
            await ws.send_message('{"type":"subscribe","devices":["*"]}')
            next_read = trio.current_time()
            while True:
                frame = orjson.loads(await ws.get_message())
                self.frames += 1
                now_ms = time.time() * 1000.0
                now = time.monotonic()
                items = frame["messages"] if frame["type"] == "batch" else [frame]
                if self.read_rate:
                    # A slow reader: the next frame waits until this one's messages are "read"
                    # at `read_rate` messages/s (a batch frame counts each message in it).
                    next_read = max(next_read, trio.current_time()) + len(items) / self.read_rate
                    self.pace_scope = trio.CancelScope()
                    with self.pace_scope:
                        await trio.sleep_until(next_read)
                for item in items:
                    kind = item["type"]
                    if kind == "telemetry_update":
                        self.received += 1
                        self.latencies_ms.append(now_ms - item["ts"])
                        self.received_at.append(now)
                        if self.received >= self.expected:
                            self.all_received.set()
                    elif kind == "subscribed":
                        self.ready.set()
                    elif kind == "lagged":
                        self.lagged += item["dropped"]
                        self.lagged_messages += 1
                if not self.read_rate and items and now_ms - items[-1].get("ts", now_ms) < 1000:
                    self.caught_up.set()

    async def drain(self) -> None:
        """Stop pacing, read as fast as frames come until updates are under 1 s old."""
        self.read_rate = 0.0
        self.pace_scope.cancel()
        await self.caught_up.wait()


def bucket_p99(times: list[float], latencies: list[float], start: float, width: float) -> list:
    buckets: dict[int, list[float]] = {}
    for t, lat in zip(times, latencies, strict=True):
        buckets.setdefault(int((t - start) // width), []).append(lat)
    return [round(percentile(buckets[k], 0.99), 1) for k in sorted(buckets)]


async def probe_main(url: str, read_rate: float) -> None:
    """The probe process: subscribe, then answer the parent's commands on stdin: `reset` starts
    the measured window; `window` answers its latencies; `stats` the counters; `expect N` the
    totals once N updates arrived in all (or after 60 s)."""
    gc.freeze()
    probe = DashboardProbe(url, os.environ["EMS_BENCH_TOKEN"], read_rate=read_rate)
    stdin = trio.lowlevel.FdStream(os.dup(0))

    def reply(answer: dict[str, Any]) -> None:
        print(orjson.dumps(answer).decode(), flush=True)

    def stats() -> dict[str, Any]:
        return {
            "received": probe.received,
            "frames": probe.frames,
            "lagged": probe.lagged,
            "lagged_messages": probe.lagged_messages,
        }

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await probe.ready.wait()
        reply({"ready": True})
        window_start = 0
        window_t = time.monotonic()
        async for line in _line_reader(stdin):
            command, _, argument = line.strip().partition(" ")
            if command == "reset":
                probe.latencies_ms.clear()
                probe.received_at.clear()
                window_start = probe.received
                window_t = time.monotonic()
                reply(stats())
            elif command == "window":
                reply(
                    {
                        **stats(),
                        "received_in_window": probe.received - window_start,
                        "latencies_ms": [round(x, 2) for x in probe.latencies_ms],
                        "p99_per_5s": bucket_p99(
                            probe.received_at, probe.latencies_ms, window_t, 5.0
                        ),
                    }
                )
            elif command == "stats":
                reply(stats())
            elif command == "drain":
                with trio.move_on_after(float(argument)):
                    await probe.drain()
                reply({**stats(), "caught_up": probe.caught_up.is_set()})
            elif command == "expect":
                probe.expect(int(argument))
                with trio.move_on_after(60):
                    await probe.all_received.wait()
                reply(stats())
                break
        nursery.cancel_scope.cancel()  # after `expect`, or when the parent went away


def probe_process(url: str, token: str, read_rate: float = 0.0) -> LineProcess:
    argv = [sys.executable, __file__, "--probe", url, "--probe-read-rate", str(read_rate)]
    return LineProcess(argv, env={"EMS_BENCH_TOKEN": token})


async def _line_reader(stream: Any) -> Any:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- scenarios -------------------------------------------------------------------------------


@attrs.define(eq=False)
class Bench:
    """What every scenario sets up: a hub (or a given one), devices, and their fleet."""

    args: argparse.Namespace
    workdir: Path = attrs.field(init=False)
    hub: HubUnderTest = attrs.field(init=False)
    devices: list[SimDevice] = attrs.field(init=False, factory=list)
    create_s: float = 0.0
    services: contextlib.ExitStack = attrs.field(init=False, factory=contextlib.ExitStack)
    database_url: str | None = None
    keep_for_failure: bool = False
    """Set when the run failed its check: the hub's logs and data stay for a look."""

    def __attrs_post_init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="ems-bench-"))
        env = dict(self.args.hub_env or [])
        if self.args.scale_out:
            # The scale-out set-up (step 7): a private PostgreSQL and Redis for the hub.
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests/
            from services import private_postgres, private_redis

            self.database_url = self.services.enter_context(private_postgres())
            env["EMS_DATABASE_URL"] = self.database_url
            env["EMS_REDIS_URL"] = self.services.enter_context(private_redis())
        self.hub = HubUnderTest(self.workdir, env_extra=env, workers=self.args.workers)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.hub.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.hub.port}"

    @property
    def db_path(self) -> Path:
        return self.workdir / "data" / "ems.db"

    def hub_pids(self) -> list[int]:
        if self.hub.process is None:
            return [int(self.args.hub_pid)]
        return self.hub.worker_pids()

    async def setup(self) -> None:
        if self.args.hub:
            # An existing hub (profiling, other machines); its data dir is `--hub-data`.
            self.hub.port = int(self.args.hub.rsplit(":", 1)[1])
            self.workdir = Path(self.args.hub_data)
        else:
            await trio.to_thread.run_sync(self.hub.start)
        started = time.monotonic()
        self.devices = await create_devices(self.http, self.args.devices)
        self.create_s = round(time.monotonic() - started, 2)

    def fleet(self, stagger_s: float, rate: float | None = None) -> FleetProcs:
        args = self.args
        return FleetProcs(
            self.url,
            self.devices,
            procs=args.fleet_procs,
            workdir=self.workdir,
            rate=args.rate if rate is None else rate,
            metrics=args.metrics,
            batch=args.batch,
            stagger_s=stagger_s,
            honour_goaway=not args.ignore_goaway,
            short_backoff=args.short_backoff,
        )

    @property
    def token(self) -> str:
        return self.devices[0].admin_token if self.devices else ""

    def stored(self) -> int:
        if self.database_url is not None:
            import psycopg

            with psycopg.connect(self.database_url) as conn:
                row = conn.execute("SELECT count(*) FROM telemetry").fetchone()
                return int(row[0]) if row else 0
        with sqlite3.connect(self.db_path) as db:
            return int(db.execute("SELECT count(*) FROM telemetry").fetchone()[0])

    def close(self) -> None:
        self.hub.stop()

    def remove_data(self) -> None:
        self.services.close()
        if self.keep_for_failure and not self.args.hub:
            print(f"the run failed its check: hub logs and data kept in {self.workdir}")
        elif not self.args.hub and not self.args.keep_data:
            shutil.rmtree(self.workdir, ignore_errors=True)


def stagger_for(args: argparse.Namespace) -> float:
    """Connections start spread over one send interval (at most 5 s), and no faster than
    `--connect-rate` per second: the hub welcomes ~150 devices a second on this machine (store
    round trips on its one store thread before each `welcome`), and devices that wait over 10 s
    for `welcome` give up and reconnect (a retry storm, see the connect-storm scenario)."""
    spread = min(1.0 / args.rate, 5.0) if args.rate > 0 else 1.0
    return max(spread, args.devices / args.connect_rate)


async def wait_online(fleet: FleetProcs, within_s: float) -> dict[str, Any]:
    answers = await fleet.ask(f"online {within_s}")
    times = [t for a in answers for t in a["welcome_after_s"]]
    done = [a["t_last"] for a in answers if a["t_last"]]
    return {
        **merge_counts(answers),
        "connect_s": round(max(done) - fleet.t0, 2) if done else None,
        "welcome_after_s": times,
    }


async def steady(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        await bench.setup()
        pids = bench.hub_pids()
        rss_before = rss_bytes(pids)
        result: dict[str, Any] = {"create_devices_s": bench.create_s}
        async with trio.open_nursery() as nursery:
            probe = probe_process(bench.url, bench.token)
            await probe.start(nursery)
            fleet = bench.fleet(stagger_for(args))
            await fleet.start(nursery)
            online = await wait_online(fleet, 180)
            result["connect_s"] = online["connect_s"]
            result["online"] = online["welcomed"]
            rss_connected = rss_bytes(pids)
            fleet_pids = fleet.pids()
            cpu_start = cpu_seconds(pids)
            fleet_cpu_start = cpu_seconds(fleet_pids)
            metrics_start = await hub_metrics(bench.http)
            sent_start = merge_counts(await fleet.ask("sent"))["sent"]
            await probe.ask("reset")
            await trio.sleep(args.duration)
            cpu_used = cpu_seconds(pids) - cpu_start
            fleet_cpu_used = cpu_seconds(fleet_pids) - fleet_cpu_start
            sent_window = merge_counts(await fleet.ask("sent"))["sent"] - sent_start
            metrics_end = await hub_metrics(bench.http)
            gc_figures = await hub_gc_figures(bench.http)
            fleet_rss = rss_bytes(fleet_pids)
            window = await probe.ask("window")
            # Everything sent must be acked, and reach the dashboard.
            final_answers = await fleet.ask("stop 60")
            final = merge_counts(final_answers)
            totals = await probe.ask(f"expect {final['sent']}")
        bench.close()
        stored = bench.stored()
        stored_window = args.batch * (
            metrics_end.get("ems_store_messages_total", 0)
            - metrics_start.get("ems_store_messages_total", 0)
        )
        lat = window["latencies_ms"]
        result.update(
            {
                "scenario": "throughput" if args.rate <= 0 else "steady",
                "devices": args.devices,
                "fleet_procs": len(fleet_pids),
                "rate_per_device": args.rate,
                "samples_per_message": args.batch,
                "metrics": args.metrics,
                "duration_s": args.duration,
                "sent": final["sent"],
                "delivered": totals["received"],
                "stored": stored,
                "all_acked": all(a["all_acked"] for a in final_answers),
                "lagged": totals["lagged"],
                "reconnects": final["connects"] - args.devices,
                "retries": final["retries"],
                "latency_ms_p50": round(percentile(lat, 0.50), 1),
                "latency_ms_p99": round(percentile(lat, 0.99), 1),
                "latency_ms_max": round(max(lat) if lat else float("nan"), 1),
                "latency_p99_per_5s": window["p99_per_5s"],
                "samples_per_s": round(sent_window / args.duration, 1),
                "stored_per_s": round(stored_window / args.duration, 1),
                "delivered_per_s": round(window["received_in_window"] / args.duration, 1),
                "delivered_in_window": window["received_in_window"],
                "hub_cpu_s_per_1000_samples": round(1000 * cpu_used / max(sent_window, 1), 4),
                "hub_cpu_percent": round(100 * cpu_used / args.duration, 1),
                "fleet_cpu_percent": round(100 * fleet_cpu_used / args.duration, 1),
                "fleet_cpu_us_per_sample": round(1e6 * fleet_cpu_used / max(sent_window, 1), 1),
                "fleet_rss_mb": round(fleet_rss / 2**20, 1),
                "hub_rss_mb": round(rss_connected / 2**20, 1),
                **gc_figures,
                "hub_rss_kb_per_connection": round(
                    (rss_connected - rss_before) / 1024 / max(args.devices, 1), 1
                ),
            }
        )
        bench.keep_for_failure = failed(result)
        return result
    finally:
        bench.close()
        bench.remove_data()


async def connect_storm(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        await bench.setup()
        pids = bench.hub_pids()
        rss_before = rss_bytes(pids)
        cpu_start = cpu_seconds(pids)
        peak = Peak(pids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peak.run)
            fleet = bench.fleet(stagger_s=0.0)
            await fleet.start(nursery)
            online = await wait_online(fleet, args.duration)
            cpu_used = cpu_seconds(pids) - cpu_start
            fleet_cpu = cpu_seconds(fleet.pids())
            fleet_rss = rss_bytes(fleet.pids())
            rss_connected = rss_bytes(pids)
            try:
                connected = (await hub_metrics(bench.http)).get("ems_connected_devices")
            except httpx.HTTPError:  # a hub too busy to answer /metrics within 30 s
                connected = None
            final = merge_counts(await fleet.ask("stop 30"))
            nursery.cancel_scope.cancel()
        times = online["welcome_after_s"]
        return {
            "scenario": "connect-storm",
            "devices": args.devices,
            "fleet_procs": len(fleet.workers),
            "create_devices_s": bench.create_s,
            "online": online["welcomed"],
            "hub_says_connected": int(connected) if connected is not None else None,
            "all_online_s": online["connect_s"] if online["welcomed"] == args.devices else None,
            "welcome_s_p50": round(percentile(times, 0.5), 2),
            "welcome_s_p99": round(percentile(times, 0.99), 2),
            "welcome_s_max": round(max(times), 2) if times else None,
            "connects": online["connects"],
            "retries_until_online": online["retries"],
            "retries_total": final["retries"],
            "hub_cpu_s": round(cpu_used, 2),
            "fleet_cpu_s": round(fleet_cpu, 2),
            "fleet_rss_mb": round(fleet_rss / 2**20, 1),
            "hub_rss_mb_peak": round(peak.max / 2**20, 1),
            "hub_rss_kb_per_connection": round(
                (rss_connected - rss_before) / 1024 / max(args.devices, 1), 1
            ),
        }
    finally:
        bench.close()
        bench.remove_data()


@attrs.define(eq=False)
class Peak:
    """The hub's RSS once a second (start, max, end)."""

    pids: list[int]
    samples: list[int] = attrs.field(factory=list)

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

    async def run(self) -> None:
        while True:
            self.samples.append(rss_bytes(self.pids))
            await trio.sleep(1.0)


def loss_check(
    db_path: Path, last_seq: dict[str, int], acked_seq: dict[str, int]
) -> dict[str, Any]:
    """Every acked seq (1..acked) of every device stored exactly once (one sample per message);
    what was sent but never acked (the run ended first) is counted apart, not as loss."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute(
            "SELECT device_id, seq, count(*) FROM telemetry GROUP BY device_id, seq"
        ).fetchall()
    stored: dict[str, dict[int, int]] = {}
    for device_id, seq, count in rows:
        stored.setdefault(device_id, {})[seq] = count
    lost = duplicated = bad_devices = 0
    for device_id, acked in acked_seq.items():
        seqs = stored.get(device_id, {})
        device_lost = sum(1 for seq in range(1, acked + 1) if seq not in seqs)
        device_duplicated = sum(count - 1 for count in seqs.values())
        lost += device_lost
        duplicated += device_duplicated
        bad_devices += bool(device_lost or device_duplicated)
    return {
        "expected_rows": sum(last_seq.values()),
        "acked_rows": sum(acked_seq.values()),
        "unacked_at_end": sum(last_seq[d] - acked_seq[d] for d in last_seq),
        "rows": sum(r[2] for r in rows),
        "distinct_device_seq": len(rows),
        "lost": lost,
        "duplicated": duplicated,
        "devices_not_exact": bad_devices,
        "exact": bad_devices == 0,
    }


async def reconnect_storm(args: argparse.Namespace) -> dict[str, Any]:
    if args.batch != 1:
        raise SystemExit("reconnect-storm checks one sample per seq: use --batch 1")
    bench = Bench(args)
    try:
        await bench.setup()
        result: dict[str, Any] = {"create_devices_s": bench.create_s}
        async with trio.open_nursery() as nursery:
            fleet = bench.fleet(stagger_for(args))
            await fleet.start(nursery)
            online = await wait_online(fleet, 180)
            result["connect_s"] = online["connect_s"]
            await trio.sleep(args.duration)  # streaming before the restart
            before = merge_counts(await fleet.ask("mark"))
            killed_at = time.monotonic()
            await trio.to_thread.run_sync(bench.hub.stop)
            stopped_at = time.monotonic()
            await trio.to_thread.run_sync(bench.hub.start)
            up_at = time.monotonic()
            pids = bench.hub_pids()
            cpu_start = cpu_seconds(pids)
            answers = await fleet.ask(f"back {args.back_timeout}")
            back = merge_counts(answers)
            cpu_used = cpu_seconds(pids) - cpu_start
            backs = [a["t_back"] for a in answers if a["t_back"]]
            again = [t for a in answers for t in a["welcome_after_s"]]
            welcomes = [a["t_welcomed"] for a in answers if a["t_welcomed"]]
            await trio.sleep(args.duration)  # streaming after
            final_answers = await fleet.ask("stop 60")
            final = merge_counts(final_answers)
            nursery.cancel_scope.cancel()
        bench.close()
        last_seq: dict[str, int] = {}
        acked_seq: dict[str, int] = {}
        for a in final_answers:
            last_seq.update(a["last_seq"])
            acked_seq.update(a["acked_seq"])
        check = loss_check(bench.db_path, last_seq, acked_seq)
        retries = Counter(final["retries"])
        retries.subtract(before["retries"])
        result.update(
            {
                "scenario": "reconnect-storm",
                "devices": args.devices,
                "fleet_procs": len(fleet.workers),
                "rate_per_device": args.rate,
                "duration_s": args.duration,
                "hub_stop_s": round(stopped_at - killed_at, 2),
                "hub_start_s": round(up_at - stopped_at, 2),
                "welcomed_again": back["welcomed"],
                "streaming_again": back["back"],
                "all_welcomed_s": (
                    round(max(welcomes) - killed_at, 2)
                    if back["welcomed"] == args.devices
                    else None
                ),
                "all_streaming_s": (
                    round(max(backs) - killed_at, 2) if back["back"] == args.devices else None
                ),
                "welcome_again_s_p50": round(percentile(again, 0.5), 2),
                "welcome_again_s_p99": round(percentile(again, 0.99), 2),
                "hub_cpu_s_recovering": round(cpu_used, 2),
                "retries_in_storm": {k: v for k, v in sorted(retries.items()) if v},
                "sent": final["sent"],
                "all_acked": all(a["all_acked"] for a in final_answers),
                **check,
            }
        )
        bench.keep_for_failure = failed(result)
        return result
    finally:
        bench.close()
        bench.remove_data()


async def slow_dashboard(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    try:
        await bench.setup()
        pids = bench.hub_pids()
        rss = Peak(pids)
        async with trio.open_nursery() as nursery:
            normal = probe_process(bench.url, bench.token)
            slow = probe_process(bench.url, bench.token, read_rate=args.slow_read_rate)
            await normal.start(nursery)
            await slow.start(nursery)
            fleet = bench.fleet(stagger_for(args))
            await fleet.start(nursery)
            online = await wait_online(fleet, 180)
            cpu_start = cpu_seconds(pids)
            await normal.ask("reset")
            slow_start = await slow.ask("reset")
            async with trio.open_nursery() as sampler:
                sampler.start_soon(rss.run)
                await trio.sleep(args.duration)
                sampler.cancel_scope.cancel()
            cpu_used = cpu_seconds(pids) - cpu_start
            window = await normal.ask("window")
            slow_stats = await slow.ask("stats")
            metrics = await hub_metrics(bench.http)
            # What the slow one missed, once it reads at full speed again (the `lagged` frames
            # sit behind what it has not read).
            slow_drained = await slow.ask("drain 30")
            final_answers = await fleet.ask("stop 60")
            final = merge_counts(final_answers)
            totals = await normal.ask(f"expect {final['sent']}")
            nursery.cancel_scope.cancel()
        lat = window["latencies_ms"]
        return {
            "scenario": "slow-dashboard",
            "devices": args.devices,
            "rate_per_device": args.rate,
            "duration_s": args.duration,
            "slow_read_rate": args.slow_read_rate,
            "connect_s": online["connect_s"],
            "sent": final["sent"],
            "all_acked": all(a["all_acked"] for a in final_answers),
            "delivered": totals["received"],
            "latency_ms_p50": round(percentile(lat, 0.50), 1),
            "latency_ms_p99": round(percentile(lat, 0.99), 1),
            "latency_ms_max": round(max(lat) if lat else float("nan"), 1),
            "latency_p99_per_5s": window["p99_per_5s"],
            "normal_lagged": totals["lagged"],
            "slow_frames_read": slow_stats["frames"] - slow_start["frames"],
            "slow_updates_read": slow_stats["received"] - slow_start["received"],
            "slow_caught_up_after_drain": slow_drained["caught_up"],
            "slow_lagged_messages": slow_drained["lagged_messages"],
            "slow_dropped": slow_drained["lagged"],
            "hub_dropped_total": metrics.get("ems_dashboard_dropped_total"),
            "hub_cpu_percent": round(100 * cpu_used / args.duration, 1),
            "hub_rss_mb_start": round(rss.samples[0] / 2**20, 1),
            "hub_rss_mb_max": round(rss.max / 2**20, 1),
            "hub_rss_mb_end": round(rss.samples[-1] / 2**20, 1),
            "hub_rss_mb_per_s": [round(s / 2**20, 1) for s in rss.samples],
        }
    finally:
        bench.close()
        bench.remove_data()


RUNNERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "steady": steady,
    "connect-storm": connect_storm,
    "reconnect-storm": reconnect_storm,
    "slow-dashboard": slow_dashboard,
}


# --- reporting -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "packages": {
            p: version(p)
            for p in (
                "trio",
                "hypercorn",
                "quart-trio",
                "trio-websocket",
                "wsproto",
                "orjson",
                "cattrs",
            )
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def _lat(r: dict[str, Any]) -> str:
    return f"{r['latency_ms_p50']} / {r['latency_ms_p99']} / {r['latency_ms_max']}"


def _retries(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "0"


Column = tuple[str, Callable[[dict[str, Any]], Any]]

COLUMNS: dict[str, list[Column]] = {
    "steady": [
        ("devices", lambda r: r["devices"]),
        ("rate", lambda r: f"{r['rate_per_device']}/s x {r['samples_per_message']}"),
        ("duration", lambda r: f"{r['duration_s']} s"),
        ("delivered/sent", lambda r: f"{r['delivered']}/{r['sent']}"),
        ("stored", lambda r: r["stored"]),
        ("all acked", lambda r: "yes" if r["all_acked"] else "NO"),
        ("latency ms p50 / p99 / max", _lat),
        ("hub CPU-s per 1k samples", lambda r: r["hub_cpu_s_per_1000_samples"]),
        ("hub CPU", lambda r: f"{r['hub_cpu_percent']}%"),
        ("fleet CPU", lambda r: f"{r['fleet_cpu_percent']}% ({r['fleet_procs']} proc)"),
        ("hub RSS KiB/conn", lambda r: r["hub_rss_kb_per_connection"]),
    ],
    "throughput": [
        ("devices", lambda r: r["devices"]),
        ("batch", lambda r: r["samples_per_message"]),
        ("duration", lambda r: f"{r['duration_s']} s"),
        ("samples/s sent", lambda r: r["samples_per_s"]),
        ("stored/s", lambda r: r["stored_per_s"]),
        ("delivered/s", lambda r: r["delivered_per_s"]),
        ("delivered/sent", lambda r: f"{r['delivered']}/{r['sent']}"),
        ("stored", lambda r: r["stored"]),
        ("all acked", lambda r: "yes" if r["all_acked"] else "NO"),
        ("latency ms p50 / p99 / max", _lat),
        ("hub CPU", lambda r: f"{r['hub_cpu_percent']}%"),
        ("hub µs/sample", lambda r: round(1000 * r["hub_cpu_s_per_1000_samples"], 1)),
        ("fleet CPU", lambda r: f"{r['fleet_cpu_percent']}% ({r['fleet_procs']} proc)"),
        ("fleet µs/sample", lambda r: r["fleet_cpu_us_per_sample"]),
    ],
    "connect-storm": [
        ("devices", lambda r: r["devices"]),
        ("fleet procs", lambda r: r["fleet_procs"]),
        ("online", lambda r: f"{r['online']} (hub: {r['hub_says_connected']})"),
        ("all online after", lambda r: f"{r['all_online_s']} s"),
        (
            "welcome s p50 / p99 / max",
            lambda r: f"{r['welcome_s_p50']} / {r['welcome_s_p99']} / {r['welcome_s_max']}",
        ),
        ("retries until online", lambda r: _retries(r["retries_until_online"])),
        ("hub CPU-s", lambda r: r["hub_cpu_s"]),
        ("fleet CPU-s", lambda r: r["fleet_cpu_s"]),
        ("hub RSS peak MB", lambda r: r["hub_rss_mb_peak"]),
        ("hub RSS KiB/conn", lambda r: r["hub_rss_kb_per_connection"]),
    ],
    "reconnect-storm": [
        ("devices", lambda r: r["devices"]),
        ("rate", lambda r: f"{r['rate_per_device']}/s"),
        ("hub stop / start", lambda r: f"{r['hub_stop_s']} / {r['hub_start_s']} s"),
        ("all welcomed again", lambda r: f"{r['all_welcomed_s']} s"),
        ("all streaming again", lambda r: f"{r['all_streaming_s']} s"),
        ("retries", lambda r: _retries(r["retries_in_storm"])),
        (
            "rows / distinct (device, seq) / sent / unacked at end",
            lambda r: (
                f"{r['rows']} / {r['distinct_device_seq']} / {r['expected_rows']}"
                f" / {r['unacked_at_end']}"
            ),
        ),
        ("acked stored exactly once", lambda r: "yes" if r["exact"] else "NO"),
    ],
    "slow-dashboard": [
        ("devices", lambda r: f"{r['devices']} x {r['rate_per_device']}/s"),
        ("duration", lambda r: f"{r['duration_s']} s"),
        ("normal delivered/sent", lambda r: f"{r['delivered']}/{r['sent']}"),
        ("normal latency ms p50 / p99 / max", _lat),
        ("normal p99 per 5 s", lambda r: " ".join(str(x) for x in r["latency_p99_per_5s"])),
        (
            "slow: updates read / lagged msgs / dropped",
            lambda r: (
                f"{r['slow_updates_read']} / {r['slow_lagged_messages']} / {r['slow_dropped']}"
            ),
        ),
        (
            "hub RSS MB start / max / end",
            lambda r: f"{r['hub_rss_mb_start']} / {r['hub_rss_mb_max']} / {r['hub_rss_mb_end']}",
        ),
        ("hub CPU", lambda r: f"{r['hub_cpu_percent']}%"),
    ],
}


def table_kind(r: dict[str, Any]) -> str:
    return r["scenario"]


def header(kind: str) -> str:
    names = [name for name, _ in COLUMNS[kind]]
    return "| " + " | ".join(names) + " |\n|" + " --- |" * len(names)


def markdown_row(r: dict[str, Any]) -> str:
    return "| " + " | ".join(str(get(r)) for _, get in COLUMNS[table_kind(r)]) + " |"


HEADER = header("steady")


def failed(r: dict[str, Any]) -> bool:
    kind = r["scenario"]
    if kind == "steady":
        return r["delivered"] < r["sent"] or r["stored"] < r["sent"] or not r["all_acked"]
    if kind == "throughput":
        # A dashboard that cannot keep up with 50,000 updates a second is sent `lagged` with
        # the count it missed (the contract's rule): each sample delivered or counted there.
        missed = r["sent"] - r["delivered"] - r["lagged"]
        return missed > 0 or r["stored"] < r["sent"] or not r["all_acked"]
    if kind == "connect-storm":
        return r["all_online_s"] is None
    if kind == "reconnect-storm":
        return not (r["exact"] and r["all_acked"]) or r["all_streaming_s"] is None
    return r["delivered"] < r["sent"] or not r["all_acked"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=SCENARIOS, default="steady")
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument(
        "--rate", type=float, default=1.0, help="messages/s per device; 0: as fast as acks allow"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per message")
    parser.add_argument("--metrics", type=int, default=5)
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="measured window (connect-storm: how long to wait for all online; "
        "reconnect-storm: streaming before and after the restart)",
    )
    parser.add_argument("--workers", type=int, default=1, help="hypercorn workers")
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="the hub on a private PostgreSQL and Redis (EMS_DATABASE_URL, EMS_REDIS_URL), "
        "as several workers need; steady scenario",
    )
    parser.add_argument(
        "--fleet-procs", type=int, default=1, help="processes the devices are split across"
    )
    parser.add_argument(
        "--hub-env",
        nargs="*",
        type=lambda s: tuple(s.split("=", 1)),
        help="EMS_X=value for the hub",
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=100.0,
        help="connections started per second at most (not in connect-storm)",
    )
    parser.add_argument(
        "--slow-read-rate", type=float, default=10.0, help="slow-dashboard: messages/s it reads"
    )
    parser.add_argument(
        "--back-timeout", type=float, default=120.0, help="reconnect-storm: longest wait"
    )
    parser.add_argument(
        "--ignore-goaway", action="store_true", help="devices reconnect without the hub's delay"
    )
    parser.add_argument(
        "--short-backoff",
        action="store_true",
        help="retry after 0.25-1 s every time, not the agent's exponential backoff",
    )
    parser.add_argument("--label", help="results file prefix (default: the scenario)")
    parser.add_argument("--keep-data", action="store_true", help="keep the hub's data directory")
    parser.add_argument("--hub", help="use a running hub at http://127.0.0.1:PORT")
    parser.add_argument("--hub-data", help="that hub's EMS_DATA_DIR parent (for the row count)")
    parser.add_argument("--hub-pid", help="that hub's process id (for CPU and RSS)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: a dashboard process
    parser.add_argument("--probe-read-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a fleet process
    args = parser.parse_args()
    if args.probe:
        trio.run(probe_main, args.probe, args.probe_read_rate)
        return
    if args.worker:
        trio.run(worker_main, json.loads(Path(args.worker).read_text()))
        return
    if args.hub and args.scenario != "steady":
        parser.error("--hub works with the steady scenario only")
    label = args.label or ("throughput" if args.rate <= 0 else args.scenario)
    # SIGTERM (and SIGINT, which a shell ignores for background jobs) end the run through the
    # same path as Ctrl-C: the hub and the child processes are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise_nofile_limit()
    RESULTS.mkdir(exist_ok=True)
    results = []
    print(f"fleet benchmark: {vars(args)}")
    kind = "throughput" if args.scenario == "steady" and args.rate <= 0 else args.scenario
    print(header(kind), flush=True)
    for count in args.devices:
        one = argparse.Namespace(**{**vars(args), "devices": count})
        result = trio.run(RUNNERS[args.scenario], one)
        results.append(result)
        print(markdown_row(result), flush=True)
    out = {"machine": machine_info(), "scenario": kind, "args": vars(args), "results": results}
    path = RESULTS / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")
    if any(failed(r) for r in results):
        print("FAILED: loss, missing acks, or not all devices online/back", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
