"""The trio side of the store: `AsyncStore` runs a synchronous Store on worker threads.

Every call is one `trio.to_thread.run_sync` hop through a `CapacityLimiter(1)`, so the wrapped
store (and its single database connection) is only ever used by one thread at a time. Calls are
not abandoned on cancellation: a cancelled caller waits for its statement to finish, so the next
call never overlaps it. Callers batch (`write_batch`) so one hop carries many rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ems.hub.store.base import WelcomeState
from ems.threads import SerialThread

if TYPE_CHECKING:
    from collections.abc import Callable

    from ems.hub.store.base import (
        ArtifactRow,
        CommandRow,
        CommandUpdate,
        ConfigState,
        DeviceRecord,
        SampleRow,
        SessionRecord,
        Store,
        UserRecord,
        WriteBatch,
    )

P = ParamSpec("P")
T = TypeVar("T")

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(settings_url: str | None, data_dir: Path) -> Store:
    """The store the settings ask for, not yet opened (call `open()`, e.g. via AsyncStore).

    A `postgresql://` or `postgres://` URL selects PostgreSQL; anything else (None, "") the
    embedded SQLite file `data_dir/ems.db`, creating the directory."""
    if settings_url and settings_url.lower().startswith(_POSTGRES_SCHEMES):
        from ems.hub.store.postgres import PostgresStore

        return PostgresStore(settings_url)
    from ems.hub.store.sqlite import SqliteStore

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    return SqliteStore(data_dir / "ems.db")


class AsyncStore:
    """Async mirror of the Store protocol; owns the wrapped store's thread discipline."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._thread = SerialThread()

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._thread.run(fn, *args, **kwargs)

    async def open(self) -> None:
        await self._run(self.store.open)

    async def close(self) -> None:
        await self._run(self.store.close)

    async def ping(self) -> None:
        await self._run(self.store.ping)

    # --- ingest ----------------------------------------------------------------------------
    async def write_batch(self, batch: WriteBatch) -> None:
        await self._run(self.store.write_batch, batch)

    async def acked_seq(self, device_id: str, stream: str) -> int:
        return await self._run(self.store.acked_seq, device_id, stream)

    async def welcome_states(
        self, keys: list[tuple[str, str]], now: float
    ) -> dict[tuple[str, str], WelcomeState]:
        """For each (device_id, stream): its `WelcomeState`, all in one trip to the store's
        thread (a connect storm brings hundreds of `hello`s per commit interval)."""
        store = self.store

        def lookup() -> dict[tuple[str, str], WelcomeState]:
            return {
                (device_id, stream): WelcomeState(
                    acked_seq=store.acked_seq(device_id, stream),
                    config=store.get_config(device_id),
                    commands=store.deliverable_commands(device_id, now),
                )
                for device_id, stream in dict.fromkeys(keys)
            }

        return await self._run(lookup)

    # --- telemetry reads -------------------------------------------------------------------
    async def samples(
        self, device_id: str, *, since: float | None, until: float | None, limit: int
    ) -> list[SampleRow]:
        return await self._run(self.store.samples, device_id, since=since, until=until, limit=limit)

    async def latest(self, device_id: str) -> SampleRow | None:
        return await self._run(self.store.latest, device_id)

    async def latest_many(self, device_ids: list[str]) -> dict[str, SampleRow]:
        return await self._run(self.store.latest_many, device_ids)

    # --- devices -----------------------------------------------------------------------------
    async def create_device(self, device: DeviceRecord) -> None:
        await self._run(self.store.create_device, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        return await self._run(self.store.get_device, device_id)

    async def list_devices(self, owner: str | None = None) -> list[DeviceRecord]:
        return await self._run(self.store.list_devices, owner)

    async def delete_device(self, device_id: str) -> bool:
        return await self._run(self.store.delete_device, device_id)

    async def set_token_hash(self, device_id: str, token_hash: str) -> bool:
        return await self._run(self.store.set_token_hash, device_id, token_hash)

    async def set_device_info(
        self, device_id: str, *, firmware: str | None, agent: str | None
    ) -> None:
        await self._run(self.store.set_device_info, device_id, firmware=firmware, agent=agent)

    # --- users and login sessions ----------------------------------------------------------
    async def create_user(self, user: UserRecord) -> None:
        await self._run(self.store.create_user, user)

    async def get_user(self, username: str) -> UserRecord | None:
        return await self._run(self.store.get_user, username)

    async def list_users(self) -> list[UserRecord]:
        return await self._run(self.store.list_users)

    async def create_session(self, session: SessionRecord) -> None:
        await self._run(self.store.create_session, session)

    async def get_session(self, token_hash: str) -> SessionRecord | None:
        return await self._run(self.store.get_session, token_hash)

    async def delete_session(self, token_hash: str) -> None:
        await self._run(self.store.delete_session, token_hash)

    async def purge_sessions(self, now: float) -> int:
        return await self._run(self.store.purge_sessions, now)

    # --- alerts ------------------------------------------------------------------------------
    async def alerts(
        self, *, device_ids: list[str] | None, since: float | None, limit: int
    ) -> list[dict[str, Any]]:
        return await self._run(self.store.alerts, device_ids=device_ids, since=since, limit=limit)

    async def get_alert_rules(self) -> list[dict[str, Any]] | None:
        return await self._run(self.store.get_alert_rules)

    async def put_alert_rules(self, rules: list[dict[str, Any]]) -> None:
        await self._run(self.store.put_alert_rules, rules)

    # --- commands ----------------------------------------------------------------------------
    async def create_command(
        self, command: CommandRow, *, max_pending: int, supersede: bool
    ) -> list[str]:
        return await self._run(
            self.store.create_command, command, max_pending=max_pending, supersede=supersede
        )

    async def get_command(self, command_id: str) -> CommandRow | None:
        return await self._run(self.store.get_command, command_id)

    async def list_commands(self, device_id: str, *, limit: int) -> list[CommandRow]:
        return await self._run(self.store.list_commands, device_id, limit=limit)

    async def deliverable_commands(self, device_id: str, now: float) -> list[CommandRow]:
        return await self._run(self.store.deliverable_commands, device_id, now)

    async def update_command(self, update: CommandUpdate) -> CommandRow | None:
        return await self._run(self.store.update_command, update)

    async def changed_commands(self, ids: list[str]) -> list[CommandRow]:
        return await self._run(self.store.changed_commands, ids)

    async def expire_commands(self, now: float) -> list[CommandRow]:
        return await self._run(self.store.expire_commands, now)

    # --- config ------------------------------------------------------------------------------
    async def put_desired_config(
        self, device_id: str, config: dict[str, Any], now: float
    ) -> ConfigState:
        return await self._run(self.store.put_desired_config, device_id, config, now)

    async def get_config(self, device_id: str) -> ConfigState | None:
        return await self._run(self.store.get_config, device_id)

    # --- artifacts ---------------------------------------------------------------------------
    async def put_artifact(self, artifact: ArtifactRow) -> None:
        await self._run(self.store.put_artifact, artifact)

    async def get_artifact(self, sha256: str) -> ArtifactRow | None:
        return await self._run(self.store.get_artifact, sha256)

    async def list_artifacts(self) -> list[ArtifactRow]:
        return await self._run(self.store.list_artifacts)
