"""Private PostgreSQL and Redis servers for benchmarks that need them (the scale-out runs).

The same throwaway servers the tests start (`tests/services.py`): a PostgreSQL cluster from
Debian's binaries on a free port, a redis-server without persistence. Both are removed when the
`with` block ends.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager

from tests.services import RedisServer, _Cluster, _server_account, find_pg_bindir


@contextmanager
def private_postgres() -> Iterator[str]:
    """The URL of an empty database `ems` on a private PostgreSQL server."""
    bindir = find_pg_bindir()
    account = _server_account()
    if bindir is None or account is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
    cluster = _Cluster(bindir, account)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextmanager
def private_redis() -> Iterator[str]:
    """The URL of a private redis-server."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    server = RedisServer(binary)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
