"""Fixtures for the hub's unit tests: a `store` over both backends (SQLite, and PostgreSQL
from the session's server in tests/services.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ems.hub.store.base import Store
from ems.hub.store.postgres import PostgresStore
from ems.hub.store.sqlite import SqliteStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Makes unopened stores of the parametrized backend, all on the same database."""
    if request.param == "sqlite":
        path = tmp_path / "ems.db"
        return lambda: SqliteStore(path)
    url = request.getfixturevalue("postgres_db_url")
    return lambda: PostgresStore(url)


@pytest.fixture
def store(store_factory: Callable[[], Store]) -> Iterator[Store]:
    """An opened store of each backend on an empty database, closed after the test."""
    opened = store_factory()
    opened.open()
    try:
        yield opened
    finally:
        opened.close()
