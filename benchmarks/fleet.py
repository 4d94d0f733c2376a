"""Simulated fleet against a real hub: how many devices, what latency, what it costs the hub.

Starts a hub (`hypercorn -k trio ems.hub:app`, fresh data directory) unless `--hub` names one,
creates the devices through the REST API, subscribes one dashboard to `*`, and runs N devices,
each a `DeviceSession` over trio-websocket sending one telemetry message per interval. Reports:

- delivered/sent: telemetry updates the dashboard received over samples the devices sent;
- stored: rows in the hub's store, and whether every sample was acked;
- latency p50/p99/max: device send (the sample's `ts`) to dashboard receive, wall clock;
- hub CPU-seconds per 1,000 samples, from /proc of the hub's worker process;
- hub RSS per connection: (RSS with the fleet connected - RSS before) / N.

Run `python benchmarks/fleet.py --devices 1000 --rate 1 --duration 30`; `make bench` runs the
short version. Results go to benchmarks/results/ as JSON and a markdown row.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from ems.protocol import messages as m
from ems.protocol._window import CommandRecord, SeqAllocator
from ems.protocol.codec import Codec
from ems.protocol.device_session import Acked, DeviceSession, LinkDead

ADMIN_PASSWORD = "bench-admin-password"
RESULTS = Path(__file__).parent / "results"
BIND_LINE = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
CODEC = Codec()


# --- the hub under test --------------------------------------------------------------------


@attrs.define
class HubUnderTest:
    data_dir: Path
    env_extra: dict[str, str] = attrs.field(factory=dict)
    workers: int = 1
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}
        env.update(
            {
                "EMS_DATA_DIR": str(self.data_dir / "data"),
                "EMS_ADMIN_PASSWORD": ADMIN_PASSWORD,
                **self.env_extra,
            }
        )
        log_path = self.data_dir / "hub.log"
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
                    "127.0.0.1:0",
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


async def create_devices(http: str, count: int) -> list[SimDevice]:
    async with httpx.AsyncClient(base_url=http, timeout=60) as client:
        login = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        token = login.json()["token"]
        client.headers["Authorization"] = f"Bearer {token}"
        devices = []
        for i in range(count):
            device_id = f"bench-{i:05d}"
            response = await client.post("/api/devices", json={"device_id": device_id})
            if response.status_code == 409:
                response = await client.post(f"/api/devices/{device_id}/token")
            response.raise_for_status()
            devices.append(SimDevice(device_id, response.json()["token"], admin_token=token))
        return devices


async def hub_gc_figures(http: str) -> dict[str, Any]:
    """The hub's GC pauses so far, from /metrics (loopback needs no login)."""
    async with httpx.AsyncClient(base_url=http, timeout=30) as client:
        text = (await client.get("/metrics")).text
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
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# --- the fleet ---------------------------------------------------------------------------------


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


@attrs.define(eq=False)
class Fleet:
    url: str
    devices: list[SimDevice]
    rate: float
    metrics: int
    samples_per_message: int = 1
    stop_sending: trio.Event = attrs.field(factory=trio.Event)
    online: int = 0
    all_online: trio.Event = attrs.field(factory=trio.Event)
    all_acked: trio.Event = attrs.field(factory=trio.Event)

    def unacked(self) -> int:
        return sum(1 for d in self.devices if d.acked_seq < d.last_seq)

    async def run_device(self, device: SimDevice, start_delay: float) -> None:
        """One simulated device: connect, stream, reconnect on failure, until all is acked."""
        await trio.sleep(start_delay)
        state = SimState(device=device, rng=random.Random(device.device_id))
        while not (self.stop_sending.is_set() and not state.outbox):
            try:
                async with open_websocket_url(
                    f"{self.url}/ws/device/{device.device_id}",
                    extra_headers=[("Authorization", f"Bearer {device.token}")],
                ) as ws:
                    device.connects += 1
                    await SimConnection(self, state, ws).run()
            except (
                OSError,
                HandshakeError,
                ConnectionClosed,
                ConnectionError,
                trio.BrokenResourceError,
            ):
                device.refused += 1
                await trio.sleep(state.rng.uniform(0.5, 2.0))

    def device_acked(self, state: SimState) -> None:
        if not state.counted_online:
            state.counted_online = True
            self.online += 1
            if self.online == len(self.devices):
                self.all_online.set()
        if self.stop_sending.is_set() and self.unacked() == 0:
            self.all_acked.set()


@attrs.define(eq=False)
class SimState:
    """What a simulated device keeps across its connections (its outbox, its seqs)."""

    device: SimDevice
    rng: random.Random
    seqs: SeqAllocator = attrs.field(factory=SeqAllocator)
    outbox: dict[int, str] = attrs.field(factory=dict)
    record: CommandRecord = attrs.field(factory=CommandRecord)
    counted_online: bool = False
    last_ts: float = 0.0
    acked: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class SimConnection:
    fleet: Fleet
    state: SimState
    ws: Any
    session: DeviceSession = attrs.field(init=False)
    send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)

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
                for seq in sorted(s for s in outbox if s > session.sent_high):
                    if session.window_free() <= 0:
                        break
                    session.send_reliable(seq, outbox[seq], trio.current_time())
            for text in session.data_to_send():
                await self.ws.send_message(text)

    async def reader(self, scope: trio.CancelScope) -> None:
        session = self.session
        state = self.state
        while True:
            text = await self.ws.get_message()
            session.receive_text(text, trio.current_time())
            while (event := session.next_event()) is not None:
                if isinstance(event, Acked):
                    for seq in [s for s in state.outbox if s <= event.seq]:
                        del state.outbox[seq]
                    state.device.acked_seq = max(state.device.acked_seq, event.seq)
                    self.fleet.device_acked(state)
                    state.acked.set()
                    state.acked = trio.Event()
                elif isinstance(event, LinkDead):
                    raise ConnectionError(event.reason)
            await self.flush()
            if self.fleet.stop_sending.is_set() and not state.outbox:
                scope.cancel()

    async def producer(self) -> None:
        fleet = self.fleet
        state = self.state
        device = state.device
        interval = 1.0 / fleet.rate if fleet.rate > 0 else 0.0
        next_at = trio.current_time()
        while not fleet.stop_sending.is_set():
            # ts grows strictly per device even when the loop runs late and catches up (the
            # hub stores one sample per device and ts)
            now_ms = max(time.time() * 1000.0, state.last_ts + 1.0)
            state.last_ts = now_ms + fleet.samples_per_message * 0.001
            samples = tuple(
                m.Sample(
                    ts=now_ms + i * 0.001,
                    data={
                        f"m{k}": round(state.rng.uniform(0, 100), 2) for k in range(fleet.metrics)
                    },
                )
                for i in range(fleet.samples_per_message)
            )
            seq = state.seqs.next()
            state.outbox[seq] = CODEC.encode(m.Telemetry(seq=seq, samples=samples))
            device.sent += len(samples)
            device.last_seq = seq
            await self.flush()
            if fleet.rate > 0:
                next_at += interval
                await trio.sleep_until(next_at)
            else:
                # As fast as acks allow: keep one window of messages unacknowledged.
                while len(state.outbox) >= self.session.max_in_flight:
                    await state.acked.wait()
                await trio.lowlevel.checkpoint()

    async def ticker(self) -> None:
        while True:
            await trio.sleep(1.0)
            self.session.handle_timer(trio.current_time())
            await self.flush()


@attrs.define(eq=False)
class DashboardProbe:
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

    async def run(self) -> None:
        async with open_websocket_url(
            f"{self.url}/ws/dashboard", extra_headers=[("Authorization", f"Bearer {self.token}")]
        ) as ws:
            await ws.send_message('{"type":"subscribe","devices":["*"]}')
            while True:
                frame = orjson.loads(await ws.get_message())
                now_ms = time.time() * 1000.0
                items = frame["messages"] if frame["type"] == "batch" else [frame]
                for item in items:
                    kind = item["type"]
                    if kind == "telemetry_update":
                        self.received += 1
                        self.latencies_ms.append(now_ms - item["ts"])
                        if self.received >= self.expected:
                            self.all_received.set()
                    elif kind == "subscribed":
                        self.ready.set()
                    elif kind == "lagged":
                        self.lagged += item["dropped"]


@attrs.define(eq=False)
class ProbeProcess:
    """The dashboard probe in a process of its own, so that the fleet's own load (thousands of
    connections in one Python process) does not show up as hub latency.

    Line protocol on the child's stdin/stdout: it prints `ready` once subscribed; `reset` starts
    the measured window; `window` answers the window's latencies as JSON; `expect N` answers the
    totals (JSON) once N updates arrived in all (or after 60 s)."""

    url: str
    token: str
    process: trio.Process | None = None
    _lines: Any = None

    async def start(self, nursery: trio.Nursery) -> None:
        self.process = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, __file__, "--probe", self.url],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={**os.environ, "EMS_BENCH_TOKEN": self.token},
                check=False,
            )
        )
        self._lines = _line_reader(self.process.stdout)
        assert await self._line() == "ready"

    async def _line(self) -> str:
        return (await self._lines.__anext__()).strip()

    async def ask(self, command: str) -> Any:
        assert self.process is not None
        assert self.process.stdin is not None
        await self.process.stdin.send_all(command.encode() + b"\n")
        if command == "reset":
            return None
        return orjson.loads(await self._line())


async def _line_reader(stream: Any) -> Any:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()


async def probe_main(url: str) -> None:
    """The probe process: subscribe, then answer the parent's commands on stdin."""
    gc.freeze()
    probe = DashboardProbe(url, os.environ["EMS_BENCH_TOKEN"])
    stdin = trio.lowlevel.FdStream(os.dup(0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await probe.ready.wait()
        print("ready", flush=True)
        window_start = 0
        async for line in _line_reader(stdin):
            command, _, argument = line.strip().partition(" ")
            if command == "reset":
                probe.latencies_ms.clear()
                window_start = probe.received
            elif command == "window":
                answer = {
                    "received": probe.received - window_start,
                    "latencies_ms": [round(x, 2) for x in probe.latencies_ms],
                }
                print(orjson.dumps(answer).decode(), flush=True)
            elif command == "expect":
                probe.expect(int(argument))
                with trio.move_on_after(60):
                    await probe.all_received.wait()
                answer = {"received": probe.received, "lagged": probe.lagged}
                print(orjson.dumps(answer).decode(), flush=True)
                nursery.cancel_scope.cancel()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- one scenario ------------------------------------------------------------------------------


async def steady(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="ems-bench-"))
    hub = HubUnderTest(workdir, env_extra=dict(args.hub_env or []), workers=args.workers)
    if args.hub:
        # An existing hub (profiling, other machines); its data dir is `--hub-data`.
        hub.port = int(args.hub.rsplit(":", 1)[1])
        workdir = Path(args.hub_data)
    else:
        hub.start()
    url = f"ws://127.0.0.1:{hub.port}"
    http = f"http://127.0.0.1:{hub.port}"
    try:
        devices = await create_devices(http, args.devices)
        token = devices[0].admin_token if devices else ""
        pids = hub.worker_pids() if hub.process is not None else [int(args.hub_pid)]
        # The fleet is a Python process with thousands of connections too: keep its own
        # collector from pausing it (which would show up as hub latency).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        rss_before = rss_bytes(pids)
        fleet = Fleet(
            url, devices, rate=args.rate, metrics=args.metrics, samples_per_message=args.batch
        )
        probe = ProbeProcess(url, token)
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            await probe.start(nursery)
            connect_started = time.monotonic()
            for index, device in enumerate(devices):
                delay = (index / len(devices)) * (min(1.0 / args.rate, 5.0) if args.rate else 1.0)
                nursery.start_soon(fleet.run_device, device, delay)
            with trio.move_on_after(120):
                await fleet.all_online.wait()
            result["connect_s"] = round(time.monotonic() - connect_started, 2)
            rss_connected = rss_bytes(pids)
            cpu_start = cpu_seconds(pids)
            fleet_cpu_start = cpu_seconds([os.getpid()])
            sent_start = sum(d.sent for d in devices)
            await probe.ask("reset")
            await trio.sleep(args.duration)
            cpu_used = cpu_seconds(pids) - cpu_start
            gc_figures = await hub_gc_figures(http)
            fleet_cpu_used = cpu_seconds([os.getpid()]) - fleet_cpu_start
            sent_window = sum(d.sent for d in devices) - sent_start
            window = await probe.ask("window")
            fleet.stop_sending.set()
            # Everything sent must be acked, and reach the dashboard.
            total_sent = sum(d.sent for d in devices)
            with trio.move_on_after(60):
                if fleet.unacked():
                    await fleet.all_acked.wait()
            totals = await probe.ask(f"expect {total_sent}")
            nursery.cancel_scope.cancel()
        hub.stop()
        stored = (
            sqlite3.connect(workdir / "data" / "ems.db")
            .execute("SELECT count(*) FROM telemetry")
            .fetchone()[0]
        )
        lat = window["latencies_ms"]
        result.update(
            {
                "scenario": "steady",
                "devices": args.devices,
                "rate_per_device": args.rate,
                "samples_per_message": args.batch,
                "metrics": args.metrics,
                "duration_s": args.duration,
                "sent": total_sent,
                "delivered": totals["received"],
                "stored": stored,
                "all_acked": all(d.acked_seq >= d.last_seq for d in devices),
                "lagged": totals["lagged"],
                "reconnects": sum(max(0, d.connects - 1) for d in devices),
                "refused": sum(d.refused for d in devices),
                "latency_ms_p50": round(percentile(lat, 0.50), 1),
                "latency_ms_p99": round(percentile(lat, 0.99), 1),
                "latency_ms_max": round(max(lat) if lat else float("nan"), 1),
                "samples_per_s": round(sent_window / args.duration, 1),
                "delivered_in_window": window["received"],
                "hub_cpu_s_per_1000_samples": round(1000 * cpu_used / max(sent_window, 1), 4),
                "hub_cpu_percent": round(100 * cpu_used / args.duration, 1),
                "fleet_cpu_percent": round(100 * fleet_cpu_used / args.duration, 1),
                "hub_rss_mb": round(rss_connected / 2**20, 1),
                **gc_figures,
                "hub_rss_kb_per_connection": round(
                    (rss_connected - rss_before) / 1024 / max(args.devices, 1), 1
                ),
            }
        )
        return result
    finally:
        hub.stop()


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
        "packages": {
            p: version(p)
            for p in ("trio", "hypercorn", "quart-trio", "trio-websocket", "orjson", "cattrs")
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def markdown_row(r: dict[str, Any]) -> str:
    cells = [
        r["devices"],
        f"{r['rate_per_device']}/s x {r['samples_per_message']}",
        f"{r['duration_s']} s",
        f"{r['delivered']}/{r['sent']}",
        r["stored"],
        "yes" if r["all_acked"] else "NO",
        f"{r['latency_ms_p50']} / {r['latency_ms_p99']} / {r['latency_ms_max']}",
        r["hub_cpu_s_per_1000_samples"],
        f"{r['hub_cpu_percent']}%",
        f"{r['fleet_cpu_percent']}%",
        r["hub_rss_kb_per_connection"],
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEADER = (
    "| devices | rate | duration | delivered/sent | stored | all acked "
    "| latency ms p50 / p99 / max | hub CPU-s per 1k samples | hub CPU | fleet CPU "
    "| hub RSS KiB/conn |\n"
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[1000])
    parser.add_argument(
        "--rate", type=float, default=1.0, help="messages/s per device; 0: as fast as acks allow"
    )
    parser.add_argument("--batch", type=int, default=1, help="samples per message")
    parser.add_argument("--metrics", type=int, default=5)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--hub-env",
        nargs="*",
        type=lambda s: tuple(s.split("=", 1)),
        help="EMS_X=value for the hub",
    )
    parser.add_argument("--label", default="steady")
    parser.add_argument("--hub", help="use a running hub at http://127.0.0.1:PORT")
    parser.add_argument("--hub-data", help="that hub's EMS_DATA_DIR parent (for the row count)")
    parser.add_argument("--hub-pid", help="that hub's process id (for CPU and RSS)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the probe process
    args = parser.parse_args()
    if args.probe:
        trio.run(probe_main, args.probe)
        return
    RESULTS.mkdir(exist_ok=True)
    results = []
    print(f"fleet benchmark: {vars(args)}")
    print(HEADER)
    for count in args.devices:
        one = argparse.Namespace(**{**vars(args), "devices": count})
        result = trio.run(steady, one)
        results.append(result)
        print(markdown_row(result), flush=True)
    out = {"machine": machine_info(), "args": vars(args), "results": results}
    path = RESULTS / f"{args.label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")
    if any(
        r["delivered"] < r["sent"] or r["stored"] < r["sent"] or not r["all_acked"] for r in results
    ):
        print("LOSS: some samples were not delivered, stored or acked", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
