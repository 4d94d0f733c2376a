"""`system`: the device's own health through psutil.

Metrics (camelCase, as the seed's vehicle fields): `cpuPercent`, `memoryPercent`, `memoryUsed`
(bytes), `diskPercent` (the filesystem holding the data directory), `loadAvg1`, `loadAvg5`,
`loadAvg15`, `uptime` (seconds) and `cpuTemperature` (°C, only where the platform reports one).
Each group is read on its own: a platform that lacks one (no load average, no thermal zone) loses
that group only, never the reading.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import psutil

from ems.edge.sensors.base import Reading

# What psutil raises on a platform or file it cannot read.
_PLATFORM_ERRORS = (OSError, psutil.Error, NotImplementedError, AttributeError, RuntimeError)

# Thermal chips that carry the CPU/SoC temperature, most specific first (Raspberry Pi first).
_PREFERRED_CHIPS = ("cpu_thermal", "cpu-thermal", "soc_thermal", "coretemp", "k10temp", "zenpower")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest existing parent (the data directory may not exist yet)."""
    path = path.absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class SystemSensor:
    name = "system"

    def __init__(self, *, device_id: str = "", data_dir: Path = Path(".")) -> None:
        del device_id  # the same for every device
        self.data_dir = Path(data_dir)
        try:
            psutil.cpu_percent(interval=None)  # the first call only starts the measurement
        except _PLATFORM_ERRORS:
            pass

    def read(self) -> Reading:
        data: Reading = {}
        try:
            cpu = psutil.cpu_percent(interval=None)
            if _finite(cpu):
                data["cpuPercent"] = round(float(cpu), 1)
        except _PLATFORM_ERRORS:
            pass
        try:
            memory = psutil.virtual_memory()
            data["memoryPercent"] = round(float(memory.percent), 1)
            data["memoryUsed"] = int(memory.used)
        except _PLATFORM_ERRORS:
            pass
        try:
            disk = psutil.disk_usage(str(_existing_ancestor(self.data_dir)))
            data["diskPercent"] = round(float(disk.percent), 1)
        except _PLATFORM_ERRORS:
            pass
        try:
            load1, load5, load15 = psutil.getloadavg()
            data["loadAvg1"] = round(float(load1), 2)
            data["loadAvg5"] = round(float(load5), 2)
            data["loadAvg15"] = round(float(load15), 2)
        except _PLATFORM_ERRORS:
            pass
        try:
            data["uptime"] = round(max(0.0, time.time() - psutil.boot_time()), 1)
        except _PLATFORM_ERRORS:
            pass
        temperature = self._temperature()
        if temperature is not None:
            data["cpuTemperature"] = temperature
        return {k: v for k, v in data.items() if not isinstance(v, float) or math.isfinite(v)}

    @staticmethod
    def _temperature() -> float | None:
        """The CPU/SoC temperature, or None where there is none to read."""
        read = getattr(psutil, "sensors_temperatures", None)
        if read is None:
            return None
        try:
            chips = read()
        except _PLATFORM_ERRORS:
            return None
        if not chips:
            return None
        ordered = [c for c in _PREFERRED_CHIPS if c in chips] + sorted(
            c for c in chips if c not in _PREFERRED_CHIPS
        )
        for chip in ordered:
            for entry in chips[chip]:
                current = getattr(entry, "current", None)
                if _finite(current):
                    return round(float(current), 1)
        return None
