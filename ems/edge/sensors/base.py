"""What a sensor is: a name and a fast, synchronous `read()`.

A reading maps metric names (`^[A-Za-z][A-Za-z0-9_.]{0,63}$`) to a finite number, a boolean, a
string of at most 256 characters, or one flat object of those (`position`). The hub's typed
metrics (`voltage`, `temperature`, `batteryVoltage`, `position`, …) must have their type. The
sampler calls `read()` on the trio thread, so it must not block: no network, no sleeping; reading
a few files under /proc or /sys is fine.

Sensors from other packages register a factory under the entry-point group `ems.edge.sensors`;
the factory is called as `factory(device_id=..., data_dir=...)` and returns a `Sensor` whose
`name` is the entry point's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

Scalar = float | int | bool | str
Value = Scalar | dict[str, Scalar]
Reading = dict[str, Value]


@runtime_checkable
class Sensor(Protocol):
    name: str

    def read(self) -> Reading:
        """The current values. May raise; the sampler logs the error and goes on."""
        ...


class SensorFactory(Protocol):
    def __call__(self, *, device_id: str, data_dir: Path) -> Sensor: ...
