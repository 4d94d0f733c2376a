"""Dashboard fan-out: the subscription index and each dashboard's bounded send queue.

Hot path: a sample is encoded once (`encode_update`) and the same bytes are appended to every
subscriber's queue. Each dashboard's writer wakes, waits one flush tick so updates gather, and
sends them as one `batch` frame. A queue over its bound drops its oldest `telemetry_update`s
first (alerts, statuses and command updates stay) and the next frame starts with `lagged`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import orjson
import trio

TELEMETRY = 0
OTHER = 1
FRAME_BYTES = 512 * 1024
"""Largest `batch` frame: well below the 1 MiB frame limit common to WebSocket clients."""
_BATCH_HEAD = b'{"type":"batch","messages":['
_BATCH_TAIL = b"]}"


def encode_update(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message)


@attrs.define(eq=False)
class DashboardQueue:
    """One dashboard's pending updates, pre-encoded, with the drop-oldest-telemetry policy."""

    capacity: int
    _items: deque[tuple[int, bytes]] = attrs.field(init=False, factory=deque)
    _wakeup: trio.Event = attrs.field(init=False, factory=trio.Event)
    dropped_pending: int = attrs.field(init=False, default=0)
    dropped_total: int = attrs.field(init=False, default=0)
    _bytes: int = attrs.field(init=False, default=0)
    """Total size of the queued payloads (lets `take_frame` take everything in one step)."""

    def __len__(self) -> int:
        return len(self._items)

    def put(self, kind: int, payload: bytes) -> None:
        items = self._items
        items.append((kind, payload))
        self._bytes += len(payload)
        if len(items) > self.capacity:
            self._drop_one()
        self._wakeup.set()

    def _drop_one(self) -> None:
        items = self._items
        for index, (kind, _) in enumerate(items):
            if kind == TELEMETRY:
                self._bytes -= len(items[index][1])
                del items[index]
                break
        else:
            # nothing but must-keep updates: the oldest of those goes
            self._bytes -= len(items.popleft()[1])
        self.dropped_pending += 1
        self.dropped_total += 1

    def missed(self, count: int) -> None:
        """Updates for this dashboard that were lost before they reached its queue (another
        hub could not relay them): told in the next frame's `lagged`, as a drop here is."""
        self.dropped_pending += count
        self.dropped_total += count
        self._wakeup.set()

    async def wait(self) -> None:
        """Until something is queued."""
        while not self._items and not self.dropped_pending:
            await self._wakeup.wait()
            self._wakeup = trio.Event()

    def take_frame(self, limit: int = 2_000, max_bytes: int = FRAME_BYTES) -> str | None:
        """Up to `limit` queued updates as one frame (a `batch` unless there is just one) of at
        most `max_bytes` (a single larger update still goes, alone)."""
        parts: list[bytes] = []
        size = len(_BATCH_HEAD) + len(_BATCH_TAIL)
        if self.dropped_pending:
            parts.append(b'{"type":"lagged","dropped":%d}' % self.dropped_pending)
            size += len(parts[0])
            self.dropped_pending = 0
        items = self._items
        if len(parts) + len(items) <= limit and size + self._bytes + len(items) <= max_bytes:
            # Everything fits (the common case): one step instead of one per update.
            parts += [payload for _, payload in items]
            items.clear()
            self._bytes = 0
        while items and len(parts) < limit:
            payload = items[0][1]
            size += len(payload) + 1
            if parts and size > max_bytes:
                break
            items.popleft()
            self._bytes -= len(payload)
            parts.append(payload)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0].decode()
        return (_BATCH_HEAD + b",".join(parts) + _BATCH_TAIL).decode()


@attrs.define(eq=False)
class Subscriber:
    """What the index needs to know about one dashboard connection."""

    username: str
    is_admin: bool
    queue: DashboardQueue
    devices: set[str] = attrs.field(factory=set)
    wildcard: bool = False
    connected_at: float = 0.0


@attrs.define(eq=False)
class FanOut:
    """Who gets what: device id -> subscribers, plus `*` subscribers by owner."""

    _by_device: dict[str, set[Subscriber]] = attrs.field(factory=dict)
    _wildcard_admins: set[Subscriber] = attrs.field(factory=set)
    _wildcard_by_owner: dict[str, set[Subscriber]] = attrs.field(factory=dict)
    subscribers: set[Subscriber] = attrs.field(factory=set)
    relay: Callable[[str, str | None, int, bytes], None] | None = None
    """Set when other hub processes exist (the bus): every update is offered to them too."""

    def add(self, subscriber: Subscriber) -> None:
        self.subscribers.add(subscriber)

    def remove(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        self.unsubscribe(subscriber, list(subscriber.devices))
        self._set_wildcard(subscriber, False)

    def subscribe(self, subscriber: Subscriber, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            if device_id == "*":
                self._set_wildcard(subscriber, True)
                continue
            subscriber.devices.add(device_id)
            self._by_device.setdefault(device_id, set()).add(subscriber)

    def unsubscribe(self, subscriber: Subscriber, device_ids: Iterable[str]) -> None:
        for device_id in device_ids:
            if device_id == "*":
                self._set_wildcard(subscriber, False)
                continue
            subscriber.devices.discard(device_id)
            subs = self._by_device.get(device_id)
            if subs is not None:
                subs.discard(subscriber)
                if not subs:
                    del self._by_device[device_id]

    def forget_device(self, device_id: str) -> None:
        """`device_id` was deleted: its explicit subscriptions end, so a device created later
        under the same id (perhaps for another owner) reaches only those who subscribe anew."""
        for subscriber in self._by_device.pop(device_id, ()):
            subscriber.devices.discard(device_id)

    def _set_wildcard(self, subscriber: Subscriber, on: bool) -> None:
        subscriber.wildcard = on
        if subscriber.is_admin:
            target = self._wildcard_admins
        else:
            target = self._wildcard_by_owner.setdefault(subscriber.username, set())
        if on:
            target.add(subscriber)
        else:
            target.discard(subscriber)

    def targets(self, device_id: str, owner: str | None) -> set[Subscriber] | None:
        """Every subscriber of `device_id` (owned by `owner`), or None when nobody listens."""
        direct = self._by_device.get(device_id)
        admins = self._wildcard_admins
        owners = self._wildcard_by_owner.get(owner) if owner is not None else None
        if not admins and not owners:
            return direct
        found = set(admins)
        if owners:
            found |= owners
        if direct:
            found |= direct
        return found

    def publish(self, device_id: str, owner: str | None, kind: int, payload: bytes) -> int:
        """To this hub's subscribers of `device_id`, and to the other hubs' (through `relay`)."""
        if self.relay is not None:
            self.relay(device_id, owner, kind, payload)
        return self.publish_local(device_id, owner, kind, payload)

    def publish_local(self, device_id: str, owner: str | None, kind: int, payload: bytes) -> int:
        """To this hub's subscribers only (what another hub relayed)."""
        targets = self.targets(device_id, owner)
        if not targets:
            return 0
        for subscriber in targets:
            subscriber.queue.put(kind, payload)
        return len(targets)

    def missed_local(self, device_id: str, owner: str | None, count: int) -> None:
        """This hub's subscribers of `device_id` missed `count` updates (see `missed`)."""
        for subscriber in self.targets(device_id, owner) or ():
            subscriber.queue.missed(count)

    def publish_to(self, subscribers: Iterable[Subscriber], kind: int, payload: bytes) -> None:
        for subscriber in subscribers:
            subscriber.queue.put(kind, payload)
