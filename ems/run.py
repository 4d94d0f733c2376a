"""`make run`: a local EMS on 127.0.0.1:8000 — the hub plus three simulated agents.

The hub keeps its embedded store under ./data; the admin password is generated once and kept in
./data/admin-password (mode 600) so every `make run` can print the login. The simulated devices
(sim-001..003) are created on first run; their tokens are rotated on every run and handed to the
simulator in a file, never on a command line. Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PORT = int(os.environ.get("EMS_RUN_PORT", "8000"))
DEVICES = ("sim-001", "sim-002", "sim-003")


def admin_password(data_dir: Path) -> str:
    path = data_dir / "admin-password"
    if "EMS_ADMIN_PASSWORD" in os.environ:
        return os.environ["EMS_ADMIN_PASSWORD"]
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


def call(method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://{HOST}:{PORT}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for_hub(hub: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if hub.poll() is not None:
            raise SystemExit("the hub exited at start; see the messages above")
        try:
            status, _ = call("GET", "/health")
            if status in (200, 503):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the hub did not answer /health within 60 s")


def device_tokens(password: str) -> dict[str, str]:
    status, body = call("POST", "/api/auth/login", {"username": "admin", "password": password})
    if status != 200:
        raise SystemExit(f"cannot log in as admin ({status}): is ./data from another setup?")
    token = body["token"]
    tokens = {}
    for device_id in DEVICES:
        status, body = call(
            "POST", "/api/devices", {"device_id": device_id, "name": "simulated"}, token
        )
        if status == 409:
            status, body = call("POST", f"/api/devices/{device_id}/token", None, token)
        if status not in (200, 201):
            raise SystemExit(f"cannot create {device_id}: {status} {body}")
        tokens[device_id] = body["token"]
    return tokens


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> int:
    data_dir = Path(os.environ.get("EMS_DATA_DIR", "./data"))
    password = admin_password(data_dir)
    env = {**os.environ, "EMS_DATA_DIR": str(data_dir), "EMS_ADMIN_PASSWORD": password}
    hub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hypercorn",
            "-k",
            "trio",
            "-b",
            f"{HOST}:{PORT}",
            "--websocket-ping-interval",
            "20",
            "ems.hub:app",
        ],
        env=env,
        start_new_session=True,
    )
    agents: subprocess.Popen[bytes] | None = None
    try:
        wait_for_hub(hub)
        tokens_file = data_dir / "sim-tokens.json"
        tokens_file.write_text(json.dumps(device_tokens(password)))
        tokens_file.chmod(0o600)
        agents = subprocess.Popen(
            [
                sys.executable, "-m", "ems.edge", "simulate",
                "--count", str(len(DEVICES)),
                "--hub", f"ws://{HOST}:{PORT}",
                "--tokens", str(tokens_file),
                "--data-dir", str(data_dir / "edge"),
            ],
            start_new_session=True,
        )  # fmt: skip
        print(f"\nEMS dashboard: http://{HOST}:{PORT}/  (REST under /api, /health, /metrics)")
        print(f"admin login: username=admin password={password}")
        print(f"simulated devices streaming: {', '.join(DEVICES)}")
        print("Ctrl-C to stop.\n", flush=True)
        return hub.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if agents is not None:
            stop(agents)
        stop(hub)


if __name__ == "__main__":
    sys.exit(main())
