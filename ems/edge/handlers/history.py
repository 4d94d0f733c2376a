"""History uploads: on request (`history_request`) and on a schedule (the `history_upload` job).

Samples come from the local history store, oldest first, in `history` chunks bounded by count
and by encoded size (well under the hub's frame limit), the last one marked `final`. Chunks are
reliable messages like any other: they go through the outbox, so an outage in the middle of an
upload loses nothing. The hub stores each sample once (by device and ts), so a repeated upload
costs bandwidth only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson

from ems.edge.history import AsyncHistory
from ems.logs import get_logger
from ems.protocol import messages as m

log = get_logger("ems.edge.history")

CHUNK_SAMPLES = 500
CHUNK_BYTES = 256 * 1024
PAGE = 2_000


@attrs.define(eq=False, kw_only=True)
class HistoryUploader:
    history: AsyncHistory
    enqueue: Callable[[list[m.ReliableMessage]], Awaitable[None]]
    last_uploaded_ts: float = 0.0
    """The newest ts the scheduled upload has covered (kept in memory; a restart re-uploads,
    which the hub deduplicates)."""

    async def upload(
        self, request_id: str | None, from_ts: float, to_ts: float, metrics: list[str] | None
    ) -> tuple[int, int, float | None]:
        """Queue every stored sample in [from_ts, to_ts] as chunks; (samples, chunks, last ts)."""
        chunks: list[m.History] = []
        current: list[m.Sample] = []
        size = 0
        total = 0
        last_ts: float | None = None
        while True:
            if last_ts is None:
                page = await self.history.range(from_ts, to_ts, metrics, PAGE)
            else:
                page = await self.history.range(None, to_ts, metrics, PAGE, after_ts=last_ts)
            for sample in page:
                encoded = len(orjson.dumps(sample["data"])) + 32
                if current and (len(current) >= CHUNK_SAMPLES or size + encoded > CHUNK_BYTES):
                    chunks.append(_chunk(request_id, current, final=False))
                    current, size = [], 0
                current.append(m.Sample(ts=sample["ts"], data=sample["data"]))
                size += encoded
                total += 1
                last_ts = sample["ts"]
            if len(page) < PAGE:
                break
            if len(chunks) >= 20:  # keep memory bounded: queue what is ready
                await self.enqueue(list(chunks))
                chunks.clear()
        chunks.append(_chunk(request_id, current, final=True))
        await self.enqueue(list(chunks))
        return total, len(chunks), last_ts

    async def upload_new(self) -> None:
        """The scheduled job: everything newer than the last scheduled upload."""
        total, chunks, last_ts = await self.upload(None, self.last_uploaded_ts, float("inf"), None)
        if last_ts is not None:
            self.last_uploaded_ts = last_ts
        log.info("history_uploaded", samples=total, chunks=chunks)


def _chunk(request_id: str | None, samples: list[m.Sample], *, final: bool) -> m.History:
    return m.History(seq=0, request_id=request_id, samples=tuple(samples), final=final)


@attrs.define(eq=False, kw_only=True)
class HistoryRequestHandler:
    uploader: HistoryUploader
    report: Callable[[m.CommandResult], Awaitable[None]]
    message_type: str = "history_request"

    async def handle(self, request: m.HistoryRequest) -> None:
        if request.to < request.from_:
            await self.report(
                m.CommandResult(
                    seq=0,
                    id=request.id,
                    status=m.CommandState.REJECTED,
                    error="invalid range: `to` is before `from`",
                )
            )
            return
        await self.report(
            m.CommandResult(seq=0, id=request.id, status=m.CommandState.RUNNING, progress=0)
        )
        metrics = list(request.metrics) if request.metrics else None
        total, chunks, _ = await self.uploader.upload(
            request.id, request.from_, request.to, metrics
        )
        result: dict[str, Any] = {"samples": total, "chunks": chunks}
        await self.report(
            m.CommandResult(seq=0, id=request.id, status=m.CommandState.SUCCEEDED, result=result)
        )
