"""Real services for the tests: a PostgreSQL server and a redis-server, started by fixtures.

`postgres_url` starts a throwaway PostgreSQL cluster from the installed binaries (Debian's
/usr/lib/postgresql/<version>/bin first, then PATH) on a free port of 127.0.0.1, and stops it at
the end of the session. Without the binaries the tests that need it skip, unless CI=true, where
they fail. As root, the server runs as the unprivileged `postgres` user (created by Debian's
package), or `nobody` when that is missing: PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

PG_PROGRAMS = ("initdb", "pg_ctl", "postgres")
PG_START_TIMEOUT_S = 30
_SUPERUSER = "postgres"


def _missing(reason: str) -> NoReturn:
    """Skip, or fail under CI (where the service is installed on purpose)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)")
    pytest.skip(reason)


def find_pg_bindir() -> Path | None:
    """A directory holding initdb, pg_ctl and postgres: Debian's layout first, then PATH."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in debian:
        if all((bindir / name).is_file() for name in PG_PROGRAMS):
            return bindir
    found = [shutil.which(name) for name in PG_PROGRAMS]
    if all(found):
        # pg_ctl runs the `postgres` beside its own resolved path, so resolve symlinks
        # (e.g. /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin/pg_ctl).
        bindir = Path(str(found[1])).resolve().parent
        if all((bindir / name).is_file() for name in PG_PROGRAMS):
            return bindir
    return None


def _server_account() -> pwd.struct_passwd | None:
    """Who runs the server: ourselves, or (as root) an unprivileged system account."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Cluster:
    """One throwaway cluster: initdb, pg_ctl start/stop, as the chosen account."""

    def __init__(self, bindir: Path, account: pwd.struct_passwd) -> None:
        self.bindir = bindir
        self.account = account
        self.root = Path(tempfile.mkdtemp(prefix="ems-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = _free_port()
        if os.geteuid() == 0:
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        as_other = os.geteuid() == 0 and self.account.pw_uid != 0
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C", "HOME": str(self.root)},
            user=self.account.pw_uid if as_other else None,
            group=self.account.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=PG_START_TIMEOUT_S + 30,
            check=False,
        )

    def log_tail(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no server log)"

    def start(self) -> str:
        done = self.run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            _SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c synchronous_commit=off -c max_connections=50"
        )
        done = self.run(
            "pg_ctl",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            str(PG_START_TIMEOUT_S),
            "start",
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{self.log_tail()}"
            )
        admin_url = f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/postgres"
        # `pg_ctl -w` returned only once the server accepts connections.
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE ems")
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/ems"

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.datadir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of the database `ems` on a private PostgreSQL server, for the whole session."""
    bindir = find_pg_bindir()
    if bindir is None:
        _missing("PostgreSQL binaries (initdb, pg_ctl, postgres) not found")
    account = _server_account()
    if account is None:
        _missing("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL")
    cluster = _Cluster(bindir, account)
    try:
        try:
            url = cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError, psycopg.Error) as exc:
            pytest.fail(f"could not start PostgreSQL from {bindir}: {exc}")
        yield url
    finally:
        cluster.stop()


_database_numbers = itertools.count(1)


@pytest.fixture
def postgres_db_url(postgres_url: str) -> Iterator[str]:
    """A fresh, empty database on the session's server for one test, dropped afterwards."""
    name = f"ems_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # FILE_COPY is the quick way with fsync=off (PostgreSQL 15+; older ones only have it).
        strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
        conn.execute(f"CREATE DATABASE {name} TEMPLATE template0{strategy}")
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            force = " WITH (FORCE)" if conn.info.server_version >= 130000 else ""
            conn.execute(f"DROP DATABASE IF EXISTS {name}{force}")


# --- Redis ------------------------------------------------------------------------------------

REDIS_START_TIMEOUT_S = 20


class RedisServer:
    """One private redis-server on a free port of 127.0.0.1 (no persistence); it can be
    killed and started again on the same port, as an outage would look to its clients."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="ems-redis-"))
        self.port = _free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        # redis-server says when it accepts connections; read its output until then.
        assert self.process.stdout is not None
        seen: list[str] = []
        for line in self.process.stdout:
            seen.append(line)
            if "Ready to accept connections" in line:
                break
        else:
            self.process.wait(timeout=REDIS_START_TIMEOUT_S)
            self.process = None
            raise RuntimeError("redis-server did not start:\n" + "".join(seen[-30:]))
        # Keep draining its output so it never blocks on a full pipe.
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()

    @staticmethod
    def _drain(process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for _ in process.stdout:
            pass

    def kill(self) -> None:
        """SIGKILL: the server is gone at once, as after a crash."""
        if self.process is None:
            return
        process, self.process = self.process, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for one test (started; killed and removed afterwards)."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server not found (Debian: apt-get install redis-server)")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
