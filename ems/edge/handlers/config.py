"""`config`: validate the desired document, persist it, apply it, report `config_applied`.

The agent applies the keys it knows and keeps the others; it rejects the document only when a
known key has an invalid value (naming the key). The applied version and document survive a
restart (the outbox database keeps them) and the version goes out in every `hello`.

Known keys: `batch_interval_s` (seconds between telemetry batches), `sensor_intervals`
(sensor name -> seconds), `jobs` (job name -> seconds).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ems.logs import get_logger
from ems.protocol import messages as m

log = get_logger("ems.edge.config")


class ConfigRejected(ValueError):
    pass


def _seconds(where: str, value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 < value <= 86_400:  # type: ignore[operator]
        raise ConfigRejected(f"{where}: expected seconds between 0 and 86400, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _interval_map(where: str, value: object) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigRejected(f"{where}: expected an object of name -> seconds")
    return {str(k): _seconds(f"{where}.{k}", v) for k, v in value.items()}


def validate(document: dict[str, Any]) -> dict[str, Any]:
    """The known keys of `document`, checked; raises ConfigRejected naming the bad key."""
    known: dict[str, Any] = {}
    if "batch_interval_s" in document:
        known["batch_interval_s"] = _seconds("batch_interval_s", document["batch_interval_s"])
    if "sensor_intervals" in document:
        known["sensor_intervals"] = _interval_map("sensor_intervals", document["sensor_intervals"])
    if "jobs" in document:
        known["jobs"] = _interval_map("jobs", document["jobs"])
    return known


@attrs.define(eq=False, kw_only=True)
class ConfigHandler:
    persist: Callable[[int, dict[str, Any]], Awaitable[None]]
    apply: Callable[[dict[str, Any]], None]
    report: Callable[[m.ConfigApplied], Awaitable[None]]
    current_version: Callable[[], int]
    device_id: str = ""
    message_type: str = "config"

    async def handle(self, config: m.Config) -> None:
        if config.version <= self.current_version():
            # Already applied (a repeat after reconnecting): say so again, change nothing.
            await self.report(
                m.ConfigApplied(seq=0, version=config.version, status=m.ConfigOutcome.APPLIED)
            )
            return
        try:
            known = validate(config.config)
        except ConfigRejected as exc:
            log.warning(
                "config_rejected", device_id=self.device_id, version=config.version, error=str(exc)
            )
            await self.report(
                m.ConfigApplied(
                    seq=0, version=config.version, status=m.ConfigOutcome.REJECTED, error=str(exc)
                )
            )
            return
        await self.persist(config.version, config.config)
        self.apply(known)
        log.info("config_applied", device_id=self.device_id, version=config.version)
        await self.report(
            m.ConfigApplied(seq=0, version=config.version, status=m.ConfigOutcome.APPLIED)
        )
