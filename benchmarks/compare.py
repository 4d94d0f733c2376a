"""Comparison scenario: the same steady workload against EMS and two reference Python hubs.

For each hub (`ems`, `fastapi`, `socketio`), in turn and started fresh: N devices in this
process (trio-websocket, one connection each, starts and sends staggered evenly over a second)
send one telemetry message per second, 1 sample x 5 metrics, and one dashboard in a process of
its own counts what it receives and the latency (sample `ts` to receive time, same clock).
Once every device is connected (EMS: welcomed), the measurement starts: the devices send for
the window (`--duration`), then stop, and it ends when the dashboard has every sample sent (EMS:
and every sample is acked). The hub's CPU over it (its whole process tree, utime + stime from
/proc) is divided by the samples the dashboard received over it. Ending on the drain rather than
the clock keeps a hub that falls behind from looking cheaper or dearer than it is; the backlog
(sent, not yet delivered) at the window's start and end says whether it kept up, and the
machine's other load (`others`: all CPU of the machine minus hub, fleet and dashboard) is shown
because the machine may be shared.

- `ems`: `hypercorn -k trio ems.hub:app` through `fleet.py`'s `HubUnderTest` (devices created
  over REST by its `create_devices`; a `DeviceSession` per device here). It validates, fans
  out, stores every sample in SQLite and acks it; `stored` counts the rows afterwards.
  `--ems-ref HEAD` runs a commit's `ems/` instead of the checked-out tree.
- `fastapi`: `peers/fastapi_hub.py`, FastAPI under uvicorn, pydantic validation, forwards each
  frame. Stores nothing, acks nothing.
- `socketio`: `peers/socketio_hub.py`, python-socketio (ASGI, uvicorn), room `dashboards`.
  Devices and dashboard speak Engine.IO 4 / Socket.IO 5 over a raw trio-websocket.
- `floor-*` (only when named in `--only`): `peers/asgi_floor.py`, one raw ASGI app with no
  framework and no work, under hypercorn on trio or uvicorn on asyncio: what the serving stack
  alone costs. `floor-hypercorn-ems` / `floor-uvicorn-ems` send EMS's frames (an `ack` per
  message, dashboard updates in `batch` frames every 20 ms); `floor-hypercorn` /
  `floor-uvicorn` forward each sample in a frame of its own as the FastAPI peer does, and the
  `-ack` variants add an `ack` per message to that.

    python benchmarks/compare.py --devices 2000 --duration 30
    python benchmarks/compare.py --devices 2000 --duration 30 \
        --only ems fastapi floor-hypercorn-ems floor-uvicorn-ems

Prints a markdown table and the ratios "EMS / socketio" and "EMS / FastAPI" of hub CPU-seconds
per 1,000 delivered samples; JSON (machine info, package versions) goes to
benchmarks/results/compare-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import random
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio
from fleet import HubUnderTest, create_devices, machine_info
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from ems.protocol import messages as m
from ems.protocol.codec import Codec
from ems.protocol.device_session import Acked, DeviceSession, GoingAway, LinkDead, Welcomed

HERE = Path(__file__).parent
RESULTS = HERE / "results"
HUBS = ("ems", "fastapi", "socketio")
FLOORS = (
    "floor-hypercorn-ems",
    "floor-uvicorn-ems",
    "floor-hypercorn",
    "floor-uvicorn",
    "floor-hypercorn-ack",
    "floor-uvicorn-ack",
)
"""Not run unless named in `--only`: the serving stacks alone (`peers/asgi_floor.py`)."""
FLOOR = HERE / "peers" / "asgi_floor.py"
PEER_COMMANDS = {
    "fastapi": [HERE / "peers" / "fastapi_hub.py"],
    "socketio": [HERE / "peers" / "socketio_hub.py"],
    "floor-hypercorn": [FLOOR, "--server", "hypercorn"],
    "floor-uvicorn": [FLOOR, "--server", "uvicorn"],
    "floor-hypercorn-ack": [FLOOR, "--server", "hypercorn", "--ack"],
    "floor-uvicorn-ack": [FLOOR, "--server", "uvicorn", "--ack"],
    "floor-hypercorn-ems": [FLOOR, "--server", "hypercorn", "--ack", "--batch"],
    "floor-uvicorn-ems": [FLOOR, "--server", "uvicorn", "--ack", "--batch"],
}
PEER_TOKEN = "bench-secret"
CODEC = Codec()
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"
CLIENT_ERRORS = (
    OSError,
    HandshakeError,
    ConnectionClosed,
    ConnectionError,
    trio.BrokenResourceError,
)


def leaves(exc: BaseException) -> Any:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def tree_pids(pid: int) -> list[int]:
    """The process and all its descendants (hypercorn forks a worker; uvicorn does not here)."""
    pids = [pid]
    index = 0
    while index < len(pids):
        try:
            for task in Path(f"/proc/{pids[index]}/task").iterdir():
                pids.extend(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            pass
        index += 1
    return pids


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def read_lines(stream: Any) -> Any:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode(errors="replace")


# --- the peer hubs ---------------------------------------------------------------------------


@attrs.define(eq=False)
class PeerHub:
    """A reference hub as a subprocess; started once it prints its `listening on` line."""

    command: list[Any]
    process: trio.Process | None = None
    port: int = 0
    output: list[str] = attrs.field(factory=list)

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await trio.lowlevel.open_process(
            [sys.executable, *map(str, self.command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PEER_TOKEN": PEER_TOKEN},
            start_new_session=True,
        )
        with trio.fail_after(30):
            await nursery.start(self._read_output)

    async def _read_output(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self.process is not None
        started = False
        async for line in read_lines(self.process.stdout):
            self.output = [*self.output[-200:], line]
            match = LISTENING.search(line)
            if not started and match:
                self.port = int(match.group(1))
                started = True
                task_status.started()
        if not started:
            raise RuntimeError(f"{self.command} did not start:\n" + "\n".join(self.output))

    async def stop(self) -> None:
        if self.process is None:
            return
        with trio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await self.process.wait()
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.process.wait()


# --- the fleet: N devices in this process, one trio-websocket connection each ------------------


async def sio_handshake(ws: Any) -> None:
    """Engine.IO open packet, then the Socket.IO connect to the default namespace."""
    opening = await ws.get_message()
    if not opening.startswith("0"):
        raise ConnectionError(f"expected an Engine.IO open packet, got {opening[:80]!r}")
    await ws.send_message("40")
    connected = await ws.get_message()
    if not connected.startswith("40"):
        raise ConnectionError(f"Socket.IO connect refused: {connected[:80]!r}")


@attrs.define(eq=False)
class Device:
    device_id: str
    token: str
    sent: int = 0
    last_seq: int = 0
    acked_seq: int = 0
    connects: int = 0
    refused: int = 0
    last_ts: float = 0.0
    outbox: dict[int, str] = attrs.field(factory=dict)
    """EMS: messages not acked yet, resent on a new connection."""
    counted: bool = False
    drained: bool = False


@attrs.define(eq=False)
class Fleet:
    """The same devices for the three hubs: one telemetry message per interval, the same
    payload (`{"type":"telemetry","seq","samples":[{"ts","data"}]}`, orjson); EMS devices add
    what the contract asks of them (hello, heartbeats, resend until acked) through
    `DeviceSession`, Socket.IO devices wrap the message in an event and answer pings."""

    kind: str
    url: str
    devices: list[Device]
    rate: float
    metrics: int
    stop_sending: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    """Set once the dashboard has everything: then the devices disconnect."""
    online: int = 0
    all_online: trio.Event = attrs.field(factory=trio.Event)
    drained: int = 0
    all_acked: trio.Event = attrs.field(factory=trio.Event)
    errors: int = 0
    failures: Counter[str] = attrs.field(factory=Counter)
    """Why connections ended early (exception names), for the report."""

    def endpoint(self, device: Device) -> str:
        if self.kind == "socketio":
            return f"{self.url}{SIO_PATH}&device_id={device.device_id}"
        return f"{self.url}/ws/device/{device.device_id}"

    def connected(self, device: Device) -> None:
        if not device.counted:
            device.counted = True
            self.online += 1
            if self.online == len(self.devices):
                self.all_online.set()

    def next_message(self, device: Device, rng: random.Random) -> tuple[int, str]:
        # ts grows strictly per device even when a send runs late
        now_ms = max(time.time() * 1000.0, device.last_ts + 1.0)
        device.last_ts = now_ms
        seq = device.last_seq + 1
        data = {f"m{k}": round(rng.uniform(0, 100), 2) for k in range(self.metrics)}
        message = {"type": "telemetry", "seq": seq, "samples": [{"ts": now_ms, "data": data}]}
        if self.kind == "socketio":
            text = "42" + orjson.dumps(["telemetry", message]).decode()
        else:
            text = orjson.dumps(message).decode()
        device.last_seq = seq
        device.sent += 1
        return seq, text

    def start_draining(self) -> None:
        """After `stop_sending`: `all_acked` once every EMS device's outbox is empty."""
        for device in self.devices:
            self.check_drained(device)
        if self.drained == len(self.devices):
            self.all_acked.set()

    def check_drained(self, device: Device) -> None:
        if self.stop_sending.is_set() and not device.outbox and not device.drained:
            device.drained = True
            self.drained += 1
            if self.drained == len(self.devices):
                self.all_acked.set()

    async def run_device(self, device: Device, start_delay: float) -> None:
        await trio.sleep(start_delay)
        rng = random.Random(device.device_id)
        while not self.done.is_set():
            try:
                async with open_websocket_url(
                    self.endpoint(device),
                    extra_headers=[("Authorization", f"Bearer {device.token}")],
                ) as ws:
                    device.connects += 1
                    if self.kind == "ems":
                        await EmsLink(self, device, ws, rng).run()
                    else:
                        await self.peer_link(device, ws, rng)
                return
            except* CLIENT_ERRORS as group:
                device.refused += 1
                self.failures.update(type(e).__name__ for e in leaves(group))
            # reconnect after a random pause, like an agent
            await trio.sleep(rng.uniform(0.5, 2.0))

    async def peer_link(self, device: Device, ws: Any, rng: random.Random) -> None:
        if self.kind == "socketio":
            await sio_handshake(ws)
        self.connected(device)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.peer_reader, ws)
            next_at = trio.current_time()
            while not self.stop_sending.is_set():
                _, text = self.next_message(device, rng)
                await ws.send_message(text)
                next_at += 1.0 / self.rate
                await trio.sleep_until(next_at)
            await self.done.wait()
            nursery.cancel_scope.cancel()

    async def peer_reader(self, ws: Any) -> None:
        while True:
            text = await ws.get_message()
            if text == "2":  # Engine.IO ping from the server
                await ws.send_message("3")


@attrs.define(eq=False)
class EmsLink:
    """One EMS device connection: hello/welcome, window of unacked messages, heartbeats."""

    fleet: Fleet
    device: Device
    ws: Any
    rng: random.Random
    session: DeviceSession = attrs.field(init=False)
    send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)

    def __attrs_post_init__(self) -> None:
        self.session = DeviceSession(
            hello=m.Hello(stream=f"compare-{self.device.device_id}", agent="ems-compare/1"),
            now=trio.current_time(),
            codec=CODEC,  # one for all: building a Codec takes tens of milliseconds
            wall_clock=time.time,
        )

    async def run(self) -> None:
        await self.flush()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reader)
            nursery.start_soon(self.ticker)
            nursery.start_soon(self.producer)
            await self.fleet.done.wait()
            nursery.cancel_scope.cancel()

    async def flush(self) -> None:
        # One sender at a time: frames leave in seq order (the contract's rule).
        async with self.send_lock:
            session = self.session
            if session.state.value == "open":
                for seq in sorted(s for s in self.device.outbox if s > session.sent_high):
                    if session.window_free() <= 0:
                        break
                    session.send_reliable(seq, self.device.outbox[seq], trio.current_time())
            for text in session.data_to_send():
                await self.ws.send_message(text)

    async def reader(self) -> None:
        session = self.session
        device = self.device
        while True:
            session.receive_text(await self.ws.get_message(), trio.current_time())
            while (event := session.next_event()) is not None:
                if isinstance(event, Welcomed):
                    self.fleet.connected(device)
                elif isinstance(event, Acked):
                    for seq in [s for s in device.outbox if s <= event.seq]:
                        del device.outbox[seq]
                    device.acked_seq = max(device.acked_seq, event.seq)
                    self.fleet.check_drained(device)
                elif isinstance(event, LinkDead):
                    self.fleet.failures[f"link dead: {event.reason}"] += 1
                    raise ConnectionError(event.reason)
                elif isinstance(event, GoingAway):
                    self.fleet.failures["goaway"] += 1
                    raise ConnectionError("goaway")
                elif type(event).__name__ in ("ErrorReceived", "BadFrame"):
                    self.fleet.errors += 1
            await self.flush()

    async def producer(self) -> None:
        next_at = trio.current_time()
        while not self.fleet.stop_sending.is_set():
            seq, text = self.fleet.next_message(self.device, self.rng)
            self.device.outbox[seq] = text
            await self.flush()
            next_at += 1.0 / self.fleet.rate
            await trio.sleep_until(next_at)

    async def ticker(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.session.handle_timer(trio.current_time())
            await self.flush()


# --- the dashboard probe (a process of its own) ----------------------------------------------


@attrs.define(eq=False)
class Probe:
    kind: str
    url: str
    token: str
    latencies_ms: list[float] = attrs.field(factory=list)
    received: int = 0
    lagged: int = 0
    ready: trio.Event = attrs.field(factory=trio.Event)
    all_received: trio.Event = attrs.field(factory=trio.Event)
    expected: float = float("inf")

    def expect(self, total: int) -> None:
        self.expected = total
        if self.received >= total:
            self.all_received.set()

    def update(self, item: dict[str, Any], now_ms: float) -> None:
        self.received += 1
        self.latencies_ms.append(now_ms - item["ts"])
        if self.received >= self.expected:
            self.all_received.set()

    async def run(self) -> None:
        headers = [("Authorization", f"Bearer {self.token}")]
        if self.kind == "socketio":
            async with open_websocket_url(
                f"{self.url}{SIO_PATH}&role=dashboard", extra_headers=headers
            ) as ws:
                await self.run_socketio(ws)
        else:
            async with open_websocket_url(f"{self.url}/ws/dashboard", extra_headers=headers) as ws:
                await self.run_plain(ws)

    async def run_plain(self, ws: Any) -> None:
        """EMS and the FastAPI peer: subscribe, then `telemetry_update`s (EMS may batch)."""
        await ws.send_message('{"type":"subscribe","devices":["*"]}')
        while True:
            frame = orjson.loads(await ws.get_message())
            now_ms = time.time() * 1000.0
            items = frame["messages"] if frame["type"] == "batch" else [frame]
            for item in items:
                kind = item["type"]
                if kind == "telemetry_update":
                    self.update(item, now_ms)
                elif kind == "subscribed":
                    self.ready.set()
                elif kind == "lagged":
                    self.lagged += item["dropped"]

    async def run_socketio(self, ws: Any) -> None:
        await sio_handshake(ws)
        await ws.send_message('421["subscribe"]')  # with ack id 1
        while True:
            text = await ws.get_message()
            now_ms = time.time() * 1000.0
            if text.startswith("42"):
                name, item = orjson.loads(text[2:])
                if name == "telemetry_update":
                    self.update(item, now_ms)
            elif text == "2":
                await ws.send_message("3")
            elif text.startswith("431"):
                if orjson.loads(text[3:]) != [True]:
                    raise ConnectionError(f"subscribe refused: {text!r}")
                self.ready.set()


async def probe_main(kind: str, url: str) -> None:
    """Line protocol on stdin/stdout, one JSON line back per command: `ready` once subscribed;
    `reset` starts the measurement (answers what arrived before); `window` answers what arrived
    since; `expect N` answers totals and the latencies since `reset` once N arrived in all."""
    gc.freeze()
    probe = Probe(kind, url, os.environ["COMPARE_TOKEN"])
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await probe.ready.wait()
        print("ready", flush=True)
        window_start = 0
        async for line in read_lines(stdin):
            command, _, argument = line.strip().partition(" ")
            answer: dict[str, Any] = {}
            if command == "reset":
                probe.latencies_ms.clear()
                window_start = probe.received
                answer = {"received_before": window_start}
            elif command == "window":
                answer = {"received": probe.received - window_start}
            elif command == "expect":
                probe.expect(int(argument))
                with trio.move_on_after(60):
                    await probe.all_received.wait()
                answer = {
                    "received": probe.received,
                    "lagged": probe.lagged,
                    "measured": probe.received - window_start,
                    "latencies_ms": [round(x, 2) for x in probe.latencies_ms],
                }
            print(orjson.dumps(answer).decode(), flush=True)


@attrs.define(eq=False)
class ProbeProcess:
    kind: str
    url: str
    token: str
    process: trio.Process | None = None
    _lines: Any = None

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, __file__, "--probe", self.kind, self.url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "COMPARE_TOKEN": self.token},
                check=False,
            )
        )
        self._lines = read_lines(self.process.stdout)
        with trio.fail_after(30):
            line = await self._line()
        if line != "ready":
            raise RuntimeError(f"probe: {line!r}")

    async def _line(self) -> str:
        return (await self._lines.__anext__()).strip()

    async def ask(self, command: str) -> Any:
        assert self.process is not None
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")
        return orjson.loads(await self._line())


# --- one hub -----------------------------------------------------------------------------------


async def run_hub(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    ems_hub: HubUnderTest | None = None
    peer_hub: PeerHub | None = None
    result: dict[str, Any] = {"hub": kind, "stores_and_acks": kind == "ems"}
    try:
        async with trio.open_nursery() as nursery:
            if kind == "ems":
                ems_hub = HubUnderTest(workdir)
                await trio.to_thread.run_sync(ems_hub.start)
                assert ems_hub.process is not None
                port, hub_pid = ems_hub.port, ems_hub.process.pid
                created = await create_devices(f"http://127.0.0.1:{port}", args.devices)
                token = created[0].admin_token
                devices = [Device(d.device_id, d.token) for d in created]
            else:
                peer_hub = PeerHub(PEER_COMMANDS[kind])
                await peer_hub.start(nursery)
                assert peer_hub.process is not None
                port, hub_pid = peer_hub.port, peer_hub.process.pid
                devices = [Device(f"bench-{i:05d}", PEER_TOKEN) for i in range(args.devices)]
                token = PEER_TOKEN
            url = f"ws://127.0.0.1:{port}"
            fleet = Fleet(kind, url, devices, args.rate, args.metrics)
            # The fleet is a Python process with thousands of connections: keep its collector
            # from pausing it (as fleet.py does).
            gc.collect()
            gc.freeze()
            gc.set_threshold(10_000, 10, 10)
            rss_before = rss_bytes(tree_pids(hub_pid))
            probe = ProbeProcess(kind, url, token)
            await probe.start(nursery)
            connect_started = time.monotonic()
            for index, device in enumerate(devices):
                nursery.start_soon(fleet.run_device, device, index / len(devices) / args.rate)
            with trio.move_on_after(180):
                await fleet.all_online.wait()
            result["connect_s"] = round(time.monotonic() - connect_started, 2)
            result["online"] = fleet.online
            pids = tree_pids(hub_pid)
            assert probe.process is not None
            others = [os.getpid(), probe.process.pid]
            rss_connected = rss_bytes(pids)
            # The measurement: from here through the window (devices sending) and the drain
            # (until the dashboard has every sample sent; EMS: and every sample is acked).
            cpu_start = cpu_seconds(pids)
            fleet_cpu_start = [cpu_seconds([pid]) for pid in others]
            machine_start = machine_ticks()
            started = time.monotonic()
            sent_start = sum(d.sent for d in devices)
            before = await probe.ask("reset")
            await trio.sleep(args.duration)  # the window
            fleet.stop_sending.set()
            total_sent = sum(d.sent for d in devices)
            at_window_end = await probe.ask("window")
            if kind == "ems":
                fleet.start_draining()
                with trio.move_on_after(60):
                    await fleet.all_acked.wait()
            totals = await probe.ask(f"expect {total_sent}")
            measured_s = time.monotonic() - started
            cpu_used = cpu_seconds(pids) - cpu_start
            fleet_cpu_used, probe_cpu_used = (
                cpu_seconds([pid]) - start
                for pid, start in zip(others, fleet_cpu_start, strict=True)
            )
            machine_busy = machine_ticks_busy(machine_start)
            fleet.done.set()
            nursery.cancel_scope.cancel()
    finally:
        if ems_hub is not None:
            await trio.to_thread.run_sync(ems_hub.stop)
        if peer_hub is not None:
            await peer_hub.stop()
    if kind == "ems":
        with sqlite3.connect(workdir / "data" / "ems.db") as db:
            result["stored"] = db.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        result["all_acked"] = all(d.acked_seq >= d.last_seq for d in devices)
    lat = totals["latencies_ms"]
    measured = totals["measured"]
    result.update(
        {
            "devices": args.devices,
            "window_s": args.duration,
            "measured_s": round(measured_s, 2),
            "sent": total_sent,
            "delivered": totals["received"],
            "lagged": totals["lagged"],
            "sent_in_window": total_sent - sent_start,
            "delivered_measured": measured,
            "backlog_at_start": sent_start - before["received_before"],
            "backlog_at_window_end": total_sent
            - before["received_before"]
            - at_window_end["received"],
            "samples_per_s": round(measured / args.duration, 1),
            "reconnects": sum(max(0, d.connects - 1) for d in devices),
            "refused": sum(d.refused for d in devices),
            "error_frames": fleet.errors,
            "connection_failures": dict(fleet.failures),
            "latency_ms_p50": round(percentile(lat, 0.50), 1),
            "latency_ms_p99": round(percentile(lat, 0.99), 1),
            "latency_ms_max": round(max(lat) if lat else float("nan"), 1),
            "hub_cpu_s": round(cpu_used, 2),
            "hub_cpu_percent": round(100 * cpu_used / measured_s, 1),
            "hub_cpu_s_per_1000_delivered": round(1000 * cpu_used / max(measured, 1), 4),
            "hub_processes": len(pids),
            "hub_rss_mb": round(rss_connected / 2**20, 1),
            "hub_rss_kb_per_connection": round(
                (rss_connected - rss_before) / 1024 / max(args.devices, 1), 1
            ),
            "fleet_cpu_percent": round(100 * fleet_cpu_used / measured_s, 1),
            "dashboard_cpu_percent": round(100 * probe_cpu_used / measured_s, 1),
            "machine_cpu_percent": round(machine_busy, 1),
            "others_cpu_percent": round(
                machine_busy - 100 * (cpu_used + fleet_cpu_used + probe_cpu_used) / measured_s, 1
            ),
        }
    )
    return result


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def machine_ticks_busy(start: tuple[int, int]) -> float:
    """Percent of one core that all processes of the machine used since `start` (2 cores:
    up to 200)."""
    busy, total = machine_ticks()
    return 100 * (os.cpu_count() or 1) * (busy - start[0]) / max(total - start[1], 1)


# --- report ------------------------------------------------------------------------------------

NAMES = {
    "ems": "EMS (hypercorn, trio)",
    "fastapi": "FastAPI + uvicorn",
    "socketio": "python-socketio",
    "floor-hypercorn": "floor: raw ASGI, hypercorn + trio",
    "floor-uvicorn": "floor: raw ASGI, uvicorn + asyncio",
    "floor-hypercorn-ack": "floor + ack per frame: hypercorn + trio",
    "floor-uvicorn-ack": "floor + ack per frame: uvicorn + asyncio",
    "floor-hypercorn-ems": "floor, EMS's frames (ack + batches): hypercorn + trio",
    "floor-uvicorn-ems": "floor, EMS's frames (ack + batches): uvicorn + asyncio",
}
HEADER = (
    "| hub | stores + acks | delivered/sent | measured: delivered, s (window + drain) "
    "| backlog at window start / end | latency ms p50 / p99 / max | hub CPU "
    "| hub CPU-s per 1k delivered | EMS / this | hub RSS MiB (KiB/conn) "
    "| fleet / dashboard / others' CPU |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def markdown_row(r: dict[str, Any], ems: dict[str, Any] | None) -> str:
    ratio = "-"
    if ems is not None and r["hub_cpu_s_per_1000_delivered"] > 0:
        ratio = f"{ems['hub_cpu_s_per_1000_delivered'] / r['hub_cpu_s_per_1000_delivered']:.2f}"
    stores = "no"
    if r["stores_and_acks"]:
        stores = f"yes ({r['stored']} stored, all acked: {'yes' if r['all_acked'] else 'NO'})"
    cells = [
        NAMES[r["hub"]],
        stores,
        f"{r['delivered']}/{r['sent']}",
        f"{r['delivered_measured']}, {r['window_s']:g} + {r['measured_s'] - r['window_s']:.1f}",
        f"{r['backlog_at_start']} / {r['backlog_at_window_end']}",
        f"{r['latency_ms_p50']} / {r['latency_ms_p99']} / {r['latency_ms_max']}",
        f"{r['hub_cpu_percent']}%",
        r["hub_cpu_s_per_1000_delivered"],
        ratio,
        f"{r['hub_rss_mb']} ({r['hub_rss_kb_per_connection']})",
        f"{r['fleet_cpu_percent']}% / {r['dashboard_cpu_percent']}% / {r['others_cpu_percent']}%",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


RATIOS = (
    ("ems", "socketio", "EMS / socketio"),
    ("ems", "fastapi", "EMS / FastAPI"),
    # What the serving stack allows: EMS against a no-work app with its frames on its server,
    # and that app against FastAPI and against itself on uvicorn.
    ("ems", "floor-hypercorn-ems", "EMS / floor on hypercorn"),
    ("floor-hypercorn-ems", "fastapi", "floor on hypercorn / FastAPI"),
    ("floor-hypercorn-ems", "floor-uvicorn-ems", "floor: hypercorn / uvicorn"),
)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for top, bottom, label in RATIOS:
        if top in results and bottom in results:
            below = results[bottom]["hub_cpu_s_per_1000_delivered"]
            if below > 0:
                out[label] = round(results[top]["hub_cpu_s_per_1000_delivered"] / below, 3)
    return out


def git(*argv: str) -> str:
    done = subprocess.run(["git", *argv], cwd=HERE, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def ems_source(ref: str | None) -> dict[str, Any]:
    """Which EMS the hub ran: a commit's `ems/`, or the checked-out tree (and whether `ems/`
    had uncommitted changes then)."""
    if ref:
        return {"ref": ref, "commit": git("rev-parse", ref), "ems_dirty": False}
    dirty = bool(git("status", "--short", "--", "../ems"))
    return {"ref": "checked-out tree", "commit": git("rev-parse", "HEAD"), "ems_dirty": dirty}


def export_ems(ref: str, into: Path) -> None:
    """`ems/` of `ref` into `into`, ahead of the editable install on PYTHONPATH; the hub (a
    subprocess started by `HubUnderTest`, which copies this environment) imports it from there."""
    archive = subprocess.run(
        ["git", "archive", ref, "ems"], cwd=HERE.parent, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(into), os.environ.get("PYTHONPATH")) if p
    )


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds the devices send (the drain is added)"
    )
    parser.add_argument("--rate", type=float, default=1.0, help="messages/s per device")
    parser.add_argument("--metrics", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=HUBS + FLOORS, default=list(HUBS))
    parser.add_argument("--label", default="compare")
    parser.add_argument(
        "--ems-ref",
        help="run the EMS hub from this commit's `ems/` (git archive, first on PYTHONPATH) "
        "instead of the checked-out tree, e.g. HEAD while ems/ has uncommitted edits",
    )
    parser.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)  # internal: the dashboard
    args = parser.parse_args()
    if args.probe:
        trio.run(probe_main, *args.probe)
        return
    if args.rate <= 0:
        parser.error("--rate must be positive (the steady scenario)")
    # Hubs inherit this too: each side holds one descriptor per device and then some.
    raise_fd_limit(args.devices * 2 + 256)
    RESULTS.mkdir(exist_ok=True)
    kinds = [k for k in HUBS + FLOORS if k in args.only]
    print(f"comparison: {vars(args)}", flush=True)
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="compare-ems-src-") as exported:
        if args.ems_ref:
            export_ems(args.ems_ref, Path(exported))
        for kind in kinds:
            with tempfile.TemporaryDirectory(prefix=f"compare-{kind}-") as tmp:
                results[kind] = trio.run(run_hub, kind, args, Path(tmp))
            print(f"{kind}: {json.dumps(results[kind])}", flush=True)
    load_after = os.getloadavg()
    table = "\n".join([HEADER, *(markdown_row(r, results.get("ems")) for r in results.values())])
    found = ratios(results)
    summary = "\n".join(
        f"{label} (CPU-s per 1k delivered): {value}" for label, value in found.items()
    )
    print()
    print(table)
    print(summary)
    machine = machine_info()
    for package in (
        "fastapi",
        "uvicorn",
        "python-socketio",
        "python-engineio",
        "pydantic",
        "websockets",
    ):
        machine.setdefault("packages", {})[package] = version(package)
    out = {
        "machine": machine,
        "ems_source": ems_source(args.ems_ref),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "args": vars(args),
        "results": list(results.values()),
        "ratios": found,
        "markdown": table + "\n\n" + summary,
    }
    path = RESULTS / f"{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
