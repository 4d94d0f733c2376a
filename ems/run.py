"""`make run`: a local EMS on 127.0.0.1:8000 with the embedded store under ./data.

The admin password is generated once and kept in ./data/admin-password (mode 600) so that
every `make run` can print the login. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

HOST = "127.0.0.1"
PORT = int(os.environ.get("EMS_RUN_PORT", "8000"))


def admin_password(data_dir: Path) -> str:
    path = data_dir / "admin-password"
    if "EMS_ADMIN_PASSWORD" in os.environ:
        return os.environ["EMS_ADMIN_PASSWORD"]
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


def main() -> int:
    data_dir = Path(os.environ.get("EMS_DATA_DIR", "./data"))
    password = admin_password(data_dir)
    env = {**os.environ, "EMS_DATA_DIR": str(data_dir), "EMS_ADMIN_PASSWORD": password}
    hub = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "-k", "trio", "-b", f"{HOST}:{PORT}", "ems.hub:app"],
        env=env,
        start_new_session=True,
    )
    print(f"EMS hub on http://{HOST}:{PORT}/  (dashboard, REST under /api, /health, /metrics)")
    print(f"admin login: username=admin password={password}")
    print("Ctrl-C to stop.", flush=True)
    try:
        return hub.wait()
    except KeyboardInterrupt:
        hub.send_signal(signal.SIGTERM)
        try:
            return hub.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(hub.pid, signal.SIGKILL)
            return 1


if __name__ == "__main__":
    sys.exit(main())
