"""Simulated sensors for demos, tests and benchmarks: plausible random walks, seeded per device.

`simulated_ems` is an energy meter with a battery (`voltage`, `current`, `power`, `energy`,
`temperature`, `soc`); `simulated_vehicle` is the seed's vehicle (`speed`, `engineRpm`,
`fuelLevel`, `batteryVoltage`, `position`, `crashDetection`, `dtc`). Both draw from a
`random.Random` seeded with the device id, so one device tells the same story on every run, and
both take `force(metric, value)`: the next reading carries that value (e.g. `batteryVoltage` 11.0
to raise `LOW_BATTERY` on the hub), then the walk goes on as before.

Time between readings (for `energy` and the vehicle's position) comes from an injected monotonic
`clock`; the first reading counts as no time at all.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from ems.edge.sensors.base import Reading, Value
from ems.protocol.codec import METRIC_NAME


def _walk(
    rng: random.Random, value: float, *, step: float, low: float, high: float, mean: float
) -> float:
    """One step of a bounded random walk that drifts back towards `mean`."""
    value += rng.gauss(0.0, step) + 0.05 * (mean - value)
    return min(high, max(low, value))


class _Simulated:
    name: str

    def __init__(
        self,
        *,
        device_id: str,
        data_dir: Path | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        del data_dir  # nothing to keep on disk
        self.rng = rng if rng is not None else random.Random(f"{self.name}:{device_id}")
        self._clock = clock
        self._last: float | None = None
        self._forced: dict[str, Value] = {}

    def force(self, metric: str, value: Value) -> None:
        """The next reading carries `value` for `metric` (once)."""
        if not METRIC_NAME.fullmatch(metric):
            raise ValueError(f"not a metric name: {metric!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{metric}: expected a finite number, got {value}")
        self._forced[metric] = value

    def _elapsed(self) -> float:
        now = self._clock()
        elapsed = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        return elapsed

    def read(self) -> Reading:
        data = self._step(self._elapsed())
        if self._forced:
            data.update(self._forced)
            self._forced.clear()
        return data

    def _step(self, elapsed: float) -> Reading:
        raise NotImplementedError


class SimulatedEms(_Simulated):
    """A mains energy meter with a battery: volts, amps, watts, kWh, °C, state of charge (%)."""

    name = "simulated_ems"

    def __init__(
        self,
        *,
        device_id: str,
        data_dir: Path | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(device_id=device_id, data_dir=data_dir, rng=rng, clock=clock)
        r = self.rng
        self.voltage = r.uniform(226.0, 234.0)
        self.current = r.uniform(2.0, 8.0)
        self.temperature = r.uniform(22.0, 32.0)
        self.soc = r.uniform(40.0, 95.0)
        self.energy = round(r.uniform(100.0, 5000.0), 1)  # kWh on the meter at start
        self._charging = r.random() < 0.5

    def _step(self, elapsed: float) -> Reading:
        r = self.rng
        self.voltage = _walk(r, self.voltage, step=0.6, low=207.0, high=253.0, mean=230.0)
        self.current = _walk(r, self.current, step=0.3, low=0.2, high=16.0, mean=5.0)
        power = self.voltage * self.current
        self.energy += power * elapsed / 3_600_000.0  # W·s -> kWh; never decreases
        self.temperature = _walk(r, self.temperature, step=0.2, low=-10.0, high=60.0, mean=28.0)
        if self.soc >= 99.0:
            self._charging = False
        elif self.soc <= 15.0:
            self._charging = True
        drift = (0.02 if self._charging else -0.02) * max(elapsed, 1.0)
        self.soc = min(100.0, max(0.0, self.soc + drift + r.gauss(0.0, 0.05)))
        return {
            "voltage": round(self.voltage, 1),
            "current": round(self.current, 2),
            "power": round(power, 1),
            "energy": round(self.energy, 4),
            "temperature": round(self.temperature, 1),
            "soc": round(self.soc, 1),
        }


# Diagnostic trouble codes as numbers (P0171, P0300, P0420, P0442, P0128).
_DTC_CODES = (171, 300, 420, 442, 128)
_EARTH_RADIUS_M = 6_371_000.0


class SimulatedVehicle(_Simulated):
    """The seed's vehicle: km/h, rpm, fuel %, battery volts, GPS position, rare crash and DTC."""

    name = "simulated_vehicle"

    def __init__(
        self,
        *,
        device_id: str,
        data_dir: Path | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        crash_probability: float = 1 / 20_000,
        dtc_probability: float = 1 / 5_000,
        dtc_readings: int = 60,
    ) -> None:
        super().__init__(device_id=device_id, data_dir=data_dir, rng=rng, clock=clock)
        r = self.rng
        self.crash_probability = crash_probability
        self.dtc_probability = dtc_probability
        self.dtc_readings = dtc_readings
        self.speed = r.uniform(0.0, 60.0)
        self.fuel = r.uniform(30.0, 100.0)
        self.battery = r.uniform(12.5, 12.8)
        self.latitude = 40.7128 + r.uniform(-0.05, 0.05)
        self.longitude = -74.0060 + r.uniform(-0.05, 0.05)
        self.heading = r.uniform(0.0, 2 * math.pi)
        self._dtc = 0
        self._dtc_left = 0

    def _step(self, elapsed: float) -> Reading:
        r = self.rng
        self.speed = _walk(r, self.speed, step=3.0, low=0.0, high=140.0, mean=50.0)
        if self.speed < 2.0:
            self.speed = 0.0
        moving = self.speed > 0.0
        rpm = 800.0 + self.speed * 28.0 + r.gauss(0.0, 60.0) if moving else 800.0 + r.gauss(0, 15)
        rpm = min(6500.0, max(600.0, rpm))
        # Fuel: about 8 l/100 km from a 50 l tank, in percent; refilled when nearly empty.
        self.fuel -= self.speed * elapsed / 3600.0 * 0.08 * 2.0
        if self.fuel < 5.0:
            self.fuel = 100.0
        # Battery: the alternator holds ~14 V while the engine turns.
        self.battery = _walk(r, self.battery, step=0.03, low=12.2, high=14.6, mean=14.0)
        # Position: move along a slowly turning heading.
        self.heading = (self.heading + r.gauss(0.0, 0.1)) % (2 * math.pi)
        metres = self.speed / 3.6 * elapsed
        self.latitude += math.degrees(metres * math.cos(self.heading) / _EARTH_RADIUS_M)
        cos_lat = max(0.01, math.cos(math.radians(self.latitude)))
        self.longitude += math.degrees(
            metres * math.sin(self.heading) / (_EARTH_RADIUS_M * cos_lat)
        )
        self.latitude = min(89.0, max(-89.0, self.latitude))
        self.longitude = (self.longitude + 180.0) % 360.0 - 180.0
        crash = 1 if r.random() < self.crash_probability else 0
        if self._dtc_left > 0:
            self._dtc_left -= 1
            if self._dtc_left == 0:
                self._dtc = 0
        elif r.random() < self.dtc_probability:
            self._dtc = r.choice(_DTC_CODES)
            self._dtc_left = self.dtc_readings
        return {
            "speed": round(self.speed, 1),
            "engineRpm": round(rpm),
            "fuelLevel": round(self.fuel, 1),
            "batteryVoltage": round(self.battery, 2),
            "position": {
                "latitude": round(self.latitude, 6),
                "longitude": round(self.longitude, 6),
            },
            "crashDetection": crash,
            "dtc": self._dtc,
        }
