"""What the edge agent costs its device: RSS and CPU of `python -m ems.edge`, streaming to a hub.

Starts a hub (`hypercorn -k trio ems.hub:app`, fresh data directory), creates a device through
the REST API, runs the real agent (`EMS_SENSORS=system,simulated_ems`, one batch a second by
default), lets it settle, then reads /proc/<agent pid> for `--duration` seconds:

- RSS: VmRSS sampled once a second (start, mean, max) and VmHWM (the peak);
- CPU: (utime + stime) over the window / wall time, as a share of one core;
- threads, and samples stored by the hub during the window (to show it was streaming).

With `--reconnect-trials N` it then kills the hub (SIGKILL) N times, keeps it down for
`--outage-s`, restarts it on the same port, and reports how long the agent takes to be back and
streaming: from the hub answering /health to the first new sample stored.

    python benchmarks/agent_footprint.py                 # ~40 s
    python benchmarks/agent_footprint.py --duration 60 --reconnect-trials 5 --outage-s 3
    python benchmarks/agent_footprint.py --duration 5 --reconnect-trials 3 --between-s 65

Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ADMIN_PASSWORD = "footprint-admin-password"
BIND_LINE = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
DEVICE_ID = "footprint-1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EMS_")}


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.token = ""

    def start(self, port: int = 0) -> None:
        log_path = self.root / f"hub-{time.monotonic_ns()}.log"
        env = clean_env() | {
            "EMS_DATA_DIR": str(self.root / "data"),
            "EMS_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "PYTHONUNBUFFERED": "1",
        }
        with log_path.open("wb") as log:
            bind = f"127.0.0.1:{port}"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hypercorn", "-k", "trio", "-b", bind, "ems.hub:app"],
                env=env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"the hub exited at start:\n{log_path.read_text()}")
            match = BIND_LINE.search(log_path.read_bytes())
            if match:
                self.port = int(match.group(1))
                try:
                    if httpx.get(f"{self.http}/health", timeout=2).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
            time.sleep(0.02)
        sys.exit(f"the hub did not start:\n{log_path.read_text()}")

    def kill(self) -> None:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)
            self.process = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> httpx.Response:
        if not self.token:
            login = {"username": "admin", "password": ADMIN_PASSWORD}
            self.token = httpx.post(f"{self.http}/api/auth/login", json=login).json()["token"]
        return httpx.get(
            f"{self.http}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )

    def create_device(self) -> str:
        self.get("/health")  # logs in
        response = httpx.post(
            f"{self.http}/api/devices",
            json={"device_id": DEVICE_ID},
            headers={"Authorization": f"Bearer {self.token}"},
        )
        response.raise_for_status()
        return str(response.json()["token"])

    def latest(self) -> tuple[int, float]:
        """(seq, ts) of the newest stored sample; (0, 0) when none."""
        try:
            response = self.get(f"/api/devices/{DEVICE_ID}/latest")
        except httpx.TransportError:
            return 0, 0.0
        if response.status_code != 200:
            return 0, 0.0
        body = response.json()
        return int(body["seq"]), float(body["ts"])

    def stored_max_ts(self) -> float:
        db = sqlite3.connect(f"file:{self.root / 'data' / 'ems.db'}?mode=ro", uri=True)
        try:
            return float(db.execute("SELECT coalesce(max(ts), 0) FROM telemetry").fetchone()[0])
        finally:
            db.close()

    def stored(self) -> int:
        response = self.get(f"/api/devices/{DEVICE_ID}/telemetry?limit=10000")
        return len(response.json()["samples"])


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def kib(value: str) -> int:
    return int(value.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds measured")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before measuring")
    parser.add_argument("--batch-interval", type=float, default=1.0)
    parser.add_argument("--sensors", default="system,simulated_ems")
    parser.add_argument("--reconnect-trials", type=int, default=0)
    parser.add_argument("--outage-s", type=float, default=2.0)
    parser.add_argument(
        "--between-s",
        type=float,
        default=2.0,
        help="seconds streaming between outages (the agent resets its backoff after 60 s up)",
    )
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ems-footprint-"))
    hub = Hub(root / "hub")
    hub.root.mkdir()
    agent: subprocess.Popen[bytes] | None = None
    try:
        hub.start()
        token = hub.create_device()
        agent_dir = root / "agent"
        agent_dir.mkdir()
        token_file = agent_dir / "token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        env = clean_env() | {
            "EMS_HUB_URL": f"ws://127.0.0.1:{hub.port}",
            "EMS_DEVICE_ID": DEVICE_ID,
            "EMS_TOKEN_FILE": str(token_file),
            "EMS_DATA_DIR": str(agent_dir / "data"),
            "EMS_SENSORS": args.sensors,
            "EMS_BATCH_INTERVAL_S": str(args.batch_interval),
        }
        with (agent_dir / "agent.log").open("wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "ems.edge"],
                env=env,
                cwd=agent_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pid = agent.pid
        time.sleep(args.settle)
        if agent.poll() is not None:
            sys.exit(f"the agent exited:\n{(agent_dir / 'agent.log').read_text()}")

        stored_before = hub.stored()
        cpu_before, wall_before = proc_cpu_s(pid), time.monotonic()
        rss: list[int] = []
        while time.monotonic() - wall_before < args.duration:
            rss.append(kib(proc_status(pid)["VmRSS"]))
            time.sleep(1.0)
        cpu_s, wall_s = proc_cpu_s(pid) - cpu_before, time.monotonic() - wall_before
        status = proc_status(pid)
        stored = hub.stored() - stored_before

        print(f"agent: sensors={args.sensors} batch_interval_s={args.batch_interval}")
        print(f"window: {wall_s:.1f} s, {stored} samples stored by the hub meanwhile")
        print(
            f"RSS: start {rss[0] / 1024:.1f} MiB, mean {statistics.mean(rss) / 1024:.1f} MiB, "
            f"max {max(rss) / 1024:.1f} MiB, peak (VmHWM) {kib(status['VmHWM']) / 1024:.1f} MiB"
        )
        print(f"CPU: {cpu_s:.2f} s in {wall_s:.1f} s = {100 * cpu_s / wall_s:.2f} % of one core")
        print(f"threads: {status['Threads']}")

        back: list[float] = []
        for trial in range(args.reconnect_trials):
            port = hub.port
            hub.kill()
            time.sleep(args.outage_s)
            before_ts = hub.stored_max_ts()  # from its file: exactly what survived the crash
            hub.start(port)
            hub.token = ""
            ready = time.monotonic()
            while True:
                _, ts = hub.latest()
                if ts > before_ts:
                    break
                if time.monotonic() - ready > 120:
                    sys.exit("the agent did not come back within 120 s")
                time.sleep(0.01)
            back.append(time.monotonic() - ready)
            print(f"reconnect {trial + 1}: back and streaming {back[-1]:.2f} s after the hub")
            time.sleep(args.between_s)  # streaming again before the next outage
        if back:
            print(
                f"reconnect after a {args.outage_s} s outage: min {min(back):.2f} s, "
                f"median {statistics.median(back):.2f} s, max {max(back):.2f} s"
            )
    finally:
        if agent is not None:
            try:
                os.killpg(agent.pid, signal.SIGTERM)
                agent.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(agent.pid, signal.SIGKILL)
        hub.kill()


if __name__ == "__main__":
    main()
