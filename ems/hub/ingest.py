"""The cold path: one task that turns queued messages into store transactions, then acks.

Device readers `submit` items into one bounded channel (the *block* policy: when the store falls
behind, readers wait, devices stop getting acks and their outboxes hold the data). The writer
takes everything queued (up to `batch_max`) into one transaction, so a commit covers many
messages of many devices, and then tells each connection the highest seq it committed for it:
one cumulative `ack` per device per commit. A store failure is retried with backoff; nothing is
acknowledged that is not stored.

`welcome` lookups for a new connection (the stream's acked seq, the config state, the commands
to deliver) travel through the same channel, behind every message of the device's previous
connection, so a `welcome` never reports less than what is already queued for the store (which
would make the device resend and the hub store twice). All the lookups gathered in one commit
interval go to the store's thread in one trip, and the device info `hello`s report (firmware,
agent) is written in the same transaction as the telemetry: a connect storm costs one store
round trip per commit interval, not several per device.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from ems.hub.store import AlertRow, EventRow, SampleRow, StoreError, StreamMark, WriteBatch
from ems.hub.store.base import CommandUpdate, ConfigReport, WelcomeState
from ems.logs import get_logger
from ems.protocol import messages as m

if TYPE_CHECKING:
    from ems.hub.store import AsyncStore

log = get_logger("ems.hub.ingest")


class CommitListener(Protocol):
    def ack_after(self, seq: int) -> int:
        """The ack that `committed(seq)` would leave (for the stream's stored mark)."""

    def committed(self, seq: int) -> None:
        """Everything this connection submitted up to `seq` (in order) is durable."""


@attrs.define(eq=False, kw_only=True)
class IngestItem:
    """What one reliable message (or a rejected one's seq) adds to the store."""

    listener: CommitListener | None
    device_id: str
    stream: str | None = None
    seq: int | None = None
    samples: list[SampleRow] = attrs.field(factory=list)
    events: list[EventRow] = attrs.field(factory=list)
    alerts: list[AlertRow] = attrs.field(factory=list)
    last_seen: float | None = None
    device_info: tuple[str | None, str | None] | None = None
    """(firmware, agent) from a `hello` that changed them."""
    extra: list[Any] = attrs.field(factory=list)
    """Device-control messages: `command_result`, `config_applied`, a final `history` chunk."""


@attrs.define(eq=False)
class WelcomeQuery:
    device_id: str
    stream: str
    now: float
    done: trio.Event = attrs.field(factory=trio.Event)
    result: WelcomeState | None = None


@attrs.define(eq=False)
class IngestStats:
    batches: int = 0
    messages: int = 0
    samples: int = 0
    last_batch_seconds: float = 0.0
    total_batch_seconds: float = 0.0
    store_errors: int = 0
    peak_queue: int = 0


@attrs.define(eq=False)
class IngestWriter:
    store: AsyncStore
    capacity: int = 20_000
    batch_max: int = 5_000
    commit_interval_s: float = 0.05
    on_error: Callable[[bool], None] = lambda ok: None
    """Told False when a commit fails and True when commits succeed again (for /health)."""
    after_commit: Callable[[WriteBatch], Awaitable[None]] | None = None
    """Told about every committed batch with device-control updates (to publish statuses)."""
    stats: IngestStats = attrs.field(factory=IngestStats)
    _send: trio.MemorySendChannel[IngestItem | WelcomeQuery] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[IngestItem | WelcomeQuery] = attrs.field(init=False)
    _idle: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(self.capacity)

    async def submit(self, item: IngestItem) -> None:
        """Queue `item`; waits while the queue is full (backpressure on the device).

        No schedule point when there is room: the reader's next `receive` is one, and a
        task switch per message is what batching is meant to save."""
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            await self._send.send(item)

    def offer(self, item: IngestItem) -> bool:
        """Queue `item` if there is room and the writer still takes items (never waits)."""
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def queued(self) -> int:
        return self._send.statistics().current_buffer_used

    async def welcome_state(self, device_id: str, stream: str, now: float) -> WelcomeState:
        """What a `welcome` needs, read once everything queued before this call is committed
        (`now`: epoch ms, for which commands are still deliverable)."""
        query = WelcomeQuery(device_id, stream, now)
        await self._send.send(query)
        await query.done.wait()
        assert query.result is not None
        return query.result

    def close(self) -> None:
        """No more items: the writer commits what is queued and returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Gather and commit in two tasks, so the next batch gathers while one is written (a
        busy store then takes bigger batches instead of leaving the hub idle between them)."""
        task_status.started()
        batches_send, batches_receive = trio.open_memory_channel[list[IngestItem | WelcomeQuery]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._commit_batches, batches_receive)
            async with batches_send, self._receive:
                while (items := await self._gather()) is not None:
                    await batches_send.send(items)

    async def _gather(self) -> list[IngestItem | WelcomeQuery] | None:
        """The next batch (None once the channel is closed and drained)."""
        try:
            first = await self._receive.receive()
        except trio.EndOfChannel:
            return None
        items = [first]
        # Gather for one commit interval: at fleet rates a transaction (and its thread hop)
        # per message would cost more than everything else the hub does. What is already
        # queued is taken without a schedule point per item.
        receive_nowait = self._receive.receive_nowait
        batch_max = self.batch_max
        with trio.move_on_after(self.commit_interval_s):
            while len(items) < batch_max:
                try:
                    items.append(receive_nowait())
                except trio.WouldBlock:
                    try:
                        items.append(await self._receive.receive())
                    except trio.EndOfChannel:
                        break
                except trio.EndOfChannel:
                    break
        self.stats.peak_queue = max(self.stats.peak_queue, len(items) + self.queued())
        return items

    async def _commit_batches(
        self, batches: trio.MemoryReceiveChannel[list[IngestItem | WelcomeQuery]]
    ) -> None:
        async with batches:
            async for items in batches:
                await self._commit(items)

    async def _commit(self, items: list[IngestItem | WelcomeQuery]) -> None:
        batch = WriteBatch()
        marks: dict[tuple[str, str], int] = {}
        committed: dict[CommitListener, int] = {}
        streams: dict[CommitListener, tuple[str, str]] = {}
        queries: list[WelcomeQuery] = []
        for item in items:
            if isinstance(item, WelcomeQuery):
                queries.append(item)
                continue
            batch.samples.extend(item.samples)
            batch.events.extend(item.events)
            batch.alerts.extend(item.alerts)
            for message in item.extra:
                _control_rows(batch, item.device_id, message, item.last_seen or 0.0)
            if item.device_info is not None:
                batch.device_info[item.device_id] = item.device_info
            if item.last_seen is not None:
                previous = batch.last_seen.get(item.device_id, 0.0)
                batch.last_seen[item.device_id] = max(previous, item.last_seen)
            if item.seq is not None and item.stream is not None and item.listener is not None:
                # The last of this connection's items in the batch (hand-over order).
                committed[item.listener] = item.seq
                streams[item.listener] = (item.device_id, item.stream)
        # The stream's mark is what the connection will ack once this commits, never more: a
        # seq that arrived out of order and is not in this batch holds it back.
        for listener, seq in committed.items():
            key = streams[listener]
            marks[key] = max(marks.get(key, 0), listener.ack_after(seq))
        batch.marks = [StreamMark(device_id=d, stream=s, seq=q) for (d, s), q in marks.items()]
        if len(batch) or batch.last_seen or batch.device_info:
            await self._write_with_retry(batch)
            self.stats.batches += 1
            self.stats.messages += len(items) - len(queries)
            self.stats.samples += len(batch.samples)
        for listener, seq in committed.items():
            listener.committed(seq)
        if self.after_commit is not None and (batch.command_updates or batch.config_reports):
            await self.after_commit(batch)
        if queries:
            states = await self._lookup_with_retry(queries)
            for query in queries:
                query.result = states[(query.device_id, query.stream)]
                query.done.set()

    async def _write_with_retry(self, batch: WriteBatch) -> None:
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                await self.store.write_batch(batch)
            except StoreError as exc:
                self.stats.store_errors += 1
                self.on_error(False)
                log.warning("store_write_failed", error=str(exc), rows=len(batch), retry_s=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            elapsed = time.perf_counter() - started
            self.stats.last_batch_seconds = elapsed
            self.stats.total_batch_seconds += elapsed
            self.on_error(True)
            return

    async def _lookup_with_retry(
        self, queries: list[WelcomeQuery]
    ) -> dict[tuple[str, str], WelcomeState]:
        keys = [(q.device_id, q.stream) for q in queries]
        now = max(q.now for q in queries)
        delay = 0.1
        while True:
            try:
                return await self.store.welcome_states(keys, now)
            except StoreError as exc:
                self.on_error(False)
                log.warning("store_read_failed", devices=len(keys), error=str(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _control_rows(batch: WriteBatch, device_id: str, message: Any, at: float) -> None:
    """Device-control messages as the store's update rows."""
    if isinstance(message, m.CommandResult):
        batch.command_updates.append(
            CommandUpdate(
                id=message.id,
                device_id=device_id,
                status=message.status.value,
                progress=message.progress,
                result=message.result,
                error=message.error,
                at=at,
            )
        )
    elif isinstance(message, m.ConfigApplied):
        batch.config_reports.append(
            ConfigReport(
                device_id=device_id,
                version=message.version,
                status=message.status.value,
                error=message.error,
                at=at,
            )
        )
    elif isinstance(message, m.History) and message.final and message.request_id:
        # The requested history is stored: that is what the request asked for.
        batch.command_updates.append(
            CommandUpdate(
                id=message.request_id,
                device_id=device_id,
                status="succeeded",
                result={"final_seq": message.seq},
                at=at,
            )
        )
