"""The bus between hub processes: what one hub tells the others through Redis.

One hub process needs no bus (`LocalBus`: every call is a no-op and the cluster is this hub).
With `EMS_REDIS_URL` set, `RedisBus` joins the others:

- fan-out: every dashboard update a hub produces (telemetry, alerts, statuses) is relayed, and
  each hub hands what it receives to its own dashboards through its own subscription index
  (so `*` and ownership work as on one hub);
- presence: a connection claims its device at the upgrade (a ghost on another hub is closed
  with 4000), a welcomed device is listed in this hub's presence hash (`ems:presence:<hub>`)
  and announced (`on`/`off`), so every hub knows who is online where;
- wake-ups: a command, config push or directory change made through one hub tells the others
  (the state itself lives in PostgreSQL; the message only says "look now").

redis-py has no trio client, so its synchronous client runs on worker threads, batched: the
publisher carries everything queued since its last trip (presence writes and one `PUBLISH` of
many messages) in one pipeline; the subscriber brings back every message waiting. When Redis is
unreachable the hub keeps serving its own devices and dashboards, reports `degraded` with the
reason, drops cross-hub traffic (there is nobody to give it to), and on reconnecting rewrites
its presence, re-announces its claims and reloads the others'.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from ems.logs import get_logger

if TYPE_CHECKING:
    from ems.hub.device_link import DeviceConnection
    from ems.hub.hub import Hub

log = get_logger("ems.hub.bus")

CHANNEL = "ems:bus"
HUB_KEY = "ems:hub:"
PRESENCE_KEY = "ems:presence:"
HUB_TTL_S = 10
"""A hub that stops refreshing its keys (killed, cut off) drops out of the cluster after this."""
BEAT_S = 1.0
PRESENCE_REFRESH_S = 5.0
"""How often a hub rewrites its presence entries (their `last_seen`)."""
OUTGOING_CAPACITY = 100_000
PUBLISH_BATCH_MAX = 2_000
RECEIVE_WAIT_S = 0.2
"""How long one trip of the subscriber thread waits for a message (bounds shutdown delay)."""
RECEIVE_BATCH_MAX = 500
COMMAND_TIMEOUT_S = 5.0
"""A Redis command (publish, beat, presence) that takes longer marks the bus down."""
SUBSCRIBER_TIMEOUT_S = 30.0
"""The subscription's socket timeout. Longer than the commands': whatever is published while it
reconnects is lost to this hub for good (pub/sub keeps nothing), and a Redis slowed down by a
saturated machine stalled its reads past 5 s in two-worker runs. A Redis that is really
gone is still noticed within the commands' timeout by the beat, which stops the subscriber."""
LOSS_LOG_S = 10.0
"""At most one `bus_updates_lost` warning this often (a sustained overload loses every batch)."""
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 5.0


@attrs.define(kw_only=True)
class ClusterView:
    """Every hub of the cluster and every device connected to one (for REST and /health)."""

    hubs: list[dict[str, Any]]
    devices: list[dict[str, Any]]
    complete: bool
    """False when Redis could not be asked: only this hub's part is known."""


class LocalBus:
    """One hub process: no peers, nothing to relay."""

    enabled = False
    ok = True
    reason: str | None = None
    hub_id = "local"
    dropped = 0

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    async def aclose(self) -> None:
        return

    def publish(self, kind: str, body: dict[str, Any]) -> None:
        return

    def fan(self, device_id: str, owner: str | None, kind: int, payload: bytes) -> None:
        return

    def claim(self, conn: DeviceConnection) -> None:
        return

    def device_on(self, conn: DeviceConnection) -> None:
        return

    def device_off(self, device_id: str) -> None:
        return

    def remote_hub_of(self, device_id: str) -> str | None:
        return None

    def other_dashboards(self, username: str | None = None) -> int:
        return 0

    async def cluster(self) -> ClusterView:
        return ClusterView(
            hubs=[local_hub_info(self.hub, self.hub_id)],
            devices=local_presence(self.hub, self.hub_id),
            complete=True,
        )


def local_hub_info(hub: Hub, hub_id: str) -> dict[str, Any]:
    return {
        "hub_id": hub_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "connected_devices": sum(1 for c in hub.connections.values() if c.welcomed),
        "connected_dashboards": len(hub.fanout.subscribers),
        "users": sorted({s.username for s in hub.fanout.subscribers}),
    }


def presence_entry(conn: DeviceConnection, hub_id: str) -> dict[str, Any]:
    info = conn.hub.devices.get(conn.device_id)
    return {
        "device_id": conn.device_id,
        "session_id": conn.session_id,
        "connected_at": conn.connected_at,
        "last_seen": info.last_seen if info is not None else None,
        "owner": conn.owner,
        "status": conn.status,
        "hub": hub_id,
    }


def local_presence(hub: Hub, hub_id: str) -> list[dict[str, Any]]:
    """The presence entries of this hub's welcomed connections."""
    return [presence_entry(c, hub_id) for c in hub.connections.values() if c.welcomed]


def _encoded(entries: list[dict[str, Any]]) -> dict[str, bytes]:
    """Presence entries as the hash fields Redis keeps (device_id -> JSON)."""
    return {entry["device_id"]: orjson.dumps(entry) for entry in entries}


class RedisBus:
    """The Redis bus of one hub process (see the module docstring)."""

    enabled = True

    def __init__(self, hub: Hub, url: str) -> None:
        self.hub = hub
        self.url = url
        self.hub_id = secrets.token_hex(6)
        self.ok = False
        self.reason: str | None = "connecting to Redis"
        self.dropped = 0
        self._lost: dict[tuple[str, str | None], int] = {}
        """Dashboard updates this hub could not relay, per (device, owner), that the others have
        not been told about yet: their dashboards get them as `lagged` (protocol.md §2)."""
        self._loss_logged_at = float("-inf")
        self.remote: dict[str, dict[str, Any]] = {}
        """device_id -> presence entry of a device connected to another hub."""
        self.hubs: dict[str, dict[str, Any]] = {}
        """hub_id -> the other live hubs' own descriptions (refreshed every beat)."""
        self._out_send, self._out_recv = trio.open_memory_channel[tuple[str, Any]](
            OUTGOING_CAPACITY
        )
        self._work_send, self._work_recv = trio.open_memory_channel[Callable[[], Awaitable[None]]](
            OUTGOING_CAPACITY
        )
        self._healthy = trio.Event()
        self._client: Any = None
        self._subscriber_client: Any = None
        self._publisher_limiter = trio.CapacityLimiter(1)
        self._subscriber_limiter = trio.CapacityLimiter(1)
        self._beat_limiter = trio.CapacityLimiter(1)
        self._flushed = trio.Event()
        self._scope: trio.CancelScope | None = None

    # --- lifetime ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import redis

        self._client = redis.Redis.from_url(
            self.url,
            socket_timeout=COMMAND_TIMEOUT_S,
            socket_connect_timeout=3,
            health_check_interval=0,
        )
        self._subscriber_client = redis.Redis.from_url(
            self.url,
            socket_timeout=SUBSCRIBER_TIMEOUT_S,
            socket_connect_timeout=3,
            health_check_interval=0,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._subscriber)
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._beat)
                nursery.start_soon(self._worker)
                task_status.started()
                log.info("bus_started", hub_id=self.hub_id)
        finally:
            self._client.close()
            self._subscriber_client.close()

    async def aclose(self) -> None:
        """Say goodbye (the others forget our devices now), flush, then stop."""
        if self.ok:
            self._put(("op", ("delete", PRESENCE_KEY + self.hub_id, HUB_KEY + self.hub_id)))
            self._put(("msg", ["bye"]))
            self._put(("flush", None))
            with trio.move_on_after(2):
                await self._flushed.wait()
        if self._scope is not None:
            self._scope.cancel()

    # --- what the hub calls (sync, never blocks) ---------------------------------------------

    def publish(self, kind: str, body: dict[str, Any]) -> None:
        self._put(("msg", [kind, body]))

    def fan(self, device_id: str, owner: str | None, kind: int, payload: bytes) -> None:
        if not self.ok:  # per sample: don't build what `_put` would drop
            self._lose(device_id, owner, 1)
            return
        self._put(("msg", ["fan", device_id, owner, kind, payload.decode()]))

    def claim(self, conn: DeviceConnection) -> None:
        self._put(("msg", ["claim", conn.device_id, conn.connected_at]))

    def device_on(self, conn: DeviceConnection) -> None:
        entry = presence_entry(conn, self.hub_id)
        self._put(("op", ("hset", conn.device_id, orjson.dumps(entry))))
        self._put(("msg", ["on", entry]))

    def device_off(self, device_id: str) -> None:
        self._put(("op", ("hdel", device_id)))
        self._put(("msg", ["off", device_id]))

    def remote_hub_of(self, device_id: str) -> str | None:
        entry = self.remote.get(device_id)
        return entry["hub"] if entry is not None else None

    def other_dashboards(self, username: str | None = None) -> int:
        if username is None:
            return sum(h.get("connected_dashboards", 0) for h in self.hubs.values())
        return sum(1 for h in self.hubs.values() if username in h.get("users", ()))

    def _put(self, item: tuple[str, Any]) -> None:
        if not self.ok and item[0] != "flush":
            # Nobody to tell while Redis is away; presence is rewritten on reconnecting.
            self._drop([item])
            return
        try:
            self._out_send.send_nowait(item)
        except trio.WouldBlock:
            self._drop([item])

    def _lose(self, device_id: str, owner: str | None, count: int) -> None:
        if not self._lost and trio.current_time() >= self._loss_logged_at + LOSS_LOG_S:
            self._loss_logged_at = trio.current_time()
            reason = self.reason if not self.ok else "outgoing queue full"
            log.warning("bus_updates_lost", hub_id=self.hub_id, reason=reason, total=self.dropped)
        self.dropped += count
        self._remember_lost(device_id, owner, count)

    def _remember_lost(self, device_id: str, owner: str | None, count: int) -> None:
        key = (device_id, owner)
        self._lost[key] = self._lost.get(key, 0) + count

    def _drop(self, items: list[tuple[str, Any]]) -> None:
        """Outgoing items that will not reach Redis: dashboard updates (and reports of them)
        are remembered as lost, to be reported once it is back; the rest is counted."""
        for kind, item in items:
            if kind == "op":
                self.dropped += 1
            elif kind != "msg":
                continue  # `flush`: nothing was sent in it
            elif item[0] == "fan":
                self._lose(item[1], item[2], 1)
            elif item[0] == "lost":
                for device_id, owner, count in item[1]:  # counted when they were lost
                    self._remember_lost(device_id, owner, count)
            else:
                self.dropped += 1

    # --- health --------------------------------------------------------------------------------

    def _mark_down(self, exc: BaseException, where: str) -> None:
        reason = f"redis unreachable: {type(exc).__name__}: {exc}"[:300]
        if self.ok or self.reason != reason:
            log.warning("bus_down", hub_id=self.hub_id, reason=reason, task=where)
        self.ok = False
        self.reason = reason
        if self._healthy.is_set():
            self._healthy = trio.Event()

    def _mark_up(self) -> None:
        if not self.ok:
            log.info("bus_up", hub_id=self.hub_id)
        self.ok = True
        self.reason = None
        self._healthy.set()

    # --- the subscriber: owns the connection state --------------------------------------------

    async def _subscriber(self) -> None:
        import redis

        backoff = BACKOFF_START_S
        while True:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._run_sync(self._subscriber_limiter, pubsub.subscribe, CHANNEL)
                await self._resync()
                self._mark_up()
                backoff = BACKOFF_START_S
                while self.ok:
                    batch = await self._run_sync(self._subscriber_limiter, _receive_batch, pubsub)
                    for raw in batch:
                        self._dispatch(raw)
            except (redis.RedisError, OSError) as exc:
                self._mark_down(exc, "subscriber")
            finally:
                with trio.CancelScope(shield=True):
                    await self._run_sync(self._subscriber_limiter, _close_quietly, pubsub)
            await trio.sleep(backoff * (0.5 + random.random() / 2))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _resync(self) -> None:
        """After (re)connecting: our presence rewritten, our claims re-announced, theirs read."""
        hub = self.hub
        entries = _encoded(local_presence(hub, self.hub_id))
        claims = [["claim", c.device_id, c.connected_at] for c in hub.connections.values()]
        info = orjson.dumps(local_hub_info(hub, self.hub_id))
        message = orjson.dumps({"h": self.hub_id, "m": claims}) if claims else None

        def write_and_read() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
            client = self._client
            presence = PRESENCE_KEY + self.hub_id
            pipe = client.pipeline(transaction=False)
            pipe.delete(presence)
            if entries:
                pipe.hset(presence, mapping=entries)
                pipe.expire(presence, HUB_TTL_S)
            pipe.set(HUB_KEY + self.hub_id, info, ex=HUB_TTL_S)
            if message is not None:
                pipe.publish(CHANNEL, message)
            pipe.execute()
            return _read_cluster(client, self.hub_id)

        hubs, remote = await self._run_sync(self._beat_limiter, write_and_read)
        self.hubs = hubs
        self.remote = remote

    # --- the publisher -------------------------------------------------------------------------

    async def _publisher(self) -> None:
        import redis

        while True:
            first = await self._out_recv.receive()
            batch = [first]
            while len(batch) < PUBLISH_BATCH_MAX:
                try:
                    batch.append(self._out_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            flush = any(kind == "flush" for kind, _ in batch)
            if self._lost:
                # First what the others' dashboards missed, so it arrives before what follows
                # (with the first batch after an outage: pub/sub keeps nothing for a hub that
                # is not subscribed yet, and this hub cannot tell when the others are).
                report = [[d, o, n] for (d, o), n in self._lost.items()]
                self._lost = {}
                batch.insert(0, ("msg", ["lost", report]))
            if not self.ok:
                self._drop(batch)
            else:
                try:
                    await self._run_sync(self._publisher_limiter, self._send_batch, batch)
                except (redis.RedisError, OSError) as exc:
                    self._drop(batch)
                    self._mark_down(exc, "publisher")
            if flush:
                self._flushed.set()

    def _send_batch(self, batch: list[tuple[str, Any]]) -> None:
        """(worker thread) One pipeline: presence writes, then one PUBLISH of every message."""
        presence = PRESENCE_KEY + self.hub_id
        pipe = self._client.pipeline(transaction=False)
        messages = []
        for kind, item in batch:
            if kind == "msg":
                messages.append(item)
            elif kind == "op":
                op = item[0]
                if op == "hset":
                    pipe.hset(presence, item[1], item[2])
                    pipe.expire(presence, HUB_TTL_S)
                elif op == "hdel":
                    pipe.hdel(presence, item[1])
                elif op == "delete":
                    pipe.delete(*item[1:])
        if messages:
            pipe.publish(CHANNEL, orjson.dumps({"h": self.hub_id, "m": messages}))
        pipe.execute()

    # --- the beat: this hub's keys kept alive, the others' read --------------------------------

    async def _beat(self) -> None:
        import redis

        refresh_at = trio.current_time() + PRESENCE_REFRESH_S
        while True:
            await trio.sleep(BEAT_S)
            if not self.ok:
                await self._healthy.wait()
                continue
            hub = self.hub
            info = orjson.dumps(local_hub_info(hub, self.hub_id))
            entries = None
            if trio.current_time() >= refresh_at:
                refresh_at = trio.current_time() + PRESENCE_REFRESH_S
                entries = _encoded(local_presence(hub, self.hub_id))

            try:
                hubs = await self._run_sync(self._beat_limiter, self._beat_trip, info, entries)
            except (redis.RedisError, OSError) as exc:
                self._mark_down(exc, "beat")
                continue
            self.hubs = hubs
            # Devices of a hub that vanished without saying goodbye (killed) are offline now.
            for device_id, entry in list(self.remote.items()):
                if entry["hub"] not in hubs:
                    del self.remote[device_id]

    def _beat_trip(
        self, info: bytes, entries: dict[str, bytes] | None
    ) -> dict[str, dict[str, Any]]:
        """(worker thread) Our keys refreshed, the other hubs' descriptions read."""
        client = self._client
        presence = PRESENCE_KEY + self.hub_id
        pipe = client.pipeline(transaction=False)
        pipe.set(HUB_KEY + self.hub_id, info, ex=HUB_TTL_S)
        if entries:
            pipe.hset(presence, mapping=entries)
        pipe.expire(presence, HUB_TTL_S)
        pipe.execute()
        return _read_hubs(client, self.hub_id)

    # --- what the others say -------------------------------------------------------------------

    def _dispatch(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
            sender = data["h"]
            if sender == self.hub_id:
                return
            for item in data["m"]:
                self._handle(sender, item)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
            # Another hub's bug (or a foreign publisher) must not stop this one.
            log.warning("bus_bad_message", hub_id=self.hub_id, error=str(exc)[:200])

    def _handle(self, sender: str, item: list[Any]) -> None:
        hub = self.hub
        kind = item[0]
        if kind == "fan":
            _, device_id, owner, update_kind, payload = item
            hub.fanout.publish_local(
                device_id, self._owner(device_id, owner), update_kind, payload.encode()
            )
        elif kind == "lost":
            for device_id, owner, count in item[1]:
                hub.fanout.missed_local(device_id, self._owner(device_id, owner), int(count))
        elif kind == "claim":
            hub.remote_claim(item[1], item[2])
        elif kind == "on":
            entry = item[1]
            self.remote[entry["device_id"]] = entry
        elif kind == "off":
            entry = self.remote.get(item[1])
            if entry is not None and entry["hub"] == sender:
                del self.remote[item[1]]
        elif kind == "bye":
            for device_id, entry in list(self.remote.items()):
                if entry["hub"] == sender:
                    del self.remote[device_id]
            self.hubs.pop(sender, None)
        elif kind == "notify":
            body = item[1]
            username = body.get("u")
            targets = [
                s for s in hub.fanout.subscribers if username is None or s.username == username
            ]
            hub.fanout.publish_to(targets, body["k"], body["p"].encode())
        elif kind == "wake":
            self._later(lambda: hub.commands.wake(item[1]["d"]))
        elif kind == "config":
            self._later(lambda: hub.commands.push_config(item[1]["d"]))
        elif kind == "dev":
            self._later(lambda: hub.reload_device(item[1]["d"]))
        elif kind == "rules":
            self._later(hub.reload_alert_rules)
        elif kind == "logout":
            hub.forget_session_hash(item[1]["h"])
        else:
            log.warning("bus_unknown_message", hub_id=self.hub_id, kind=str(kind)[:40])

    def _owner(self, device_id: str, sent: str | None) -> str | None:
        """The device's owner as this hub knows it (the sender's word if it does not)."""
        info = self.hub.devices.get(device_id)
        return info.owner if info is not None else sent

    def _later(self, job: Callable[[], Awaitable[None]]) -> None:
        """Store work asked for by another hub, done in order by the worker task."""
        try:
            self._work_send.send_nowait(job)
        except trio.WouldBlock:
            log.warning("bus_work_dropped", hub_id=self.hub_id)

    async def _worker(self) -> None:
        async for job in self._work_recv:
            try:
                await job()
            except Exception as exc:  # the store may be down; the next wake-up tries again
                log.warning("bus_work_failed", hub_id=self.hub_id, error=str(exc)[:200])

    # --- the cluster, for REST and /health ---------------------------------------------------

    async def cluster(self) -> ClusterView:
        import redis

        mine = local_hub_info(self.hub, self.hub_id)
        local_devices = local_presence(self.hub, self.hub_id)
        if self.ok:
            try:
                hubs, remote = await self._run_sync(
                    self._beat_limiter, _read_cluster, self._client, self.hub_id
                )
                return ClusterView(
                    hubs=[mine, *hubs.values()],
                    devices=local_devices + list(remote.values()),
                    complete=True,
                )
            except (redis.RedisError, OSError) as exc:
                self._mark_down(exc, "cluster view")
        return ClusterView(hubs=[mine], devices=local_devices, complete=False)

    async def _run_sync(self, limiter: trio.CapacityLimiter, fn: Callable[..., Any], *args: Any):
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter)


# --- worker-thread helpers ------------------------------------------------------------------------


def _receive_batch(pubsub: Any) -> list[bytes]:
    """(worker thread) Wait a moment for a message, then take every one already waiting."""
    out: list[bytes] = []
    message = pubsub.get_message(timeout=RECEIVE_WAIT_S)
    while message is not None:
        if message.get("type") == "message":
            out.append(message["data"])
            if len(out) >= RECEIVE_BATCH_MAX:
                break
        message = pubsub.get_message(timeout=0)
    return out


def _close_quietly(pubsub: Any) -> None:
    try:
        pubsub.close()
    except Exception as exc:  # closing a connection that is already gone
        log.debug("bus_close_failed", error=str(exc)[:200])


def _read_hubs(client: Any, own_id: str) -> dict[str, dict[str, Any]]:
    keys = [k for k in client.scan_iter(match=HUB_KEY + "*", count=1000)]
    if not keys:
        return {}
    hubs: dict[str, dict[str, Any]] = {}
    for raw in client.mget(keys):
        if raw is None:
            continue
        info = orjson.loads(raw)
        if info.get("hub_id") != own_id:
            hubs[info["hub_id"]] = info
    return hubs


def _read_cluster(
    client: Any, own_id: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    hubs = _read_hubs(client, own_id)
    remote: dict[str, dict[str, Any]] = {}
    if hubs:
        pipe = client.pipeline(transaction=False)
        for hub_id in hubs:
            pipe.hgetall(PRESENCE_KEY + hub_id)
        for entries in pipe.execute():
            for raw in entries.values():
                entry = orjson.loads(raw)
                known = remote.get(entry["device_id"])
                if known is None or entry["connected_at"] > known["connected_at"]:
                    remote[entry["device_id"]] = entry
    return hubs, remote


def open_bus(hub: Hub) -> LocalBus | RedisBus:
    url = hub.settings.redis_url
    return RedisBus(hub, url) if url else LocalBus(hub)
