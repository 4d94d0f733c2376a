"""Helpers shared by the store implementations (JSON text, batch preparation)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ems.hub.store.base import StreamMark


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
