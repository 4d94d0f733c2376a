"""Device control: tracked hub-to-device messages (commands and their kin) and desired config.

One code path for every message type with an `id` (`command`, `software_update`,
`history_request`, `ssh_access`): a row in the store with the full lifecycle (`pending` ->
`sent` -> `received` -> `running` -> `succeeded` | `failed` | `rejected`, or `expired`), sent at
once when the device is online, (re)sent after its next `welcome` while not yet `received`, and
expired by a sweeper within a second of `expires_at`. Adding a type is a `KINDS` entry.

Offline policy, per kind or command name (`DELIVERY`):
- `queued`: waits for an offline device until it expires (the default);
- `latest_only`: a newer one supersedes older ones still `pending`/`sent` (software updates);
- `online_only`: refused with 409 when the device is offline (realtime device events).

Config is versioned desired state rather than a command: `PUT` stores version N+1 and pushes it
when the device is online; a device whose `hello` reports an older version gets it right after
`welcome`; its `config_applied` is stored as the reported version.
"""

from __future__ import annotations

import enum
import secrets
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ems.hub.fanout import OTHER
from ems.hub.store import Conflict
from ems.hub.store.base import CommandRow, CommandUpdate, ConfigState, WelcomeState
from ems.logs import get_logger
from ems.protocol import messages as m

if TYPE_CHECKING:
    from ems.hub.device_link import DeviceConnection
    from ems.hub.hub import Hub

log = get_logger("ems.hub.commands")

DEFAULT_EXPIRES_IN_S = 86_400.0
EXPIRY_SWEEP_S = 0.5


class Delivery(enum.StrEnum):
    QUEUED = "queued"
    LATEST_ONLY = "latest_only"
    ONLINE_ONLY = "online_only"


KINDS = ("command", "software_update", "history_request", "ssh_access")
DELIVERY: dict[str, Delivery] = {"software_update": Delivery.LATEST_ONLY}
"""Declared offline policy by kind, or by `command:<name>` for commands; otherwise queued.
(Realtime device events are created online-only by their route.)"""


class DeviceOffline(Exception):
    """An online-only command for a device that is not connected."""


class TooManyPending(Exception):
    """The device already holds the maximum number of pending commands."""


def command_json(row: CommandRow) -> dict[str, Any]:
    """A command as the REST API and `command_status` show it."""
    return {
        "id": row.id,
        "device_id": row.device_id,
        "kind": row.kind,
        "name": row.name,
        "params": row.params,
        "status": row.status,
        "progress": row.progress,
        "result": row.result,
        "error": row.error,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "expires_at": row.expires_at,
        "delivery": row.delivery,
    }


def delivery_for(kind: str, name: str) -> Delivery:
    """The declared policy: by command name for `command`s, else by kind."""
    key = f"command:{name}" if kind == "command" else kind
    return DELIVERY.get(key, Delivery.QUEUED)


def config_json(state: ConfigState | None) -> dict[str, Any]:
    if state is None:
        return {
            "desired": {"version": 0, "config": {}},
            "reported": {"version": None, "status": None, "error": None},
        }
    return {
        "desired": {"version": state.desired_version, "config": state.desired},
        "reported": {
            "version": state.reported_version,
            "status": state.reported_status,
            "error": state.reported_error,
        },
    }


class CommandService:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._touched: dict[str, float] = {}
        """device_id -> when (trio clock) a command or config for it was last made or woken:
        a `welcome` whose store lookup is older looks again (see `after_welcome`)."""

    def touch(self, device_id: str) -> None:
        self._touched[device_id] = trio.current_time()

    # --- creating ------------------------------------------------------------------------------

    async def create(
        self,
        device_id: str,
        *,
        kind: str,
        name: str,
        params: dict[str, Any],
        fields: dict[str, Any],
        expires_in_s: float | None = None,
        delivery: Delivery | None = None,
    ) -> CommandRow:
        """Store a new tracked message and send it now if the device is online.

        `fields` are the message's own wire fields besides `type` and `id` (for `command`:
        name and params)."""
        hub = self.hub
        delivery = delivery or delivery_for(kind, name)
        conn = hub.live_connection(device_id)
        if delivery is Delivery.ONLINE_ONLY and conn is None and not hub.is_online(device_id):
            raise DeviceOffline(device_id)
        now = hub.now_ms()
        self.touch(device_id)
        command_id = secrets.token_hex(12)
        expires_at = now + 1000 * (expires_in_s or DEFAULT_EXPIRES_IN_S)
        payload = {"type": kind, "id": command_id, **fields}
        if kind == "command":
            payload["expires_at"] = expires_at
        row = CommandRow(
            id=command_id,
            device_id=device_id,
            kind=kind,
            name=name,
            params=params,
            payload=payload,
            status="pending",
            created_at=now,
            updated_at=now,
            expires_at=expires_at,
            delivery=delivery.value,
        )
        try:
            superseded = await hub.store.create_command(
                row,
                max_pending=hub.settings.max_pending_commands,
                supersede=delivery is Delivery.LATEST_ONLY,
            )
        except Conflict:
            raise TooManyPending(device_id) from None
        log.info(
            "command_created",
            device_id=device_id,
            id=command_id,
            name=name,
            delivery=delivery.value,
        )
        if superseded:
            self.publish(await hub.store.changed_commands(superseded))
        self.publish([row])
        if conn is not None:
            row = await self._send(conn, row) or row
        else:
            # Connected to another hub, perhaps: it reads the row from the shared store.
            hub.bus.publish("wake", {"d": device_id})
        return row

    async def wake(self, device_id: str) -> None:
        """Another hub stored commands for `device_id`: send the ones not sent yet, if the
        device is connected here (a redelivery of `sent` ones waits for its next `welcome`)."""
        hub = self.hub
        self.touch(device_id)
        conn = hub.live_connection(device_id)
        if conn is None:
            return
        for row in await hub.store.deliverable_commands(device_id, hub.now_ms()):
            if row.status == "pending":
                await self._send(conn, row)

    async def push_config(self, device_id: str) -> None:
        """Another hub stored a new desired config for `device_id`: forget the cached version
        (a later `welcome` here must announce the new one) and push it if connected here."""
        hub = self.hub
        self.touch(device_id)
        info = hub.devices.get(device_id)
        if info is not None:
            info.desired_config_version = None
        conn = hub.live_connection(device_id)
        if conn is None:
            return
        state = await hub.store.get_config(device_id)
        if state is not None:
            if info is not None:
                info.desired_config_version = state.desired_version
            conn.send_message(m.Config(version=state.desired_version, config=state.desired))

    # --- delivering ----------------------------------------------------------------------------

    async def after_welcome(
        self, conn: DeviceConnection, hello: m.Hello, state: WelcomeState, looked_up_at: float
    ) -> None:
        """Right after `welcome`: the desired config if the device is behind, then every
        command not yet `received`, oldest first (both read with the welcome's lookup, which
        began at `looked_up_at`). A command or config made meanwhile found the device not yet
        welcomed, so it was only stored: look again for those."""
        device_id = conn.device_id
        config = state.config
        if config is not None and config.desired_version > hello.config_version:
            conn.send_message(m.Config(version=config.desired_version, config=config.desired))
        for row in state.commands:
            await self._send(conn, row)
        if self._touched.get(device_id, float("-inf")) >= looked_up_at:
            seen = config.desired_version if config is not None else hello.config_version
            latest = await self.hub.store.get_config(device_id)
            if latest is not None and latest.desired_version > max(seen, hello.config_version):
                conn.send_message(m.Config(version=latest.desired_version, config=latest.desired))
            await self.wake(device_id)

    async def _send(self, conn: DeviceConnection, row: CommandRow) -> CommandRow | None:
        if not conn.send_payload(row.payload):
            return None
        if row.status != "pending":
            return row  # a redelivery of a `sent` command: nothing changes
        updated = await self.hub.store.update_command(
            CommandUpdate(id=row.id, device_id=row.device_id, status="sent", at=self.hub.now_ms())
        )
        if updated is not None:
            self.publish([updated])
        return updated

    # --- status --------------------------------------------------------------------------------

    def publish(self, rows: list[CommandRow]) -> None:
        hub = self.hub
        for row in rows:
            info = hub.devices.get(row.device_id)
            payload = orjson.dumps({"type": "command_status", "command": command_json(row)})
            hub.fanout.publish(row.device_id, info.owner if info else None, OTHER, payload)

    def publish_config(self, state: ConfigState) -> None:
        hub = self.hub
        info = hub.devices.get(state.device_id)
        if info is not None:
            info.desired_config_version = state.desired_version
            info.reported_config_version = state.reported_version
        payload = orjson.dumps(
            {
                "type": "config_status",
                "device_id": state.device_id,
                "desired_version": state.desired_version,
                "reported_version": state.reported_version,
                "status": state.reported_status,
            }
        )
        hub.fanout.publish(state.device_id, info.owner if info else None, OTHER, payload)

    async def expire_forever(self) -> None:
        """The expiry sweeper (a task of the Hub's nursery)."""
        while True:
            await trio.sleep(EXPIRY_SWEEP_S)
            try:
                expired = await self.hub.store.expire_commands(self.hub.now_ms())
            except Exception as exc:  # the store may be down; /health says so; try again
                log.warning("command_expiry_failed", error=str(exc))
                continue
            if expired:
                log.info("commands_expired", count=len(expired))
                self.publish(expired)

    # --- config ----------------------------------------------------------------------------------

    async def put_config(self, device_id: str, config: dict[str, Any]) -> ConfigState:
        hub = self.hub
        self.touch(device_id)
        state = await hub.store.put_desired_config(device_id, config, hub.now_ms())
        conn = hub.live_connection(device_id)
        if conn is not None:
            conn.send_message(m.Config(version=state.desired_version, config=state.desired))
        # The other hubs forget their cached version, and push it if the device is theirs.
        hub.bus.publish("config", {"d": device_id})
        log.info(
            "config_desired",
            device_id=device_id,
            version=state.desired_version,
            online=conn is not None,
        )
        self.publish_config(state)
        return state
