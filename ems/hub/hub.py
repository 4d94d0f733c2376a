"""The Hub: the one long-lived object of a hub process.

It owns one nursery (started from the app's serving lifetime) holding the ingest writer and the
liveness sweeper, and the shared state every connection uses: the device directory (id -> owner
and token hash, cached from the store), the registry of live device connections, the dashboard
fan-out index, the alert evaluator and the counters behind `/metrics`. Connections run in their
own nurseries (hypercorn's) and reach the hub through this object only.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from ems.hub import auth
from ems.hub.alerts import DEFAULT_RULES, AlertEvaluator, parse_rules
from ems.hub.bus import LocalBus, RedisBus, open_bus
from ems.hub.collector import Collector
from ems.hub.commands import CommandService
from ems.hub.deadlines import DeadlineQueue
from ems.hub.fanout import OTHER, FanOut
from ems.hub.guard import SingleProcessGuard
from ems.hub.ingest import IngestWriter
from ems.hub.store import (
    AsyncStore,
    ConfigState,
    Conflict,
    DeviceRecord,
    UserRecord,
    open_store,
)
from ems.logs import get_logger
from ems.protocol.codec import Codec, SampleRules
from ems.protocol.errors import CloseCode

if TYPE_CHECKING:
    from ems.hub.device_link import DeviceConnection
    from ems.hub.settings import HubSettings

log = get_logger("ems.hub")

SESSION_CACHE_S = 30.0
"""How long a login token's user is remembered before the store is asked again."""


@attrs.define(eq=False, kw_only=True)
class DeviceInfo:
    """What the hub keeps in memory about every device (the store has the rest)."""

    device_id: str
    owner: str | None
    token_hash: str
    last_seen: float | None = None
    firmware: str | None = None
    agent: str | None = None
    latest: tuple[int, float, dict[str, Any]] | None = None  # seq, ts, data
    desired_config_version: int | None = None  # None: not looked up yet
    reported_config_version: int | None = None


@attrs.define(eq=False)
class Counters:
    """Plain integers on the hot path; `/metrics` reads them at scrape time."""

    frames_in: int = 0
    frames_out: int = 0
    samples_in: int = 0
    samples_rejected: int = 0
    messages_rejected: int = 0
    acks_sent: int = 0
    dashboard_frames_out: int = 0
    auth_failures: int = 0
    connections_total: int = 0
    replaced: int = 0


@attrs.define(eq=False)
class Hub:
    settings: HubSettings
    wall_clock: Callable[[], float] = time.time
    store: AsyncStore = attrs.field(init=False)
    codec: Codec = attrs.field(init=False)
    ingest: IngestWriter = attrs.field(init=False)
    fanout: FanOut = attrs.field(init=False, factory=FanOut)
    alerts: AlertEvaluator = attrs.field(init=False, factory=AlertEvaluator)
    devices: dict[str, DeviceInfo] = attrs.field(init=False, factory=dict)
    connections: dict[str, DeviceConnection] = attrs.field(init=False, factory=dict)
    """device_id -> its current connection (from the upgrade on; `welcomed` after `hello`)."""
    counters: Counters = attrs.field(init=False, factory=Counters)
    collector: Collector = attrs.field(init=False)
    timers: DeadlineQueue[DeviceConnection] = attrs.field(init=False, factory=DeadlineQueue)
    """Connections by their next liveness deadline (driven by `_sweep_liveness`)."""
    commands: CommandService = attrs.field(init=False)
    bus: LocalBus | RedisBus = attrs.field(init=False)
    """The other hub processes (a no-op without `EMS_REDIS_URL`)."""
    guard: SingleProcessGuard = attrs.field(init=False)
    login_limiter: auth.LoginLimiter = attrs.field(init=False)
    store_ok: bool = attrs.field(init=False, default=True)
    started_at: float = attrs.field(init=False, default=0.0)
    generated_admin_password: str | None = attrs.field(init=False, default=None, repr=False)
    metrics_registry: Any = attrs.field(init=False, default=None)
    _session_cache: dict[str, tuple[UserRecord, float, float]] = attrs.field(
        init=False, factory=dict
    )
    """login token hash -> (user, cached until (monotonic), token expiry (epoch ms))"""
    _stopped: trio.Event = attrs.field(init=False, factory=trio.Event)
    _writer_done: trio.Event = attrs.field(init=False, factory=trio.Event)
    _quiet: trio.Event = attrs.field(init=False, factory=trio.Event)
    """Set when the store is flushed and the other hubs were told goodbye."""

    def __attrs_post_init__(self) -> None:
        settings = self.settings
        self.store = AsyncStore(_LazyStore(settings))
        self.codec = Codec(SampleRules(allow_unknown_metrics=not settings.strict_metrics))
        self.ingest = IngestWriter(
            self.store,
            capacity=settings.ingest_queue,
            batch_max=settings.store_batch_max,
            commit_interval_s=settings.store_commit_ms / 1000.0,
            on_error=self._store_health,
        )
        self.login_limiter = auth.LoginLimiter(limit=settings.login_attempts_per_minute)
        self.collector = Collector(settings, open_connections=lambda: len(self.connections))
        self.commands = CommandService(self)
        self.ingest.after_commit = self._after_commit
        self.bus = open_bus(self)
        if self.bus.enabled:
            self.fanout.relay = self.bus.fan
        self.guard = SingleProcessGuard(settings)

    def _store_health(self, ok: bool) -> None:
        if ok != self.store_ok:
            log.warning("store_state", ok=ok)
        self.store_ok = ok

    def now_ms(self) -> float:
        return self.wall_clock() * 1000.0

    # --- lifetime --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, load the directory, start the writer and the sweeper."""
        await trio.to_thread.run_sync(self.guard.acquire)
        try:
            await self._run(task_status)
        finally:
            self.guard.release()

    async def _run(self, task_status: trio.TaskStatus[Hub]) -> None:
        await self.store.open()
        await self._bootstrap_admin()
        await self._load_directory()
        self.started_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.bus.run)
            nursery.start_soon(self._run_writer)
            nursery.start_soon(self._sweep_liveness)
            nursery.start_soon(self._purge_expired)
            nursery.start_soon(self.commands.expire_forever)
            nursery.start_soon(self.collector.run)
            task_status.started(self)
            log.info("hub_started", devices=len(self.devices), hub_id=self.bus.hub_id)
            await self._stopped.wait()
            # Commit what is queued, then stop the helpers.
            self.ingest.close()
            with trio.move_on_after(10):
                await self._writer_done.wait()
            await self.bus.aclose()
            self._quiet.set()
            nursery.cancel_scope.cancel()
        with trio.move_on_after(5, shield=True):
            await self.store.close()
        log.info("hub_stopped")

    async def _run_writer(self) -> None:
        try:
            await self.ingest.run()
        finally:
            self._writer_done.set()

    async def stop(self) -> None:
        """Flush the store and end `run` (called from the app's shutdown hook)."""
        self._stopped.set()
        with trio.move_on_after(15):
            await self._quiet.wait()

    async def _bootstrap_admin(self) -> None:
        if await self.store.get_user("admin") is not None:
            return
        password = self.settings.admin_password
        if not password:
            password = secrets.token_urlsafe(12)
            self.generated_admin_password = password
        password_hash = await trio.to_thread.run_sync(auth.hash_password, password)
        try:
            await self.store.create_user(
                UserRecord(
                    username="admin",
                    password_hash=password_hash,
                    role="admin",
                    created_at=self.now_ms(),
                )
            )
        except Conflict:
            return  # another hub process created it first
        if self.generated_admin_password is not None:
            # Printed once, to the console of whoever started the hub; never logged.
            print(  # noqa: T201
                f"EMS admin user created: username=admin password={password}", flush=True
            )

    async def _load_directory(self) -> None:
        for record in await self.store.list_devices():
            self.devices[record.device_id] = DeviceInfo(
                device_id=record.device_id,
                owner=record.owner,
                token_hash=record.token_hash,
                last_seen=record.last_seen,
                firmware=record.firmware,
                agent=record.agent,
            )
        stored = await self.store.get_alert_rules()
        self.alerts.set_rules(DEFAULT_RULES if stored is None else parse_rules(stored))

    async def _sweep_liveness(self) -> None:
        """Drive the sessions' timers: hub heartbeats, hello and silence deadlines."""
        # Short ticks keep the heartbeats of connections made in the same second from leaving
        # in one burst; each tick looks only at the connections with a deadline passed.
        interval = min(0.2, self.settings.heartbeat_s / 4, self.settings.hello_timeout_s / 4)
        timers = self.timers
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            for conn in timers.pop_due(now):
                conn.check_timers(now)
                timers.schedule(conn)

    async def _purge_expired(self) -> None:
        while True:
            await trio.sleep(60)
            self.login_limiter.purge(trio.current_time())
            try:
                await self.store.purge_sessions(self.now_ms())
            except Exception as exc:  # the store may be down; try again next minute
                log.warning("session_purge_failed", error=str(exc))

    # --- the device directory ----------------------------------------------------------------

    def device_token_ok(self, device_id: str, token: str | None) -> bool:
        info = self.devices.get(device_id)
        if info is None or not token:
            # Same work either way, so timing says nothing about which ids exist.
            auth.token_matches(token or "", "0" * 64)
            return False
        return auth.token_matches(token, info.token_hash)

    def can_see(self, username: str, is_admin: bool, device_id: str) -> bool:
        info = self.devices.get(device_id)
        return info is not None and (is_admin or info.owner == username)

    async def create_device(
        self, device_id: str, *, name: str | None, owner: str | None, metadata: dict[str, Any]
    ) -> tuple[DeviceRecord, str]:
        token = auth.new_device_token()
        record = DeviceRecord(
            device_id=device_id,
            name=name,
            owner=owner,
            metadata=metadata,
            token_hash=auth.token_hash(token),
            created_at=self.now_ms(),
        )
        await self.store.create_device(record)
        self.devices[device_id] = DeviceInfo(
            device_id=device_id, owner=owner, token_hash=record.token_hash
        )
        self.bus.publish("dev", {"d": device_id})
        log.info("device_created", device_id=device_id, owner=owner)
        return record, token

    async def rotate_token(self, device_id: str) -> str | None:
        info = self.devices.get(device_id)
        if info is None:
            return None
        token = auth.new_device_token()
        new_hash = auth.token_hash(token)
        if not await self.store.set_token_hash(device_id, new_hash):
            return None
        info.token_hash = new_hash
        self._close_device(device_id, CloseCode.REVOKED, "token rotated")
        self.bus.publish("dev", {"d": device_id})
        log.info("device_token_rotated", device_id=device_id)
        return token

    async def delete_device(self, device_id: str) -> bool:
        if not await self.store.delete_device(device_id):
            return False
        self.devices.pop(device_id, None)
        self.alerts.forget(device_id)
        # A device re-created under this id may belong to someone else: end the subscriptions.
        self.fanout.forget_device(device_id)
        self._close_device(device_id, CloseCode.REVOKED, "device deleted")
        self.bus.publish("dev", {"d": device_id})
        log.info("device_deleted", device_id=device_id)
        return True

    async def reload_device(self, device_id: str) -> DeviceInfo | None:
        """Read one device from the store again (another hub created, rotated or deleted it).
        A live connection whose token is no longer the device's is closed with 4003."""
        record = await self.store.get_device(device_id)
        info = self.devices.get(device_id)
        if record is None:
            if info is not None:
                self.devices.pop(device_id, None)
                self.alerts.forget(device_id)
                self.fanout.forget_device(device_id)
                self._close_device(device_id, CloseCode.REVOKED, "device deleted")
            return None
        if info is None:
            info = DeviceInfo(
                device_id=device_id,
                owner=record.owner,
                token_hash=record.token_hash,
                last_seen=record.last_seen,
                firmware=record.firmware,
                agent=record.agent,
            )
            self.devices[device_id] = info
        elif info.token_hash != record.token_hash:
            info.token_hash = record.token_hash
            self._close_device(device_id, CloseCode.REVOKED, "token rotated")
        info.owner = record.owner
        return info

    async def device_token_ok_anywhere(self, device_id: str, token: str | None) -> bool:
        """`device_token_ok`, asking the store about a device this hub has not heard of (it
        may have been created through another hub a moment ago)."""
        if device_id not in self.devices and token:
            try:
                await self.reload_device(device_id)
            except Exception as exc:  # the store is down: unknown stays unknown
                log.warning("device_lookup_failed", device_id=device_id, error=str(exc)[:200])
        return self.device_token_ok(device_id, token)

    async def reload_alert_rules(self) -> None:
        stored = await self.store.get_alert_rules()
        self.alerts.set_rules(DEFAULT_RULES if stored is None else parse_rules(stored))

    def _close_device(self, device_id: str, code: CloseCode, reason: str) -> None:
        # The current connection, welcomed or still before its `hello` (older ones are closing).
        conn = self.connections.get(device_id)
        if conn is not None:
            conn.request_close(code, reason)

    async def user_for_token(self, token: str) -> UserRecord | None:
        """The user a login token belongs to, if it is a live one (device tokens never are)."""
        key = auth.token_hash(token)
        now = self.now_ms()
        cached = self._session_cache.get(key)
        if cached is not None and cached[1] > trio.current_time():
            user = cached[0]
        else:
            session = await self.store.get_session(key)
            if session is None or session.expires_at <= now:
                self._session_cache.pop(key, None)
                return None
            user = await self.store.get_user(session.username)
            if user is None:
                return None
            if len(self._session_cache) > 10_000:
                self._session_cache.clear()
            self._session_cache[key] = (
                user,
                trio.current_time() + SESSION_CACHE_S,
                session.expires_at,
            )
            return user
        if cached[2] <= now:
            self._session_cache.pop(key, None)
            return None
        return user

    def forget_session(self, token: str) -> None:
        key = auth.token_hash(token)
        self._session_cache.pop(key, None)
        self.bus.publish("logout", {"h": key})

    def forget_session_hash(self, key: str) -> None:
        self._session_cache.pop(key, None)

    async def snapshot(self, device_ids: list[str]) -> list[dict[str, Any]]:
        """`subscribed`'s snapshot: online, last_seen and the latest sample of each device."""
        missing = [d for d in device_ids if d in self.devices and self.devices[d].latest is None]
        stored = await self.store.latest_many(missing) if missing else {}
        out = []
        for device_id in device_ids:
            info = self.devices.get(device_id)
            if info is None:
                continue
            latest: dict[str, Any] | None = None
            if info.latest is not None:
                latest = {"ts": info.latest[1], "data": info.latest[2]}
            elif device_id in stored:
                row = stored[device_id]
                latest = {"ts": row.ts, "data": row.data}
            out.append(
                {
                    "device_id": device_id,
                    "online": self.is_online(device_id),
                    "last_seen": info.last_seen,
                    "latest": latest,
                }
            )
        return out

    def live_connection(self, device_id: str) -> DeviceConnection | None:
        """The device's connection if it is welcomed and open (where messages can go now)."""
        conn = self.connections.get(device_id)
        if conn is None or not conn.welcomed:
            return None
        return conn

    def note_config_state(self, device_id: str, state: ConfigState | None) -> int:
        """Remember a device's config versions read from the store; its desired version."""
        version = state.desired_version if state is not None else 0
        info = self.devices.get(device_id)
        if info is not None:
            info.desired_config_version = version
            info.reported_config_version = state.reported_version if state else None
        return version

    async def _after_commit(self, batch: Any) -> None:
        """Publish what device-control updates changed (command_status, config_status)."""
        if batch.command_updates:
            ids = list(dict.fromkeys(u.id for u in batch.command_updates))
            self.commands.publish(await self.store.changed_commands(ids))
        for device_id in dict.fromkeys(r.device_id for r in batch.config_reports):
            state = await self.store.get_config(device_id)
            if state is not None:
                self.commands.publish_config(state)

    def is_online(self, device_id: str) -> bool:
        """Online here or on another hub of the cluster."""
        conn = self.connections.get(device_id)
        if conn is not None and conn.online:
            return True
        return self.bus.remote_hub_of(device_id) is not None

    # --- registry ----------------------------------------------------------------------------

    def claim(self, conn: DeviceConnection) -> None:
        """`conn` was just accepted: it becomes the device's connection (one device, one
        connection), and an older one is closed with 4000. The device stays online through
        the change when the older one was."""
        older = self.connections.get(conn.device_id)
        self.connections[conn.device_id] = conn
        if older is not None and older is not conn:
            conn.inherits_online = older.online
            self.counters.replaced += 1
            older.replaced_by_newer()
        elif self.bus.remote_hub_of(conn.device_id) is not None:
            conn.inherits_online = True  # online on another hub until now
        self.bus.claim(conn)

    def remote_claim(self, device_id: str, connected_at: float) -> None:
        """Another hub accepted a connection of `device_id`: an older one here is a ghost."""
        conn = self.connections.get(device_id)
        if conn is None or conn.connected_at >= connected_at:
            return
        # Out of the registry first: its end must not announce the device offline.
        del self.connections[device_id]
        self.counters.replaced += 1
        if conn.welcomed:
            self.bus.device_off(device_id)
        conn.replaced_by_newer()
        log.info("device_replaced_elsewhere", device_id=device_id, session_id=conn.session_id)

    def release(self, conn: DeviceConnection) -> bool:
        """`conn` ended; True when it was the device's current connection (now offline)."""
        if self.connections.get(conn.device_id) is conn:
            del self.connections[conn.device_id]
            if conn.welcomed:
                self.bus.device_off(conn.device_id)
            return True
        return False

    def publish_status(self, device_id: str, online: bool) -> None:
        info = self.devices.get(device_id)
        payload = orjson.dumps(
            {"type": "device_status", "device_id": device_id, "online": online, "ts": self.now_ms()}
        )
        self.fanout.publish(device_id, info.owner if info else None, OTHER, payload)


class _LazyStore:
    """Chooses and builds the real store in `open()`, so making a Hub touches no disk."""

    def __init__(self, settings: HubSettings) -> None:
        self._settings = settings
        self._store: Any = None

    def open(self) -> None:
        if self._store is None:
            self._store = open_store(self._settings.database_url, self._settings.data_dir)
        self._store.open()

    def __getattr__(self, name: str) -> Any:
        if self._store is None:
            from ems.hub.store import StoreError

            raise StoreError("the store is not open")
        return getattr(self._store, name)
