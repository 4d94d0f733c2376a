"""Refuse a second hub process where one is all the set-up can carry.

The embedded SQLite store serves one process: a lock file in the data directory, held for the
hub's lifetime, makes a second process on the same directory (another `hypercorn` or a second
`--workers` worker) stop at start with a message saying what to configure. PostgreSQL can be
shared, but hubs that share it without a Redis bus would not see each other's devices (no
ghost replacement, no fan-out, no wake-ups): a session-level advisory lock, held on a connection
of its own, makes the second one stop too. With `EMS_REDIS_URL` any number may run.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ems.logs import get_logger

if TYPE_CHECKING:
    from ems.hub.settings import HubSettings

log = get_logger("ems.hub.guard")

ADVISORY_LOCK_KEY = 0x454D535F485542  # "EMS_HUB"
SCALE_OUT_HINT = (
    "To run several hub processes (hypercorn --workers N, or hubs on several machines) set "
    "EMS_DATABASE_URL=postgresql://... (shared state) and EMS_REDIS_URL=redis://... (the bus "
    "between them); see docs/operations.md."
)


class HubRefused(Exception):
    """This hub process must not start; the message says why and what to configure."""


class SingleProcessGuard:
    def __init__(self, settings: HubSettings) -> None:
        self._settings = settings
        self._lock_file: IO[bytes] | None = None
        self._pg: Any = None

    def acquire(self) -> None:
        """(worker thread) Take the lock this set-up needs, or raise `HubRefused`."""
        settings = self._settings
        if settings.database_url is None:
            self._lock_sqlite(Path(settings.data_dir))
        elif settings.redis_url is None:
            self._lock_postgres(settings.database_url)

    def _lock_sqlite(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "hub.lock"
        handle = path.open("a+b")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise HubRefused(
                f"another hub process is already serving the embedded SQLite store in "
                f"{data_dir.resolve()}; SQLite serves one hub process. {SCALE_OUT_HINT}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._lock_file = handle

    def _lock_postgres(self, url: str) -> None:
        import psycopg

        try:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=5)
        except psycopg.Error as exc:
            # The store reports an unreachable database itself; nothing to guard against yet.
            log.warning("guard_unavailable", error=str(exc)[:200])
            return
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()
        if not row or not row[0]:
            conn.close()
            raise HubRefused(
                "another hub process is already using this PostgreSQL database without a Redis "
                f"bus (EMS_REDIS_URL is unset). {SCALE_OUT_HINT}"
            )
        self._pg = conn

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing drops the flock
            self._lock_file = None
        if self._pg is not None:
            try:
                self._pg.close()  # the advisory lock ends with the session
            except Exception as exc:  # already broken; nothing is held any more
                log.debug("guard_close_failed", error=str(exc)[:200])
            self._pg = None
