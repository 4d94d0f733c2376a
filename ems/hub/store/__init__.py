"""Persistence for the hub: the Store protocol, its SQLite and PostgreSQL implementations, and
`AsyncStore`, which runs one on worker threads for trio code."""

from ems.hub.store.base import (
    COMMAND_STATUS_RANK,
    AlertRow,
    ArtifactRow,
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
)
from ems.hub.store.runner import AsyncStore, open_store

__all__ = [
    "COMMAND_STATUS_RANK",
    "AlertRow",
    "ArtifactRow",
    "AsyncStore",
    "CommandRow",
    "CommandUpdate",
    "ConfigReport",
    "ConfigState",
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
