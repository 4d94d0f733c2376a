"""Persistence for the hub: the Store protocol, its SQLite and PostgreSQL implementations, and
`AsyncStore`, which runs one on worker threads for trio code."""

from ems.hub.store.base import (
    AlertRow,
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
)
from ems.hub.store.runner import AsyncStore, open_store

__all__ = [
    "AlertRow",
    "AsyncStore",
    "Conflict",
    "DeviceRecord",
    "EventRow",
    "SampleRow",
    "SessionRecord",
    "Store",
    "StoreError",
    "StreamMark",
    "UserRecord",
    "WriteBatch",
    "open_store",
]
