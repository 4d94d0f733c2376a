"""The Agent: the one long-lived object of `python -m ems.edge`.

It owns one nursery holding the link loop (connect, run, back off, forever), the dispatcher, the
sampler (sensors -> telemetry batches) and the scheduler (history upload and other jobs), plus
the durable state they share: the outbox (with the stream, the seq counter, the command record
and the applied config) and the local history store. Nothing outlives `run`.

Shutdown (`stop()`): sampling stops, the link gets a few seconds to flush what is queued, then
everything is cancelled; whatever was not acknowledged stays in the outbox for the next start.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ems import __version__
from ems.edge.backoff import Backoff
from ems.edge.config import EdgeSettings
from ems.edge.dispatcher import Dispatcher, Handler, load_extra_handlers
from ems.edge.handlers.command import RESTART_COMMANDS, CommandHandler
from ems.edge.handlers.config import ConfigHandler, validate
from ems.edge.handlers.history import HistoryRequestHandler, HistoryUploader
from ems.edge.handlers.software_update import SoftwareUpdateHandler
from ems.edge.handlers.ssh_access import AuthorizedKeysFile, SshAccessHandler
from ems.edge.history import AsyncHistory, HistoryStore
from ems.edge.link import LINK_ERRORS, DeviceLink
from ems.edge.outbox import AsyncOutbox, Outbox
from ems.edge.sampler import Sampler
from ems.edge.scheduler import Scheduler
from ems.edge.sensors import load_sensors
from ems.logs import get_logger
from ems.protocol import messages as m
from ems.protocol._window import CommandRecord
from ems.protocol.codec import Codec

log = get_logger("ems.edge.agent")

CAPABILITIES = ("command", "config", "history_request")
STABLE_LINK_S = 60.0
SHUTDOWN_FLUSH_S = 5.0


@attrs.define(eq=False)
class Agent:
    settings: EdgeSettings
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    codec: Codec = attrs.field(factory=Codec)
    firmware: str | None = None

    outbox: AsyncOutbox = attrs.field(init=False)
    history: AsyncHistory = attrs.field(init=False)
    record: CommandRecord = attrs.field(init=False, factory=CommandRecord)
    link: DeviceLink = attrs.field(init=False)
    dispatcher: Dispatcher = attrs.field(init=False)
    sampler: Sampler = attrs.field(init=False)
    scheduler: Scheduler = attrs.field(init=False)
    config_version: int = attrs.field(init=False, default=0)
    capabilities: tuple[str, ...] = attrs.field(init=False, default=CAPABILITIES)
    started_at: float = attrs.field(init=False, default=0.0)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _sampling: trio.CancelScope = attrs.field(init=False, factory=trio.CancelScope)
    _sampler_done: trio.Event = attrs.field(init=False, factory=trio.Event)

    @property
    def device_id(self) -> str:
        return self.settings.device_id

    # --- lifetime ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        self.started_at = trio.current_time()
        outbox = Outbox(settings.data_dir / "outbox.db", max_bytes=settings.outbox_max_bytes)
        self.outbox = AsyncOutbox(outbox)
        await self.outbox.run(outbox.open)
        store = HistoryStore(
            settings.data_dir / "history.db",
            retention_s=settings.history_retention_s,
            max_rows=settings.history_max_rows,
        )
        self.history = AsyncHistory(store)
        await self.history.open()
        try:
            self.record, names = await self.outbox.run(outbox.load_record)
            self.config_version, document = await self.outbox.run(outbox.load_config)
            self._build(settings)
            if document:
                self.apply_config(validate(document))
            await self._reconcile_interrupted(names)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.dispatcher.run)
                nursery.start_soon(self._run_sampler)
                await nursery.start(self.scheduler.run)
                nursery.start_soon(self._link_loop)
                log.info(
                    "agent_started",
                    device_id=self.device_id,
                    stream=outbox.stream,
                    last_seq=outbox.last_seq,
                    config_version=self.config_version,
                )
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.move_on_after(5, shield=True):
                await self.outbox.run(outbox.close)
                await self.history.close()

    async def stop(self, flush_s: float = SHUTDOWN_FLUSH_S) -> None:
        """Stop sampling, give the link `flush_s` to empty the outbox, then end `run`."""
        self._sampling.cancel()
        # A batch being handed over finishes first (it is shielded), so the buffered ones
        # that follow get later seqs, as their later `ts` say they should.
        await self._sampler_done.wait()
        for batch in self.sampler.take_buffered():
            await self._on_batch(batch)
        with trio.move_on_after(flush_s):
            while self.link.online and self.pending() > 0:
                await self.link.wait_acked()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _build(self, settings: EdgeSettings) -> None:
        ssl_context = None
        if settings.hub_url.startswith("wss://"):
            ssl_context = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
        self.link = DeviceLink(
            device_id=settings.device_id,
            hub_url=settings.hub_url,
            read_token=settings.read_token,
            outbox=self.outbox,
            record=self.record,
            make_hello=self._hello,
            dispatch=self._dispatch,
            resend=self.report,
            on_welcome=self._on_welcome,
            status=self.status,
            ssl_context=ssl_context,
            codec=self.codec,
            wall_clock=self.wall_clock,
            rng=self.rng,
        )
        uploader = HistoryUploader(history=self.history, enqueue=self.enqueue)
        handlers: dict[str, Handler] = {
            "command": CommandHandler(
                allowed=settings.allowed_commands,
                argv=settings.commands,
                report=self.report,
                wall_clock=self.wall_clock,
                timeout_s=settings.command_timeout_s,
                device_id=settings.device_id,
            ),
            "config": ConfigHandler(
                persist=self._persist_config,
                apply=self.apply_config,
                report=self.report_config,
                current_version=lambda: self.config_version,
                device_id=settings.device_id,
            ),
            "history_request": HistoryRequestHandler(uploader=uploader, report=self.report),
        }
        ota = SoftwareUpdateHandler(
            install=settings.ota_install,
            healthcheck=settings.ota_healthcheck,
            rollback=settings.ota_rollback,
            pubkey_file=settings.ota_pubkey_file,
            hub_http_url=settings.http_url,
            read_token=settings.read_token,
            work_dir=settings.data_dir / "ota",
            report=self.report,
            wall_clock=self.wall_clock,
            ssl_context=ssl_context,
            device_id=settings.device_id,
        )
        handlers["software_update"] = ota  # without an installer it answers `rejected`
        handlers["ssh_access"] = SshAccessHandler(
            hook=AuthorizedKeysFile(settings.ssh_authorized_keys, settings.device_id),
            report=self.report,
            wall_clock=self.wall_clock,
            device_id=settings.device_id,
        )
        handlers.update(load_extra_handlers(self))
        ota_enabled = bool(settings.ota_install)
        extra = [name for name in ("software_update", "ssh_access") if name in handlers]
        if not ota_enabled and handlers["software_update"] is ota:
            extra.remove("software_update")  # it is there only to say `rejected`
        self.capabilities = (*CAPABILITIES, *extra)
        self.dispatcher = Dispatcher(
            handlers=handlers,
            record_received=self._record_received,
            report=self.report,
            wall_clock=self.wall_clock,
            device_id=settings.device_id,
        )
        sensors = load_sensors(
            settings.sensors, device_id=settings.device_id, data_dir=settings.data_dir
        )
        self.sampler = Sampler(
            sensors=sensors,
            intervals=dict(settings.sensor_intervals),
            batch_interval_s=settings.batch_interval_s,
            on_batch=self._on_batch,
            wall_clock=self.wall_clock,
            device_id=settings.device_id,
        )
        self.scheduler = Scheduler(rng=self.rng, device_id=settings.device_id)
        jobs = {"history_upload": uploader.upload_new, "history_prune": self._prune_history}
        if ota_enabled:
            jobs["ota_check"] = lambda: ota.check_assigned(
                self.record.begin, self.dispatcher.submit
            )
        for name, job in jobs.items():
            self.scheduler.add(name, settings.jobs[name], job, jitter_s=settings.job_jitter(name))
        # The ssh_access handler's expiry loop: started at once (expired keys go first), and
        # started again a second after it fails.
        expire_keys = getattr(handlers.get("ssh_access"), "expire_forever", None)
        if expire_keys is not None:
            self.scheduler.add("ssh_expiry", 1.0, expire_keys, jitter_s=0)
            self.scheduler.run_now("ssh_expiry")

    async def _run_sampler(self) -> None:
        try:
            with self._sampling:
                await self.sampler.run()
        finally:
            self._sampler_done.set()

    async def _link_loop(self) -> None:
        backoff = Backoff(base=1.0, cap=60.0, rng=self.rng)
        while True:
            try:
                await self.link.run_once()
            except* LINK_ERRORS as group:
                log.warning("link_down", device_id=self.device_id, reason=_summary(group))
            welcomed = self.link.welcomed_at
            if welcomed is not None and trio.current_time() - welcomed >= STABLE_LINK_S:
                backoff.reset()
            delay = self.link.goaway_delay_s
            if delay is None:
                delay = backoff.next_delay()
            await trio.sleep(delay)

    # --- durable writes ------------------------------------------------------------------------

    async def enqueue(self, messages: list[m.ReliableMessage]) -> None:
        """Write reliable messages to the outbox (assigning seqs), then wake the link."""
        await self.outbox.run(self.outbox.sync.append_many, messages, self.codec.encode)
        self.link.poke()

    async def report(self, result: m.CommandResult) -> None:
        self.record.update(result)
        await self.enqueue([result])

    async def report_config(self, applied: m.ConfigApplied) -> None:
        await self.enqueue([applied])

    async def _record_received(self, command_id: str, name: str) -> None:
        await self.outbox.run(self.outbox.sync.record_received, command_id, name, self.codec.encode)
        self.link.poke()

    async def _persist_config(self, version: int, document: dict[str, Any]) -> None:
        await self.outbox.run(self.outbox.sync.save_config, version, document)
        self.config_version = version

    def apply_config(self, known: dict[str, Any]) -> None:
        if "batch_interval_s" in known:
            self.sampler.set_batch_interval(known["batch_interval_s"])
        for name, seconds in known.get("sensor_intervals", {}).items():
            self.sampler.set_interval(name, seconds)
        for name, seconds in known.get("jobs", {}).items():
            self.scheduler.set_interval(name, seconds)

    async def _reconcile_interrupted(self, names: dict[str, str | None]) -> None:
        """Commands that were running when the agent stopped: a restart command succeeded by
        restarting us; anything else is reported failed (never run again)."""
        results = []
        for entry in self.record.items():
            if entry.status.is_final:
                continue
            if names.get(entry.id) in RESTART_COMMANDS:
                results.append(
                    m.CommandResult(
                        seq=0,
                        id=entry.id,
                        status=m.CommandState.SUCCEEDED,
                        result={"restarted": True},
                    )
                )
            else:
                results.append(
                    m.CommandResult(
                        seq=0,
                        id=entry.id,
                        status=m.CommandState.FAILED,
                        error="interrupted: the agent stopped while it ran",
                    )
                )
        for result in results:
            self.record.update(result)
        if results:
            await self.outbox.run(self.outbox.sync.append_many, results, self.codec.encode)

    # --- the link's callbacks --------------------------------------------------------------------

    def _hello(self) -> m.Hello:
        return m.Hello(
            stream=self.outbox.stream,
            agent=f"ems-edge/{__version__}",
            firmware=self.firmware,
            config_version=self.config_version,
            capabilities=self.capabilities,
        )

    async def _dispatch(self, message: m.TrackedMessage | m.Config) -> None:
        await self.dispatcher.submit(message)

    async def _on_welcome(self, welcome: m.Welcome) -> None:
        unreported, total = await self.outbox.run(self.outbox.sync.take_dropped)
        if unreported:
            log.warning("outbox_dropped", device_id=self.device_id, dropped=unreported, total=total)
            await self.enqueue(
                [
                    m.Event(
                        seq=0,
                        ts=self.wall_clock() * 1000,
                        level=m.Level.WARNING,
                        code="OUTBOX_OVERFLOW",
                        message=f"dropped {unreported} queued messages (oldest telemetry first) "
                        "while the hub was unreachable",
                        data={"dropped": unreported, "dropped_total": total},
                    )
                ]
            )

    async def _on_batch(self, samples: list[dict[str, Any]]) -> None:
        if not samples:
            return
        telemetry = m.Telemetry(
            seq=0, samples=tuple(m.Sample(ts=s["ts"], data=s["data"]) for s in samples)
        )
        # Both writes or neither: a cancellation (shutdown) between them would leave samples in
        # the history that were never queued for the hub. The outbox goes first because it is
        # the copy that must not lose data: a `kill -9` in between costs the history a batch
        # the hub still gets, never the hub a batch the history has.
        with trio.CancelScope(shield=True):
            await self.enqueue([telemetry])
            await self.history.add(samples)

    async def _prune_history(self) -> None:
        await self.history.prune(self.wall_clock() * 1000)

    def pending(self) -> int:
        """Messages waiting for an ack (the outbox's own count; no thread hop)."""
        return self.outbox.sync.count_queued

    def status(self) -> dict[str, Any]:
        sync = self.outbox.sync
        return {
            "uptime_s": round(trio.current_time() - self.started_at, 1),
            "outbox_depth": self.pending(),
            "outbox_bytes": sync.bytes_queued,
            "dropped_total": sync.dropped_total,
            "config_version": self.config_version,
        }


def _summary(group: BaseExceptionGroup[BaseException]) -> str:
    parts = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            parts.append(_summary(exc))
        else:
            parts.append(f"{type(exc).__name__}: {exc}"[:200])
    return "; ".join(parts)
