"""One suite for every Store implementation (the `store` fixture runs it on SQLite and
PostgreSQL), plus AsyncStore and open_store."""

from __future__ import annotations

import inspect
import socket
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
import trio

from ems.hub.store import (
    AlertRow,
    ArtifactRow,
    AsyncStore,
    CommandRow,
    CommandUpdate,
    ConfigReport,
    ConfigState,
    Conflict,
    DeviceRecord,
    EventRow,
    SampleRow,
    SessionRecord,
    Store,
    StoreError,
    StreamMark,
    UserRecord,
    WriteBatch,
    open_store,
)
from ems.hub.store.postgres import COPY_MIN_ROWS, PostgresStore
from ems.hub.store.sqlite import SqliteStore

T0 = 1_763_800_000_000.0


def sample(device_id: str = "ems_001", seq: int = 1, ts: float = T0, **data: Any) -> SampleRow:
    return SampleRow(device_id=device_id, seq=seq, ts=ts, data=data or {"voltage": 230.0 + seq})


def device(device_id: str, owner: str | None = None, **extra: Any) -> DeviceRecord:
    return DeviceRecord(
        device_id=device_id,
        name=extra.pop("name", f"Device {device_id}"),
        owner=owner,
        metadata=extra.pop("metadata", {"site": "lab", "tags": ["a", "b"], "rack": {"row": 3}}),
        token_hash=extra.pop("token_hash", f"hash-{device_id}"),
        created_at=extra.pop("created_at", T0 - 1000.5),
        **extra,
    )


def alert(device_id: str, ts: float, code: str = "LOW_BATTERY") -> AlertRow:
    return AlertRow(
        device_id=device_id,
        ts=ts,
        level="warning",
        code=code,
        message=f"{code} on {device_id}",
        data={"batteryVoltage": 11.2},
    )


def filler(count: int, device_id: str = "filler", start: float = T0) -> list[SampleRow]:
    return [sample(device_id, seq=i + 1, ts=start + i) for i in range(count)]


# --- ingest ------------------------------------------------------------------------------------
def test_write_batch_round_trip(store: Store) -> None:
    store.create_device(device("ems_001"))
    batch = WriteBatch(
        samples=[
            sample("ems_001", seq=1, ts=T0, voltage=230.1, current=4.2, soc=87),
            sample("ems_001", seq=2, ts=T0 + 1000, voltage=229.9),
            sample("ems_002", seq=7, ts=T0 + 500, temperature=41.5),
        ],
        events=[
            EventRow(
                device_id="ems_001", seq=3, ts=T0, level="info", code="BOOT", message="booted"
            ),
            EventRow(
                device_id="ems_001",
                seq=4,
                ts=T0 + 1,
                level="critical",
                code="FAULT",
                message="fault",
                data={"phase": 2},
            ),
        ],
        alerts=[alert("ems_001", T0 + 1000)],
        marks=[StreamMark(device_id="ems_001", stream="s1", seq=4)],
        last_seen={"ems_001": T0 + 1000},
    )
    assert len(batch) == 7
    store.write_batch(batch)

    assert store.samples("ems_001", since=None, until=None, limit=100) == [
        SampleRow(
            device_id="ems_001",
            seq=1,
            ts=T0,
            data={"voltage": 230.1, "current": 4.2, "soc": 87},
        ),
        SampleRow(device_id="ems_001", seq=2, ts=T0 + 1000, data={"voltage": 229.9}),
    ]
    assert store.samples("ems_002", since=None, until=None, limit=100) == [
        SampleRow(device_id="ems_002", seq=7, ts=T0 + 500, data={"temperature": 41.5})
    ]
    assert store.acked_seq("ems_001", "s1") == 4
    stored = store.get_device("ems_001")
    assert stored is not None
    assert stored.last_seen == T0 + 1000
    [only] = store.alerts(device_ids=None, since=None, limit=10)
    assert only["device_id"] == "ems_001"
    assert only["code"] == "LOW_BATTERY"


def test_empty_batch_is_a_no_op(store: Store) -> None:
    store.write_batch(WriteBatch())
    assert store.samples("ems_001", since=None, until=None, limit=10) == []


@pytest.mark.parametrize("extra_rows", [0, COPY_MIN_ROWS + 50], ids=["small", "copy"])
def test_sample_identified_by_device_and_ts_first_seq_kept(store: Store, extra_rows: int) -> None:
    # extra_rows makes PostgreSQL take its COPY path as well as the VALUES one.
    store.write_batch(
        WriteBatch(
            samples=[
                *filler(extra_rows),
                sample("ems_001", seq=1, ts=T0, voltage=1.0),
                sample("ems_001", seq=2, ts=T0, voltage=2.0),  # same ts in one batch
                sample("ems_002", seq=9, ts=T0, voltage=9.0),  # same ts, other device
            ]
        )
    )
    store.write_batch(
        WriteBatch(
            samples=[
                *filler(extra_rows, start=T0 - 10 * extra_rows),
                sample("ems_001", seq=5, ts=T0, voltage=5.0),  # already stored
                sample("ems_001", seq=6, ts=T0 + 1, voltage=6.0),
            ]
        )
    )
    assert store.samples("ems_001", since=None, until=None, limit=10) == [
        SampleRow(device_id="ems_001", seq=1, ts=T0, data={"voltage": 1.0}),
        SampleRow(device_id="ems_001", seq=6, ts=T0 + 1, data={"voltage": 6.0}),
    ]
    assert [s.seq for s in store.samples("ems_002", since=None, until=None, limit=10)] == [9]
    assert len(store.samples("filler", since=None, until=None, limit=10_000)) == 2 * extra_rows


def test_integer_and_float_ts_are_one_key(store: Store) -> None:
    store.write_batch(WriteBatch(samples=[sample(seq=1, ts=1_763_800_000_123)]))
    store.write_batch(WriteBatch(samples=[sample(seq=2, ts=1_763_800_000_123.0)]))
    store.write_batch(WriteBatch(samples=[sample(seq=3, ts=1_763_800_000_123.5)]))
    rows = store.samples("ems_001", since=None, until=None, limit=10)
    assert [(r.seq, r.ts) for r in rows] == [(1, 1_763_800_000_123.0), (3, 1_763_800_000_123.5)]


def test_stream_marks_only_raise(store: Store) -> None:
    def mark(seq: int, stream: str = "s1") -> StreamMark:
        return StreamMark(device_id="ems_001", stream=stream, seq=seq)

    assert store.acked_seq("ems_001", "s1") == 0
    store.write_batch(WriteBatch(marks=[mark(5)]))
    assert store.acked_seq("ems_001", "s1") == 5
    store.write_batch(WriteBatch(marks=[mark(3)]))
    assert store.acked_seq("ems_001", "s1") == 5
    store.write_batch(WriteBatch(marks=[mark(9), mark(7), mark(8, "s2")]))
    assert store.acked_seq("ems_001", "s1") == 9
    assert store.acked_seq("ems_001", "s2") == 8
    assert store.acked_seq("ems_002", "s1") == 0
    assert store.acked_seq("ems_001", "new") == 0


def test_last_seen_only_moves_forward(store: Store) -> None:
    store.create_device(device("ems_001"))

    def last_seen() -> float | None:
        record = store.get_device("ems_001")
        assert record is not None
        return record.last_seen

    assert last_seen() is None
    store.write_batch(WriteBatch(last_seen={"ems_001": T0 + 10}))
    assert last_seen() == T0 + 10
    store.write_batch(WriteBatch(last_seen={"ems_001": T0 + 5}))
    assert last_seen() == T0 + 10
    store.write_batch(WriteBatch(last_seen={"ems_001": T0 + 20, "unknown_device": T0}))
    assert last_seen() == T0 + 20
    assert store.get_device("unknown_device") is None


def test_large_batch_commits_in_one_call(store: Store) -> None:
    rows = [
        sample(f"ems_{i % 7:03d}", seq=i + 1, ts=T0 + i, voltage=float(i), soc=i % 100)
        for i in range(5000)
    ]
    store.write_batch(
        WriteBatch(
            samples=rows,
            marks=[StreamMark(device_id=f"ems_{d:03d}", stream="s", seq=5000) for d in range(7)],
        )
    )
    total = 0
    for d in range(7):
        stored = store.samples(f"ems_{d:03d}", since=None, until=None, limit=10_000)
        assert stored == [r for r in rows if r.device_id == f"ems_{d:03d}"]
        total += len(stored)
        assert store.acked_seq(f"ems_{d:03d}", "s") == 5000
    assert total == 5000


@pytest.mark.parametrize("count", [1, 2, 3, 1023, 1024, 1025, 2049])
def test_batches_of_every_size_store_every_row_exactly(store: Store, count: int) -> None:
    # SQLite inserts in power-of-two chunks of rows: sizes around the chunk boundaries.
    rows = [sample("ems_001", seq=i + 1, ts=T0 + i / 8, voltage=i / 3) for i in range(count)]
    store.write_batch(WriteBatch(samples=rows))
    assert store.samples("ems_001", since=None, until=None, limit=10_000) == rows


def test_sqlite_chunks_within_a_low_limit_on_bound_variables(tmp_path: Path) -> None:
    # Builds before SQLite 3.32 allow 999 variables; the chunk must shrink to fit any limit.
    store = SqliteStore(tmp_path / "ems.db")
    store.open()
    try:
        assert store._conn is not None
        store._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # two rows
        rows = [sample("ems_001", seq=i + 1, ts=T0 + i, voltage=float(i)) for i in range(7)]
        store.write_batch(WriteBatch(samples=[*rows, rows[3]]))  # and a duplicate
        assert store.samples("ems_001", since=None, until=None, limit=100) == rows
    finally:
        store.close()


def test_data_json_round_trips_exactly(store: Store) -> None:
    data: dict[str, Any] = {
        "voltage": 230.1,
        "sum": 0.1 + 0.2,
        "tiny": 1e-300,
        "huge": 1.7976931348623157e308,
        "negative": -40.25,
        "one": 1.0,
        "soc": 87,
        "big": 2**53 + 1,
        "zero": 0,
        "crashDetection": False,
        "online": True,
        "label": 'naïve "quoted" \\back\\slash\ttab\nnewline ünïcödé 温度 🔋 ‏עברית',
        "empty": "",
        "position": {"latitude": 40.71, "longitude": -74.0, "fix": True, "name": "Zürich"},
        "nested": {"a": {"b": {"c": [1, 2.5, "x", None, {"d": False}]}}},
    }
    # COPY_MIN_ROWS copies of it take PostgreSQL's COPY path, the first sample its VALUES path.
    store.write_batch(WriteBatch(samples=[sample("one", ts=T0, **data)]))
    store.write_batch(
        WriteBatch(samples=[sample("many", seq=i, ts=T0 + i, **data) for i in range(300)])
    )
    for device_id in ("one", "many"):
        got = store.latest(device_id)
        assert got is not None
        assert got.data == data
        for key, value in data.items():  # == alone would accept 1 for True, 87.0 for 87
            assert type(got.data[key]) is type(value), key


def test_nul_character_does_not_poison_a_batch(store: Store) -> None:
    # PostgreSQL text cannot hold NUL: the sample is stored with U+FFFD there, not refused.
    store.write_batch(
        WriteBatch(
            samples=[sample(ts=T0, note="a\x00b"), sample(ts=T0 + 1, voltage=1.0)],
            events=[
                EventRow(device_id="ems_001", seq=2, ts=T0, level="info", code="X", message="\x00")
            ],
        )
    )
    rows = store.samples("ems_001", since=None, until=None, limit=10)
    assert rows[0].data["note"] in ("a\x00b", "a\ufffdb")
    assert rows[1].data == {"voltage": 1.0}


# --- telemetry reads -------------------------------------------------------------------------
def test_samples_range_is_inclusive_and_limit_keeps_the_newest(store: Store) -> None:
    store.write_batch(
        WriteBatch(
            samples=[sample("ems_001", seq=i + 1, ts=T0 + i) for i in range(10)]
            + [sample("ems_002", seq=1, ts=T0 + 3)]
        )
    )

    def ts_of(**kwargs: Any) -> list[float]:
        return [r.ts - T0 for r in store.samples("ems_001", **kwargs)]

    assert ts_of(since=None, until=None, limit=1000) == list(range(10))
    assert ts_of(since=T0 + 2, until=T0 + 5, limit=1000) == [2, 3, 4, 5]
    assert ts_of(since=T0 + 2, until=T0 + 5, limit=2) == [4, 5]
    assert ts_of(since=None, until=None, limit=3) == [7, 8, 9]
    assert ts_of(since=T0 + 8, until=None, limit=1000) == [8, 9]
    assert ts_of(since=None, until=T0 + 1, limit=1000) == [0, 1]
    assert ts_of(since=T0 + 2.5, until=T0 + 2.75, limit=1000) == []
    assert ts_of(since=T0 + 5, until=T0 + 2, limit=1000) == []
    assert ts_of(since=None, until=None, limit=0) == []
    assert store.samples("nobody", since=None, until=None, limit=10) == []


def test_latest_and_latest_many(store: Store) -> None:
    assert store.latest("ems_001") is None
    assert store.latest_many([]) == {}
    store.write_batch(WriteBatch(samples=[sample("ems_001", seq=1, ts=T0 + 5)]))
    store.write_batch(  # an older sample arriving later (history) is not the latest
        WriteBatch(
            samples=[sample("ems_001", seq=2, ts=T0 + 1), sample("ems_002", seq=1, ts=T0 + 2)]
        )
    )
    assert store.latest("ems_001") == sample("ems_001", seq=1, ts=T0 + 5)
    assert store.latest_many(["ems_001", "ems_002", "missing", "ems_001"]) == {
        "ems_001": sample("ems_001", seq=1, ts=T0 + 5),
        "ems_002": sample("ems_002", seq=1, ts=T0 + 2),
    }


# --- devices ---------------------------------------------------------------------------------
def test_devices_create_get_conflict_list(store: Store) -> None:
    records = [
        device("b_dev", owner="alice"),
        device("A_dev", owner="bob"),
        device("a.dev", owner="alice", name=None, metadata={}),
        device("Z-9", owner=None),
    ]
    for record in records:
        store.create_device(record)
    with pytest.raises(Conflict):
        store.create_device(device("b_dev", owner="mallory"))
    assert issubclass(Conflict, StoreError)

    assert store.get_device("a.dev") == records[2]
    assert store.get_device("b_dev") == records[0]  # the conflicting create changed nothing
    assert store.get_device("missing") is None
    # Ordered by device_id in byte order, whatever the database's locale.
    assert [d.device_id for d in store.list_devices()] == ["A_dev", "Z-9", "a.dev", "b_dev"]
    assert store.list_devices() == sorted(records, key=lambda d: d.device_id)
    assert [d.device_id for d in store.list_devices("alice")] == ["a.dev", "b_dev"]
    assert store.list_devices("nobody") == []


def test_device_token_and_info(store: Store) -> None:
    store.create_device(device("ems_001"))
    assert store.set_token_hash("ems_001", "new-hash") is True
    assert store.set_token_hash("missing", "x") is False
    store.set_device_info("ems_001", firmware="1.4.2", agent="ems-edge/1.0.0")
    store.set_device_info("missing", firmware="1", agent="x")  # no error, nothing made
    record = store.get_device("ems_001")
    assert record is not None
    assert (record.token_hash, record.firmware, record.agent) == (
        "new-hash",
        "1.4.2",
        "ems-edge/1.0.0",
    )
    store.set_device_info("ems_001", firmware=None, agent="ems-edge/1.1.0")
    record = store.get_device("ems_001")
    assert record is not None
    assert (record.firmware, record.agent) == (None, "ems-edge/1.1.0")
    assert store.get_device("missing") is None


def test_delete_device_removes_everything_stored_for_it(store: Store) -> None:
    for device_id in ("gone", "kept"):
        store.create_device(device(device_id))
        store.write_batch(
            WriteBatch(
                samples=[sample(device_id, seq=1, ts=T0)],
                events=[
                    EventRow(device_id=device_id, seq=2, ts=T0, level="info", code="C", message="")
                ],
                alerts=[alert(device_id, T0)],
                marks=[StreamMark(device_id=device_id, stream="s", seq=2)],
            )
        )
    assert store.delete_device("gone") is True
    assert store.get_device("gone") is None
    assert store.samples("gone", since=None, until=None, limit=10) == []
    assert store.latest("gone") is None
    assert store.acked_seq("gone", "s") == 0
    assert store.alerts(device_ids=["gone"], since=None, limit=10) == []
    assert store.delete_device("gone") is False
    # The other device is untouched.
    assert store.get_device("kept") is not None
    assert store.latest("kept") is not None
    assert store.acked_seq("kept", "s") == 2
    assert len(store.alerts(device_ids=None, since=None, limit=10)) == 1
    # The id can be used again, from scratch.
    store.create_device(device("gone"))
    assert store.latest("gone") is None


# --- users and sessions ----------------------------------------------------------------------
def test_users(store: Store) -> None:
    users = [
        UserRecord(username="operator1", password_hash="h1", role="operator", created_at=T0),
        UserRecord(username="Admin", password_hash="h2", role="admin", created_at=T0 + 1),
        UserRecord(username="viewer", password_hash="h3", role="viewer", created_at=T0 + 2.5),
    ]
    for user in users:
        store.create_user(user)
    with pytest.raises(Conflict):
        store.create_user(
            UserRecord(username="viewer", password_hash="other", role="admin", created_at=T0)
        )
    assert store.get_user("viewer") == users[2]
    assert store.get_user("missing") is None
    assert store.list_users() == sorted(users, key=lambda u: u.username)


def test_sessions(store: Store) -> None:
    sessions = [
        SessionRecord(token_hash=f"t{i}", username="alice", expires_at=T0 + i) for i in range(5)
    ]
    for session in sessions:
        store.create_session(session)
    assert store.get_session("t3") == sessions[3]
    assert store.get_session("missing") is None
    store.delete_session("t3")
    store.delete_session("missing")
    assert store.get_session("t3") is None
    # Expired means expires_at <= now.
    assert store.purge_sessions(T0 + 1) == 2
    assert [store.get_session(f"t{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        False,
        True,
    ]
    assert store.purge_sessions(T0 + 1) == 0


# --- alerts ----------------------------------------------------------------------------------
def test_alerts_filtered_oldest_first_newest_limit(store: Store) -> None:
    store.write_batch(
        WriteBatch(
            alerts=[
                alert("ems_001", T0 + 3, "HIGH_RPM"),
                alert("ems_002", T0 + 1),
                alert("ems_001", T0 + 1, "CRASH_DETECTED"),
            ]
        )
    )
    store.write_batch(WriteBatch(alerts=[alert("ems_003", T0 + 2), alert("ems_001", T0 + 4)]))

    def view(**kwargs: Any) -> list[tuple[str, float]]:
        return [(a["device_id"], a["ts"] - T0) for a in store.alerts(**kwargs)]

    everything = store.alerts(device_ids=None, since=None, limit=100)
    assert set(everything[0]) == {"id", "device_id", "ts", "level", "code", "message"}
    assert everything[0]["level"] == "warning"
    assert all(isinstance(a["id"], int) for a in everything)
    assert len({a["id"] for a in everything}) == 5
    # Oldest first (ties in insertion order).
    assert view(device_ids=None, since=None, limit=100) == [
        ("ems_002", 1),
        ("ems_001", 1),
        ("ems_003", 2),
        ("ems_001", 3),
        ("ems_001", 4),
    ]
    assert view(device_ids=None, since=None, limit=2) == [("ems_001", 3), ("ems_001", 4)]
    assert view(device_ids=["ems_001"], since=None, limit=100) == [
        ("ems_001", 1),
        ("ems_001", 3),
        ("ems_001", 4),
    ]
    assert view(device_ids=["ems_002", "ems_003"], since=T0 + 2, limit=100) == [("ems_003", 2)]
    assert view(device_ids=None, since=T0 + 3, limit=100) == [("ems_001", 3), ("ems_001", 4)]
    assert view(device_ids=[], since=None, limit=100) == []
    assert view(device_ids=["missing"], since=None, limit=100) == []
    assert view(device_ids=None, since=None, limit=0) == []


def test_alert_rules(store: Store) -> None:
    assert store.get_alert_rules() is None
    rules = [
        {
            "code": "LOW_BATTERY",
            "metric": "batteryVoltage",
            "op": "<",
            "threshold": 12.0,
            "level": "warning",
            "message": "Battery low",
        },
        {
            "code": "HIGH_RPM",
            "metric": "engineRpm",
            "op": ">",
            "threshold": 4000,
            "level": "warning",
            "message": "RPM high",
        },
    ]
    store.put_alert_rules(rules)
    got = store.get_alert_rules()
    assert got == rules
    assert got is not None
    assert [list(rule) for rule in got] == [list(rule) for rule in rules]  # key order kept
    store.put_alert_rules([])
    assert store.get_alert_rules() == []
    store.put_alert_rules(rules[1:])
    assert store.get_alert_rules() == rules[1:]


# --- commands --------------------------------------------------------------------------------
DAY_MS = 86_400_000.0


def command(
    command_id: str,
    device_id: str = "ems_001",
    *,
    kind: str = "command",
    name: str | None = None,
    at: float = T0,
    expires_at: float | None = T0 + DAY_MS,
    params: dict[str, Any] | None = None,
    delivery: str = "queued",
) -> CommandRow:
    name = name if name is not None else ("reboot" if kind == "command" else kind)
    params = {"delay_s": 5} if params is None else params
    payload: dict[str, Any] = {"type": kind, "id": command_id, "name": name, "params": params}
    if expires_at is not None:
        payload["expires_at"] = expires_at
    return CommandRow(
        id=command_id,
        device_id=device_id,
        kind=kind,
        name=name,
        params=params,
        payload=payload,
        status="pending",
        created_at=at,
        updated_at=at,
        expires_at=expires_at,
        delivery=delivery,
    )


def update(
    command_id: str, status: str, at: float, device_id: str = "ems_001", **fields: Any
) -> CommandUpdate:
    return CommandUpdate(id=command_id, device_id=device_id, status=status, at=at, **fields)


def create(store: Store, *rows: CommandRow, max_pending: int = 50) -> None:
    for row in rows:
        assert store.create_command(row, max_pending=max_pending, supersede=False) == []


def status_of(store: Store, command_id: str) -> str:
    row = store.get_command(command_id)
    assert row is not None
    return row.status


def test_commands_create_get_list(store: Store) -> None:
    rows = [command(f"c{i}", at=T0 + i) for i in range(5)]
    create(store, *rows, command("other", device_id="ems_002", at=T0))
    assert store.get_command("c3") == rows[3]
    assert store.get_command("missing") is None
    # The newest `limit`, oldest first.
    assert store.list_commands("ems_001", limit=100) == rows
    assert store.list_commands("ems_001", limit=2) == rows[3:]
    assert store.list_commands("ems_001", limit=0) == []
    assert [c.id for c in store.list_commands("ems_002", limit=10)] == ["other"]
    assert store.list_commands("nobody", limit=10) == []
    # An id is unique across devices.
    with pytest.raises(Conflict):
        create(store, command("c1", device_id="ems_003"))
    assert store.get_command("c1") == rows[1]
    assert store.list_commands("ems_003", limit=10) == []


def test_commands_created_in_one_millisecond_keep_insertion_order(store: Store) -> None:
    ids = ["zz", "aa", "mm", "bb"]
    create(store, *(command(i, at=T0) for i in ids))
    assert [c.id for c in store.list_commands("ems_001", limit=10)] == ids
    assert [c.id for c in store.list_commands("ems_001", limit=2)] == ids[2:]
    assert [c.id for c in store.deliverable_commands("ems_001", T0)] == ids
    assert [c.id for c in store.changed_commands(list(reversed(ids)))] == ids


def test_create_command_stores_it_pending_with_every_field(store: Store) -> None:
    row = command("sw1", kind="software_update", expires_at=None, delivery="latest_only", params={})
    create(store, row)
    got = store.get_command("sw1")
    assert got == row
    assert got is not None
    assert (got.status, got.progress, got.result, got.error) == ("pending", None, None, None)
    assert (got.expires_at, got.delivery, got.kind, got.name) == (
        None,
        "latest_only",
        "software_update",
        "software_update",
    )


def test_command_json_fields_round_trip_exactly(store: Store) -> None:
    document: dict[str, Any] = {
        "zeta": 1,
        "alpha": 0.1 + 0.2,
        "tiny": 1e-300,
        "huge": 1.7976931348623157e308,
        "one": 1.0,
        "big": 2**53 + 1,
        "flag": False,
        "none": None,
        "text": 'naïve "quoted" \\back\\slash\ttab\nnewline 温度 🔋 ‏עברית',
        "nested": {"b": [1, 2.5, "x", None, {"d": True}], "a": {}},
        "list": [],
    }
    row = command("c1", params=document)
    row = attrs.evolve(row, payload={**row.payload, "extra": document})
    create(store, row)
    store.write_batch(
        WriteBatch(command_updates=[update("c1", "succeeded", T0 + 1, result=document)])
    )
    got = store.get_command("c1")
    assert got is not None

    def check(value: Any, wanted: Any) -> None:
        assert value == wanted
        assert type(value) is type(wanted)
        if isinstance(wanted, dict):
            assert list(value) == list(wanted)  # key order kept
            for key in wanted:
                check(value[key], wanted[key])
        elif isinstance(wanted, list):
            for got_item, wanted_item in zip(value, wanted, strict=True):
                check(got_item, wanted_item)

    check(got.params, document)
    check(got.payload, row.payload)
    check(got.result, document)


def test_max_pending_counts_only_pending_commands(store: Store) -> None:
    create(store, command("c1", at=T0), command("c2", at=T0 + 1), max_pending=2)
    with pytest.raises(Conflict):
        store.create_command(command("c3", at=T0 + 2), max_pending=2, supersede=False)
    assert store.get_command("c3") is None
    # Another device has its own count.
    create(store, command("d1", device_id="ems_002"), max_pending=2)
    # A command that left `pending` no longer counts.
    store.update_command(update("c1", "sent", T0 + 3))
    create(store, command("c3", at=T0 + 4), max_pending=2)
    with pytest.raises(Conflict):
        store.create_command(command("c4", at=T0 + 5), max_pending=2, supersede=False)
    store.write_batch(
        WriteBatch(command_updates=[update("c2", "sent", T0 + 6), update("c3", "sent", T0 + 6)])
    )
    create(store, command("c4", at=T0 + 7), command("c5", at=T0 + 8), max_pending=2)
    assert [c.id for c in store.list_commands("ems_001", limit=10)] == [
        "c1",
        "c2",
        "c3",
        "c4",
        "c5",
    ]


def test_supersede_expires_older_open_commands_of_the_same_kind(store: Store) -> None:
    sw = "software_update"
    create(
        store,
        command("sw1", kind=sw, at=T0),
        command("sw2", kind=sw, at=T0 + 1),
        command("sw3", kind=sw, at=T0 + 2),
        command("sw4", kind=sw, at=T0 + 3),
        command("cmd", kind="command", at=T0 + 4),
        command("sw_other", device_id="ems_002", kind=sw, at=T0 + 5),
    )
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("sw2", "sent", T0 + 10),
                update("sw3", "received", T0 + 10),
                update("sw4", "failed", T0 + 10, error="bad image"),
            ]
        )
    )
    new = command("sw5", kind=sw, at=T0 + 20)
    superseded = store.create_command(new, max_pending=50, supersede=True)
    assert superseded == ["sw1", "sw2"]  # oldest first
    for command_id in superseded:
        row = store.get_command(command_id)
        assert row is not None
        assert (row.status, row.error, row.updated_at) == ("expired", "superseded by sw5", T0 + 20)
    # `received` and final ones, other kinds and other devices are untouched.
    assert status_of(store, "sw3") == "received"
    failed = store.get_command("sw4")
    assert failed is not None
    assert (failed.status, failed.error) == ("failed", "bad image")
    assert status_of(store, "cmd") == "pending"
    assert status_of(store, "sw_other") == "pending"
    assert store.get_command("sw5") == new
    assert [c.id for c in store.changed_commands(superseded)] == ["sw1", "sw2"]
    # Nothing left to supersede; without `supersede` nothing is touched.
    assert store.create_command(
        command("sw6", kind=sw, at=T0 + 21), max_pending=50, supersede=True
    ) == ["sw5"]
    assert (
        store.create_command(command("sw7", kind=sw, at=T0 + 22), max_pending=50, supersede=False)
        == []
    )
    assert status_of(store, "sw6") == "pending"


def test_supersede_frees_its_pending_slot_and_rolls_back_on_conflict(store: Store) -> None:
    sw = "software_update"
    create(store, command("sw1", kind=sw, at=T0), max_pending=1)
    # The superseded command no longer counts as pending: the newer one fits.
    assert store.create_command(
        command("sw2", kind=sw, at=T0 + 1), max_pending=1, supersede=True
    ) == ["sw1"]
    # Full with something the new one does not supersede: refused, and nothing changed.
    create(store, command("cmd", at=T0 + 2), max_pending=2)
    with pytest.raises(Conflict):
        store.create_command(command("sw3", kind=sw, at=T0 + 3), max_pending=1, supersede=True)
    assert status_of(store, "sw2") == "pending"
    sw2 = store.get_command("sw2")
    assert sw2 is not None
    assert sw2.error is None
    assert store.get_command("sw3") is None


def test_deliverable_commands_are_open_unexpired_oldest_first(store: Store) -> None:
    now = T0 + 1000
    create(
        store,
        command("sent", at=T0 + 2),
        command("pending", at=T0 + 1),
        command("no_expiry", at=T0 + 3, expires_at=None),
        command("received", at=T0),
        command("done", at=T0),
        command("expired_at_now", at=T0, expires_at=now),
        command("past", at=T0, expires_at=now - 1),
        command("just_alive", at=T0 + 4, expires_at=now + 0.5),
        command("other_device", device_id="ems_002", at=T0),
    )
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("sent", "sent", T0 + 10),
                update("received", "received", T0 + 10),
                update("done", "succeeded", T0 + 10),
            ]
        )
    )
    got = store.deliverable_commands("ems_001", now)
    assert [c.id for c in got] == ["pending", "sent", "no_expiry", "just_alive"]
    assert [c.status for c in got] == ["pending", "sent", "pending", "pending"]
    assert store.deliverable_commands("nobody", now) == []


def test_command_status_only_rises_through_write_batch(store: Store) -> None:
    create(store, command("c1"), command("c2"), command("c3"))
    # Out of order: the final status arrives before a late `received`.
    store.write_batch(
        WriteBatch(command_updates=[update("c1", "succeeded", T0 + 5, result={"ok": True})])
    )
    store.write_batch(WriteBatch(command_updates=[update("c1", "received", T0 + 6)]))
    row = store.get_command("c1")
    assert row is not None
    assert (row.status, row.result, row.updated_at) == ("succeeded", {"ok": True}, T0 + 5)
    # A final status never changes, not even to another final one.
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("c1", "failed", T0 + 7, error="late"),
                update("c1", "running", T0 + 7, progress=99),
                update("c1", "expired", T0 + 7),
            ]
        )
    )
    assert store.get_command("c1") == row
    # `running` may repeat (progress); a lower status does not undo it.
    store.write_batch(WriteBatch(command_updates=[update("c2", "received", T0 + 1)]))
    store.write_batch(WriteBatch(command_updates=[update("c2", "running", T0 + 2, progress=10)]))
    row = store.get_command("c2")
    assert row is not None
    assert (row.status, row.progress) == ("running", 10)
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("c2", "running", T0 + 3, progress=50),
                update("c2", "sent", T0 + 4),
                update("c2", "received", T0 + 4),
            ]
        )
    )
    row = store.get_command("c2")
    assert row is not None
    assert (row.status, row.progress, row.updated_at) == ("running", 50, T0 + 3)
    # Fields an update does not carry keep their value.
    store.write_batch(
        WriteBatch(command_updates=[update("c2", "failed", T0 + 8, error="disk full")])
    )
    row = store.get_command("c2")
    assert row is not None
    assert (row.status, row.progress, row.error, row.result) == ("failed", 50, "disk full", None)
    # Several updates of one command in one batch apply in order.
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("c3", "sent", T0 + 1),
                update("c3", "received", T0 + 2),
                update("c3", "running", T0 + 3, progress=20.5),
                update("c3", "received", T0 + 4),
                update("c3", "running", T0 + 5, progress=70.25),
            ]
        )
    )
    row = store.get_command("c3")
    assert row is not None
    assert (row.status, row.progress, row.updated_at) == ("running", 70.25, T0 + 5)


def test_command_updates_for_unknown_or_foreign_ids_are_ignored(store: Store) -> None:
    store.create_device(device("ems_001"))
    create(store, command("mine"), command("theirs", device_id="ems_002"))
    store.write_batch(
        WriteBatch(
            samples=[sample("ems_001", seq=1, ts=T0)],
            command_updates=[
                update("missing", "succeeded", T0 + 1),
                update("theirs", "succeeded", T0 + 1),  # sent by ems_001: not its command
                update("mine", "no_such_status", T0 + 1),
                update("mine", "received", T0 + 2),
            ],
            last_seen={"ems_001": T0 + 2},
        )
    )
    assert store.get_command("missing") is None
    assert store.get_command("theirs") == command("theirs", device_id="ems_002")
    mine = store.get_command("mine")
    assert mine is not None
    assert (mine.status, mine.updated_at) == ("received", T0 + 2)
    # The rest of the batch committed with them.
    assert store.latest("ems_001") == sample("ems_001", seq=1, ts=T0)
    record = store.get_device("ems_001")
    assert record is not None
    assert record.last_seen == T0 + 2


def test_update_command(store: Store) -> None:
    create(store, command("c1"), command("theirs", device_id="ems_002"))
    sent = store.update_command(update("c1", "sent", T0 + 1))
    assert sent == attrs.evolve(command("c1"), status="sent", updated_at=T0 + 1)
    assert store.get_command("c1") == sent
    # A lower or equal rank changes nothing; the row is returned as it is.
    assert store.update_command(update("c1", "sent", T0 + 2)) == sent
    assert store.update_command(update("c1", "pending", T0 + 2)) == sent
    assert store.update_command(update("c1", "bogus", T0 + 2)) == sent
    running = store.update_command(update("c1", "running", T0 + 3, progress=10))
    assert running is not None
    assert (running.status, running.progress) == ("running", 10)
    running = store.update_command(update("c1", "running", T0 + 4, progress=50))
    assert running is not None
    assert (running.status, running.progress, running.updated_at) == ("running", 50, T0 + 4)
    done = store.update_command(update("c1", "succeeded", T0 + 5, result={"uptime_s": 3}))
    assert done is not None
    assert (done.status, done.progress, done.result) == ("succeeded", 50, {"uptime_s": 3})
    assert store.update_command(update("c1", "received", T0 + 6)) == done
    # Unknown id, or the id of another device's command: None, and nothing changes.
    assert store.update_command(update("missing", "sent", T0)) is None
    assert store.update_command(update("theirs", "sent", T0)) is None
    assert store.get_command("theirs") == command("theirs", device_id="ems_002")


def test_expire_commands_touches_only_open_commands_past_expiry(store: Store) -> None:
    now = T0 + 1000
    create(
        store,
        command("pending_past", at=T0 + 1, expires_at=now - 1),
        command("sent_at_now", at=T0, expires_at=now),
        command("received_past", at=T0, expires_at=now - 1),
        command("running_past", at=T0, expires_at=now - 1),
        command("done_past", at=T0, expires_at=now - 1),
        command("future", at=T0, expires_at=now + 1),
        command("never", at=T0, expires_at=None),
        command("other_device", device_id="ems_002", at=T0 + 2, expires_at=now - 5),
    )
    store.write_batch(
        WriteBatch(
            command_updates=[
                update("sent_at_now", "sent", T0 + 10),
                update("received_past", "received", T0 + 10),
                update("running_past", "running", T0 + 10, progress=5),
                update("done_past", "succeeded", T0 + 10),
            ]
        )
    )
    expired = store.expire_commands(now)
    assert [c.id for c in expired] == ["sent_at_now", "pending_past", "other_device"]
    for row in expired:
        assert (row.status, row.updated_at) == ("expired", now)
        assert store.get_command(row.id) == row
    assert status_of(store, "received_past") == "received"
    assert status_of(store, "running_past") == "running"
    assert status_of(store, "done_past") == "succeeded"
    assert status_of(store, "future") == "pending"
    assert status_of(store, "never") == "pending"
    assert store.expire_commands(now) == []
    # An expired command is final.
    store.write_batch(WriteBatch(command_updates=[update("pending_past", "received", now + 1)]))
    assert status_of(store, "pending_past") == "expired"
    assert [c.id for c in store.expire_commands(now + 1)] == ["future"]


def test_changed_commands(store: Store) -> None:
    create(
        store, command("a", at=T0), command("b", at=T0 + 1), command("c", device_id="x", at=T0 + 2)
    )
    assert store.changed_commands([]) == []
    assert store.changed_commands(["missing"]) == []
    got = store.changed_commands(["c", "missing", "a", "a"])
    assert got == [command("a", at=T0), command("c", device_id="x", at=T0 + 2)]
    store.write_batch(WriteBatch(command_updates=[update("b", "received", T0 + 5)]))
    [b] = store.changed_commands(["b"])
    assert (b.status, b.updated_at) == ("received", T0 + 5)


def test_command_text_with_nul_does_not_poison_a_batch(store: Store) -> None:
    create(store, command("c1"))
    store.write_batch(
        WriteBatch(
            samples=[sample(ts=T0)],
            command_updates=[
                update("c1", "failed", T0 + 1, error="bad\x00", result={"log": "a\x00b"})
            ],
        )
    )
    row = store.get_command("c1")
    assert row is not None
    assert row.status == "failed"
    assert row.error in ("bad\x00", "bad\ufffd")
    assert row.result is not None
    assert row.result["log"] in ("a\x00b", "a\ufffdb")
    assert store.latest("ems_001") is not None


# --- config ------------------------------------------------------------------------------------
def report(
    version: int, status: str = "applied", at: float = T0, device_id: str = "ems_001", **extra: Any
) -> ConfigReport:
    return ConfigReport(device_id=device_id, version=version, status=status, at=at, **extra)


def test_desired_config_versions_increment_per_device(store: Store) -> None:
    assert store.get_config("ems_001") is None
    first = {"sample_interval_s": 5, "alerts": {"enabled": True}}
    state = store.put_desired_config("ems_001", first, T0)
    assert state == ConfigState(
        device_id="ems_001", desired_version=1, desired=first, updated_at=T0
    )
    assert store.get_config("ems_001") == state
    second = {"sample_interval_s": 10}
    state = store.put_desired_config("ems_001", second, T0 + 1)
    assert (state.desired_version, state.desired, state.updated_at) == (2, second, T0 + 1)
    assert store.put_desired_config("ems_002", {}, T0 + 2).desired_version == 1
    assert store.put_desired_config("ems_001", first, T0 + 3).desired_version == 3
    assert store.get_config("ems_001") == ConfigState(
        device_id="ems_001", desired_version=3, desired=first, updated_at=T0 + 3
    )
    assert store.get_config("ems_002") == ConfigState(
        device_id="ems_002", desired_version=1, desired={}, updated_at=T0 + 2
    )


def test_desired_config_round_trips_exactly(store: Store) -> None:
    document: dict[str, Any] = {
        "z": {"y": 1, "x": [1.0, 2, "3", None, False]},
        "a": 0.1 + 0.2,
        "tiny": 1e-300,
        "big": 2**53 + 1,
        "name": "Zürich 温度 🔋",
        "empty": {},
    }
    store.put_desired_config("ems_001", document, T0)
    state = store.get_config("ems_001")
    assert state is not None
    assert state.desired == document
    assert list(state.desired) == list(document)
    assert list(state.desired["z"]) == ["y", "x"]
    assert [type(v) for v in state.desired["z"]["x"]] == [float, int, str, type(None), bool]
    assert type(state.desired["a"]) is float
    assert type(state.desired["big"]) is int


def test_config_reports_are_stored_and_older_ones_ignored(store: Store) -> None:
    store.create_device(device("ems_001"))
    store.put_desired_config("ems_001", {"k": 1}, T0)
    store.put_desired_config("ems_001", {"k": 2}, T0 + 1)
    store.write_batch(WriteBatch(config_reports=[report(2, at=T0 + 10)]))
    state = store.get_config("ems_001")
    assert state == ConfigState(
        device_id="ems_001",
        desired_version=2,
        desired={"k": 2},
        reported_version=2,
        reported_status="applied",
        updated_at=T0 + 10,
    )
    # An older report (late, out of order) changes nothing.
    store.write_batch(WriteBatch(config_reports=[report(1, "rejected", T0 + 11, error="x")]))
    assert store.get_config("ems_001") == state
    # The same version again is stored (the device re-judged it).
    store.write_batch(WriteBatch(config_reports=[report(2, "rejected", T0 + 12, error="bad")]))
    state = store.get_config("ems_001")
    assert state is not None
    assert (state.reported_version, state.reported_status, state.reported_error) == (
        2,
        "rejected",
        "bad",
    )
    assert state.updated_at == T0 + 12
    # Several in one batch: the highest version wins, whatever the order.
    store.write_batch(
        WriteBatch(config_reports=[report(4, at=T0 + 13), report(3, "rejected", T0 + 14)])
    )
    state = store.get_config("ems_001")
    assert state is not None
    assert (state.reported_version, state.reported_status, state.reported_error) == (
        4,
        "applied",
        None,
    )
    # A new desired version keeps what was reported.
    state = store.put_desired_config("ems_001", {"k": 5}, T0 + 20)
    assert (state.desired_version, state.reported_version, state.reported_status) == (
        3,
        4,
        "applied",
    )


def test_config_report_without_desired_config(store: Store) -> None:
    store.create_device(device("ems_001"))
    store.write_batch(
        WriteBatch(
            config_reports=[report(3, at=T0), report(1, device_id="unknown_device")],
            last_seen={"ems_001": T0},
        )
    )
    # Stored against desired version 0 (none yet); the next desired version is 1.
    assert store.get_config("ems_001") == ConfigState(
        device_id="ems_001",
        desired_version=0,
        desired={},
        reported_version=3,
        reported_status="applied",
        updated_at=T0,
    )
    assert store.get_config("unknown_device") is None  # not a device: nothing kept
    state = store.put_desired_config("ems_001", {"a": 1}, T0 + 1)
    assert (state.desired_version, state.reported_version) == (1, 3)
    # A version no BIGINT holds is ignored, not a failed batch.
    store.write_batch(WriteBatch(config_reports=[report(2**64, at=T0 + 2)]))
    state = store.get_config("ems_001")
    assert state is not None
    assert state.reported_version == 3


# --- artifacts ---------------------------------------------------------------------------------
def artifact(sha: str, version: str = "1.0.0", at: float = T0, **extra: Any) -> ArtifactRow:
    return ArtifactRow(
        sha256=sha * 64,
        size=extra.pop("size", 12_345_678_901),
        version=version,
        signature=extra.pop("signature", None),
        created_at=at,
    )


def test_artifacts_insert_or_keep_and_list(store: Store) -> None:
    assert store.list_artifacts() == []
    assert store.get_artifact("b" * 64) is None
    b = artifact("b", "2.0.0", T0 + 1, signature="sig==")
    a = artifact("a", "1.0.0", T0 + 2, size=0)
    c = artifact("c", "1.5.0", T0 + 1)
    for row in (b, a, c):
        store.put_artifact(row)
    assert store.get_artifact("b" * 64) == b
    assert store.get_artifact("a" * 64) == a
    # Content-addressed: the same sha256 again keeps the first row.
    store.put_artifact(artifact("b", "9.9.9", T0 + 5, signature=None))
    assert store.get_artifact("b" * 64) == b
    assert store.list_artifacts() == [b, c, a]  # oldest first (ties by sha256)


def test_delete_device_removes_its_commands_and_config(store: Store) -> None:
    for device_id in ("gone", "kept"):
        store.create_device(device(device_id))
        create(store, command(f"{device_id}_c", device_id=device_id))
        store.put_desired_config(device_id, {"k": 1}, T0)
    store.put_artifact(artifact("a"))
    assert store.delete_device("gone") is True
    assert store.get_command("gone_c") is None
    assert store.list_commands("gone", limit=10) == []
    assert store.get_config("gone") is None
    assert store.get_command("kept_c") is not None
    assert store.get_config("kept") is not None
    assert store.list_artifacts() == [artifact("a")]
    # Created again, the device starts from scratch: desired version 1.
    store.create_device(device("gone"))
    assert store.put_desired_config("gone", {}, T0 + 1).desired_version == 1


# --- lifecycle -------------------------------------------------------------------------------
def test_reopen_keeps_data_and_schema(store_factory: Any) -> None:
    first: Store = store_factory()
    first.open()
    first.open()  # idempotent
    first.create_device(device("ems_001"))
    first.write_batch(
        WriteBatch(
            samples=[sample(seq=1, ts=T0)],
            marks=[StreamMark(device_id="ems_001", stream="s", seq=1)],
        )
    )
    first.put_alert_rules([{"code": "X"}])
    create(first, command("c1"))
    first.put_desired_config("ems_001", {"k": 1}, T0)
    first.put_artifact(artifact("a"))
    first.close()
    first.close()  # idempotent

    second: Store = store_factory()
    second.open()
    try:
        assert second.get_device("ems_001") == device("ems_001")
        assert second.latest("ems_001") == sample(seq=1, ts=T0)
        assert second.acked_seq("ems_001", "s") == 1
        assert second.get_alert_rules() == [{"code": "X"}]
        assert second.get_command("c1") == command("c1")
        config = second.get_config("ems_001")
        assert config is not None
        assert (config.desired_version, config.desired) == (1, {"k": 1})
        assert second.list_artifacts() == [artifact("a")]
        second.ping()
    finally:
        second.close()


def test_version_1_database_migrates_keeping_its_data(
    store_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    old: Store = store_factory()
    module = sys.modules[type(old).__module__]
    with monkeypatch.context() as patch:  # this program as it was at schema version 1
        patch.setattr(module, "MIGRATIONS", module.MIGRATIONS[:1])
        patch.setattr(module, "SCHEMA_VERSION", 1)
        old.open()
        old.create_device(device("ems_001"))
        old.write_batch(WriteBatch(samples=[sample(seq=1, ts=T0)]))
        old.close()
    new: Store = store_factory()
    new.open()
    try:
        assert new.get_device("ems_001") == device("ems_001")
        assert new.latest("ems_001") == sample(seq=1, ts=T0)
        create(new, command("c1"))
        assert new.get_command("c1") == command("c1")
        assert new.put_desired_config("ems_001", {}, T0).desired_version == 1
    finally:
        new.close()
    # A database newer than the program is refused.
    with monkeypatch.context() as patch:
        patch.setattr(module, "SCHEMA_VERSION", 1)
        newer: Store = store_factory()
        with pytest.raises(StoreError):
            newer.open()


def test_closed_store_raises_store_error(store_factory: Any) -> None:
    unopened: Store = store_factory()
    with pytest.raises(StoreError):
        unopened.ping()
    unopened.open()
    unopened.ping()
    unopened.close()
    with pytest.raises(StoreError):
        unopened.latest("ems_001")


def test_sqlite_unusable_path_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteStore(tmp_path / "missing-dir" / "ems.db").open()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ems.db")
    store.open()
    try:
        store.write_batch(WriteBatch(samples=[sample()]))
        assert (tmp_path / "ems.db-wal").exists()
    finally:
        store.close()


def test_postgres_unreachable_is_store_error() -> None:
    # A bound but not listening socket: connecting to its port is refused at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/ems", connect_timeout=2)
        with pytest.raises(StoreError):
            store.open()


@pytest.mark.postgres
def test_postgres_reconnects_after_losing_its_connection(postgres_db_url: str) -> None:
    store = PostgresStore(postgres_db_url)
    store.open()
    try:
        store.write_batch(WriteBatch(samples=[sample(seq=1, ts=T0)]))
        with psycopg.connect(postgres_db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with pytest.raises(StoreError):
            store.ping()
        # The next call connects again; nothing was lost.
        store.write_batch(WriteBatch(samples=[sample(seq=2, ts=T0 + 1)]))
        assert [s.seq for s in store.samples("ems_001", since=None, until=None, limit=10)] == [
            1,
            2,
        ]
    finally:
        store.close()


# --- the protocol itself --------------------------------------------------------------------
def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


@pytest.mark.parametrize("implementation", [SqliteStore, PostgresStore])
def test_implementations_match_the_protocol_signatures(implementation: type) -> None:
    wanted = _public_methods(Store)
    got = _public_methods(implementation)
    for name, signature in wanted.items():
        assert name in got, name
        assert got[name] == signature, name


def test_async_store_matches_the_protocol_parameters() -> None:
    got = _public_methods(AsyncStore)
    for name, signature in _public_methods(Store).items():
        assert inspect.iscoroutinefunction(getattr(AsyncStore, name)), name
        assert list(got[name].parameters.values()) == list(signature.parameters.values()), name


# --- open_store ------------------------------------------------------------------------------
def test_open_store_chooses_the_backend(tmp_path: Path) -> None:
    data_dir = tmp_path / "nested" / "data"
    embedded = open_store(None, data_dir)
    assert isinstance(embedded, SqliteStore)
    assert embedded.path == data_dir / "ems.db"
    assert data_dir.is_dir()
    assert isinstance(open_store("", data_dir), SqliteStore)
    for url in ("postgresql://u@db.example/ems", "postgres://u@db.example/ems"):
        chosen = open_store(url, tmp_path / "unused")
        assert isinstance(chosen, PostgresStore)
        assert chosen.url == url
    assert not (tmp_path / "unused").exists()


# --- AsyncStore ------------------------------------------------------------------------------
class _ConcurrencyProbe:
    """Forwards to a store and records how many calls ever ran at the same time."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.active += 1
                self.calls += 1
                self.most = max(self.most, self.active)
            try:
                return method(*args, **kwargs)
            finally:
                with self._lock:
                    self.active -= 1

        return call


async def test_async_store_serializes_concurrent_calls(store: Store) -> None:
    probe = _ConcurrencyProbe(store)
    astore = AsyncStore(probe)  # type: ignore[arg-type]
    devices = [f"ems_{i:03d}" for i in range(6)]
    for device_id in devices:
        await astore.create_device(device(device_id, owner="alice"))
    seen_latest: list[SampleRow | None] = []

    async def writer(device_id: str) -> None:
        for i in range(15):
            await astore.write_batch(
                WriteBatch(
                    samples=[sample(device_id, seq=i + 1, ts=T0 + i)],
                    marks=[StreamMark(device_id=device_id, stream="s", seq=i + 1)],
                    last_seen={device_id: T0 + i},
                )
            )

    async def reader(device_id: str) -> None:
        for _ in range(15):
            seen_latest.append(await astore.latest(device_id))
            await astore.list_devices("alice")

    async with trio.open_nursery() as nursery:
        for device_id in devices:
            nursery.start_soon(writer, device_id)
            nursery.start_soon(reader, device_id)

    assert probe.most == 1
    assert probe.calls >= len(devices) * 45
    for device_id in devices:
        rows = await astore.samples(device_id, since=None, until=None, limit=100)
        assert [r.seq for r in rows] == list(range(1, 16))
        assert await astore.acked_seq(device_id, "s") == 15
        record = await astore.get_device(device_id)
        assert record is not None
        assert record.last_seen == T0 + 14
    assert all(s is None or s.device_id in devices for s in seen_latest)
    latest = await astore.latest_many(devices)
    assert {d: s.seq for d, s in latest.items()} == dict.fromkeys(devices, 15)


async def test_async_store_mirrors_every_store_method(store: Store) -> None:
    astore = AsyncStore(store)
    await astore.ping()
    await astore.create_user(
        UserRecord(username="u", password_hash="h", role="viewer", created_at=T0)
    )
    with pytest.raises(Conflict):
        await astore.create_user(
            UserRecord(username="u", password_hash="h", role="viewer", created_at=T0)
        )
    assert [u.username for u in await astore.list_users()] == ["u"]
    assert (await astore.get_user("u")) is not None
    await astore.create_session(SessionRecord(token_hash="t", username="u", expires_at=T0))
    assert (await astore.get_session("t")) is not None
    await astore.delete_session("t")
    assert await astore.purge_sessions(T0) == 0
    await astore.create_device(device("d"))
    assert await astore.set_token_hash("d", "x")
    await astore.set_device_info("d", firmware="1", agent="a")
    assert [d.device_id for d in await astore.list_devices()] == ["d"]
    await astore.write_batch(WriteBatch(alerts=[alert("d", T0)]))
    assert len(await astore.alerts(device_ids=["d"], since=T0, limit=5)) == 1
    assert await astore.get_alert_rules() is None
    await astore.put_alert_rules([{"code": "X"}])
    assert await astore.get_alert_rules() == [{"code": "X"}]
    assert await astore.create_command(command("c1", "d"), max_pending=5, supersede=True) == []
    assert await astore.get_command("c1") == command("c1", "d")
    assert [c.id for c in await astore.list_commands("d", limit=5)] == ["c1"]
    assert [c.id for c in await astore.deliverable_commands("d", T0)] == ["c1"]
    sent = await astore.update_command(update("c1", "sent", T0 + 1, device_id="d"))
    assert sent is not None
    assert sent.status == "sent"
    assert await astore.changed_commands(["c1"]) == [sent]
    [expired] = await astore.expire_commands(T0 + 2 * DAY_MS)
    assert (expired.id, expired.status) == ("c1", "expired")
    state = await astore.put_desired_config("d", {"k": 1}, T0)
    assert state.desired_version == 1
    assert await astore.get_config("d") == state
    await astore.put_artifact(artifact("a"))
    assert await astore.get_artifact("a" * 64) == artifact("a")
    assert await astore.list_artifacts() == [artifact("a")]
    assert await astore.delete_device("d")
    assert (await astore.get_device("d")) is None
    # Every public Store method has an async twin.
    public = {name for name in dir(Store) if not name.startswith("_")}
    assert public <= {name for name in dir(AsyncStore) if not name.startswith("_")}


async def test_async_store_open_and_close(tmp_path: Path) -> None:
    astore = AsyncStore(SqliteStore(tmp_path / "ems.db"))
    await astore.open()
    await astore.write_batch(WriteBatch(samples=[sample()]))
    assert await astore.latest("ems_001") == sample()
    await astore.close()
    with pytest.raises(StoreError):
        await astore.latest("ems_001")
