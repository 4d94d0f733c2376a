"""The local history store: samples keyed by ts, ranges with a metric filter, retention."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from ems.edge.history import AsyncHistory, HistoryError, HistoryStore

DAY_MS = 86_400_000
T0 = 1_763_800_000_000


def sample(ts: float, **data: object) -> dict[str, object]:
    return {"ts": ts, "data": data}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[HistoryStore]:
    with HistoryStore(tmp_path / "sub" / "history.db") as opened:
        yield opened


def test_add_and_count(store: HistoryStore) -> None:
    assert store.count() == 0
    assert store.add([sample(T0, voltage=230.1), sample(T0 + 1000, voltage=230.2)]) == 2
    assert store.add([]) == 0
    assert store.count() == 2


def test_a_second_sample_with_the_same_ts_is_ignored(store: HistoryStore) -> None:
    store.add([sample(T0, voltage=1.0)])
    assert store.add([sample(T0, voltage=2.0), sample(T0 + 1, voltage=3.0)]) == 1
    assert store.add([sample(T0 + 2, v=1), sample(T0 + 2, v=2)]) == 1, "within one call too"
    assert store.range() == [
        sample(T0, voltage=1.0),
        sample(T0 + 1, voltage=3.0),
        sample(T0 + 2, v=1),
    ]


def test_values_round_trip(store: HistoryStore) -> None:
    data = {
        "voltage": 230.1,
        "soc": 87,
        "ok": True,
        "note": "fine",
        "position": {"latitude": 40.71, "longitude": -74.0},
    }
    store.add([{"ts": T0, "data": data}, {"ts": T0 + 0.5, "data": {"x": 1}}])
    first, second = store.range()
    assert first == {"ts": T0, "data": data}
    assert type(first["ts"]) is int
    assert second["ts"] == T0 + 0.5


def test_range_is_inclusive_oldest_first_and_limited(store: HistoryStore) -> None:
    store.add([sample(T0 + i * 1000, n=i) for i in reversed(range(10))])
    assert [s["data"]["n"] for s in store.range()] == list(range(10))
    assert [s["data"]["n"] for s in store.range(T0 + 2000, T0 + 5000)] == [2, 3, 4, 5]
    assert [s["data"]["n"] for s in store.range(T0 + 2000, None, limit=3)] == [2, 3, 4]
    assert [s["data"]["n"] for s in store.range(None, T0 + 1000)] == [0, 1]
    assert [s["data"]["n"] for s in store.range(T0, T0 + 9000, after_ts=T0 + 7000)] == [8, 9]
    assert store.range(T0 + 5000, T0 + 4000) == []
    assert store.range(limit=0) == []


def test_range_filters_metrics(store: HistoryStore) -> None:
    store.add(
        [
            sample(T0, voltage=230.0, soc=80, temperature=20.0),
            sample(T0 + 1, temperature=21.0),
            sample(T0 + 2, voltage=231.0),
            sample(T0 + 3, soc=81),
        ]
    )
    assert store.range(metrics=["voltage", "soc"]) == [
        sample(T0, voltage=230.0, soc=80),
        sample(T0 + 2, voltage=231.0),
        sample(T0 + 3, soc=81),
    ]
    assert store.range(metrics=["voltage", "soc"], limit=2) == [
        sample(T0, voltage=230.0, soc=80),
        sample(T0 + 2, voltage=231.0),
    ]
    assert store.range(metrics=["nothing"]) == []
    assert len(store.range(metrics=[])) == 4, "an empty list means every metric"


def test_range_with_a_filter_reads_past_a_page(store: HistoryStore) -> None:
    store.add([sample(T0 + i, other=i) for i in range(1200)])
    store.add([sample(T0 + 5000, wanted=1), sample(T0 + 5001, wanted=2)])
    assert store.range(metrics=["wanted"], limit=10) == [
        sample(T0 + 5000, wanted=1),
        sample(T0 + 5001, wanted=2),
    ]


def test_prune_by_age(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.db", retention_s=86_400) as store:
        store.add([sample(T0 + i * DAY_MS // 4, n=i) for i in range(12)])  # every 6 h, 3 days
        now = T0 + 3 * DAY_MS
        assert store.prune(now) == 8  # older than one day before now
        assert [s["data"]["n"] for s in store.range()] == [8, 9, 10, 11]
        assert store.prune(now + DAY_MS // 4) == 1, "the cutoff itself is kept"
        assert store.prune(now) == 0


def test_prune_by_rows_keeps_the_newest(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.db", max_rows=5) as store:
        store.add([sample(T0 + i, n=i) for i in range(12)])
        assert store.count() == 12, "the bound is enforced by prune"
        assert store.prune(T0 + 100) == 7
        assert [s["data"]["n"] for s in store.range()] == [7, 8, 9, 10, 11]


def test_prune_by_age_then_rows(tmp_path: Path) -> None:
    with HistoryStore(tmp_path / "h.db", retention_s=10, max_rows=3) as store:
        store.add([sample(T0 + i * 1000, n=i) for i in range(20)])
        assert store.prune(T0 + 19_000) == 17
        assert [s["data"]["n"] for s in store.range()] == [17, 18, 19]


def test_samples_survive_a_reopen_and_the_file_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with HistoryStore(path) as store:
        store.add([sample(T0, n=1)])
    with HistoryStore(path) as store:
        assert store.range() == [sample(T0, n=1)]
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(HistoryError, match="newer than this agent's"):
        HistoryStore(path).open()


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(HistoryError, match=str(path)):
        HistoryStore(path).open()


def test_closed_store_says_so(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h.db")
    with pytest.raises(HistoryError, match="not open"):
        store.count()


def test_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retention_s"):
        HistoryStore(tmp_path / "h.db", retention_s=0)
    with pytest.raises(ValueError, match="max_rows"):
        HistoryStore(tmp_path / "h.db", max_rows=0)


async def test_async_history(tmp_path: Path) -> None:
    history = AsyncHistory(HistoryStore(tmp_path / "h.db", max_rows=2))
    await history.open()
    try:
        assert await history.add([sample(T0, a=1), sample(T0 + 1, a=2), sample(T0 + 1, a=3)]) == 2
        assert await history.add([sample(T0 + 2, b=1)]) == 1
        assert await history.count() == 3
        assert await history.range(T0, T0 + 2, ["a"], 10) == [sample(T0, a=1), sample(T0 + 1, a=2)]
        assert await history.range(after_ts=T0) == [sample(T0 + 1, a=2), sample(T0 + 2, b=1)]
        assert await history.prune(T0) == 1
        assert await history.count() == 2
    finally:
        await history.close()
