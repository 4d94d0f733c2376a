"""The sensor registry: built-in sensors first, then the entry-point group `ems.edge.sensors`.

`load_sensors(["system", "simulated_ems"], device_id=..., data_dir=...)` makes one sensor per
name, in order. A name no one provides, or a plugin that cannot be loaded or built, is a
`ConfigError` naming it, so the agent stops at start with one clear message.

A package adds a sensor by declaring, in its own pyproject.toml::

    [project.entry-points."ems.edge.sensors"]
    modbus_meter = "my_package.meter:ModbusMeter"

where `ModbusMeter(device_id=..., data_dir=...)` returns an object with `name == "modbus_meter"`
and a `read()` (see `ems.edge.sensors.base`).
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from ems.edge.config import ConfigError
from ems.edge.sensors.base import Reading, Sensor, SensorFactory
from ems.edge.sensors.simulated import SimulatedEms, SimulatedVehicle
from ems.edge.sensors.system import SystemSensor

__all__ = [
    "BUILTIN_SENSORS",
    "ENTRY_POINT_GROUP",
    "Reading",
    "Sensor",
    "SensorFactory",
    "SimulatedEms",
    "SimulatedVehicle",
    "SystemSensor",
    "known_sensor_names",
    "load_sensors",
]

ENTRY_POINT_GROUP = "ems.edge.sensors"

BUILTIN_SENSORS: dict[str, Any] = {
    "system": SystemSensor,
    "simulated_ems": SimulatedEms,
    "simulated_vehicle": SimulatedVehicle,
}


def _plugins() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, entry)  # the first one installed wins, as importlib's
    return found


def known_sensor_names() -> list[str]:
    """Every sensor name `load_sensors` can resolve, built-ins first."""
    names = list(BUILTIN_SENSORS)
    names += sorted(n for n in _plugins() if n not in BUILTIN_SENSORS)
    return names


def load_sensors(names: Iterable[str], *, device_id: str, data_dir: Path) -> list[Sensor]:
    """One sensor per name, in order; ConfigError for a name nothing provides."""
    names = list(names)
    if len(set(names)) != len(names):
        raise ConfigError(f"sensors: a name appears twice in {', '.join(names)}")
    plugins: dict[str, EntryPoint] | None = None
    sensors: list[Sensor] = []
    for name in names:
        factory = BUILTIN_SENSORS.get(name)
        if factory is None:
            if plugins is None:
                plugins = _plugins()
            entry = plugins.get(name)
            if entry is None:
                known = list(BUILTIN_SENSORS) + sorted(
                    n for n in plugins if n not in BUILTIN_SENSORS
                )
                raise ConfigError(f"sensors: unknown sensor {name!r} (known: {', '.join(known)})")
            try:
                factory = entry.load()
            except Exception as exc:  # a broken plugin: any import-time error
                raise ConfigError(
                    f"sensors: {name!r} ({entry.value}) cannot be loaded: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        try:
            sensor = factory(device_id=device_id, data_dir=Path(data_dir))
        except Exception as exc:  # a plugin's constructor failing is a start-up error
            raise ConfigError(
                f"sensors: {name!r} cannot be created: {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(getattr(sensor, "read", None)):
            raise ConfigError(f"sensors: {name!r} gave an object without a read() method")
        if getattr(sensor, "name", None) != name:
            raise ConfigError(
                f"sensors: {name!r} gave a sensor named {getattr(sensor, 'name', None)!r}"
            )
        sensors.append(sensor)
    return sensors
