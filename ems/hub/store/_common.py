"""Helpers shared by the store implementations (JSON text, batch preparation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ems.hub.store.base import COMMAND_STATUS_RANK

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ems.hub.store.base import CommandUpdate, StreamMark

COMMAND_COLUMNS = (
    "id, device_id, kind, name, params, payload, status, progress, result, error, "
    "created_at, updated_at, expires_at, delivery"
)
OPEN_SQL = "status IN ('pending', 'sent')"
"""Not yet `received`: what is (re)delivered after a `welcome`, can expire or be superseded."""

FINAL_RANK = max(COMMAND_STATUS_RANK.values())
RANK_SQL = (
    "(CASE status "
    + " ".join(f"WHEN '{status}' THEN {rank}" for status, rank in COMMAND_STATUS_RANK.items())
    + f" ELSE {FINAL_RANK} END)"
)
"""The stored status's rank (an unknown stored status counts as final: never overwritten)."""


def dumps(value: Any) -> str:
    """JSON text of `value` (UTF-8, no escaping of non-ASCII characters)."""
    return orjson.dumps(value).decode()


def loads(text: str | bytes) -> Any:
    return orjson.loads(text)


def merge_marks(marks: Iterable[StreamMark]) -> list[tuple[str, str, int]]:
    """One (device_id, stream, seq) per stream, the highest seq of the batch.

    A multi-row upsert may not touch the same row twice, and only the highest mark matters."""
    best: dict[tuple[str, str], int] = {}
    for mark in marks:
        key = (mark.device_id, mark.stream)
        if mark.seq > best.get(key, -1):
            best[key] = mark.seq
    return [(device_id, stream, seq) for (device_id, stream), seq in best.items()]


def ranked_updates(updates: Iterable[CommandUpdate]) -> list[tuple[CommandUpdate, int, bool]]:
    """(update, its rank, may repeat) for the updates with a known status, in order.

    An update applies when the stored rank is lower, or when both are `running` (progress)."""
    ranked = []
    for update in updates:
        rank = COMMAND_STATUS_RANK.get(update.status)
        if rank is not None:
            ranked.append((update, rank, update.status == "running"))
    return ranked


_INT64 = 2**63


def fits_int64(value: int) -> bool:
    """Whether a device-sent integer fits a BIGINT column (a bogus huge one is ignored rather
    than failing the whole batch)."""
    return -_INT64 <= value < _INT64
