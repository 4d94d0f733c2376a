"""Sensors: readings the hub accepts, seeded simulations, and the entry-point registry."""

from __future__ import annotations

import math
import tomllib
from collections import namedtuple
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import psutil
import pytest

import ems.edge.sensors as registry
from ems.edge.config import ConfigError
from ems.edge.sensors import (
    BUILTIN_SENSORS,
    Sensor,
    SimulatedEms,
    SimulatedVehicle,
    SystemSensor,
    known_sensor_names,
    load_sensors,
)
from ems.protocol import messages as m
from ems.protocol.codec import METRIC_NAME, decode_device_message, encode

ROOT = Path(__file__).resolve().parents[2]


def assert_hub_accepts(readings: list[dict[str, Any]]) -> None:
    """Encode the readings as one telemetry message and decode it as the hub does."""
    samples = tuple(m.Sample(ts=1_763_800_000_000 + i, data=r) for i, r in enumerate(readings))
    decoded = decode_device_message(encode(m.Telemetry(seq=1, samples=samples)))
    assert isinstance(decoded, m.Telemetry)
    assert decoded.rejected == (), [r.describe() for r in decoded.rejected]
    assert len(decoded.samples) == len(readings)


class FakeClock:
    def __init__(self, step: float = 1.0) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# --- every built-in gives readings the hub accepts -------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_SENSORS))
def test_builtin_readings_pass_the_contract(name: str, tmp_path: Path) -> None:
    (sensor,) = load_sensors([name], device_id="ems_001", data_dir=tmp_path / "not-yet")
    assert isinstance(sensor, Sensor)
    assert sensor.name == name
    readings = [sensor.read() for _ in range(300)]
    assert all(readings), "every reading has metrics"
    for reading in readings:
        for metric in reading:
            assert METRIC_NAME.fullmatch(metric), metric
    assert_hub_accepts(readings)


def test_system_sensor_reads_the_host(tmp_path: Path) -> None:
    reading = SystemSensor(device_id="d", data_dir=tmp_path).read()
    for metric in ("cpuPercent", "memoryPercent", "memoryUsed", "diskPercent", "uptime"):
        assert metric in reading, metric
    assert 0 <= reading["memoryPercent"] <= 100
    assert isinstance(reading["memoryUsed"], int)


def test_system_sensor_reports_a_temperature_when_there_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Temp = namedtuple("Temp", "label current high critical")
    monkeypatch.setattr(
        psutil,
        "sensors_temperatures",
        lambda: {
            "acpitz": [Temp("", 30.0, None, None)],
            "cpu_thermal": [Temp("", math.nan, None, None), Temp("", 48.312, 80.0, 90.0)],
        },
        raising=False,
    )
    assert SystemSensor().read()["cpuTemperature"] == 48.3


def test_system_sensor_never_fails_on_a_poor_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise OSError("not on this platform")

    for name in ("cpu_percent", "virtual_memory", "disk_usage", "getloadavg", "boot_time"):
        monkeypatch.setattr(psutil, name, broken)
    monkeypatch.setattr(psutil, "sensors_temperatures", broken, raising=False)
    assert SystemSensor().read() == {}
    monkeypatch.delattr(psutil, "sensors_temperatures", raising=False)
    assert SystemSensor().read() == {}


# --- the simulations ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SimulatedEms, SimulatedVehicle])
def test_simulations_are_seeded_by_device_id(cls: type[SimulatedEms]) -> None:
    def run(device_id: str) -> list[dict[str, Any]]:
        sensor = cls(device_id=device_id, clock=FakeClock())
        return [sensor.read() for _ in range(20)]

    assert run("ems_001") == run("ems_001")
    assert run("ems_001") != run("ems_002")


def test_simulated_ems_is_plausible() -> None:
    sensor = SimulatedEms(device_id="ems_001", clock=FakeClock(step=60.0))
    readings = [sensor.read() for _ in range(2000)]
    assert set(readings[0]) == {"voltage", "current", "power", "energy", "temperature", "soc"}
    energies = [r["energy"] for r in readings]
    assert energies == sorted(energies), "energy never decreases"
    assert energies[-1] > energies[0]
    for r in readings:
        assert 207 <= r["voltage"] <= 253
        assert 0 < r["current"] <= 16
        assert r["power"] == pytest.approx(r["voltage"] * r["current"], rel=0.01)
        assert 0 <= r["soc"] <= 100
        assert -10 <= r["temperature"] <= 60


def test_simulated_vehicle_is_plausible() -> None:
    sensor = SimulatedVehicle(device_id="car_1", clock=FakeClock(step=1.0))
    readings = [sensor.read() for _ in range(3000)]
    assert set(readings[0]) == {
        "speed",
        "engineRpm",
        "fuelLevel",
        "batteryVoltage",
        "position",
        "crashDetection",
        "dtc",
    }
    for r in readings:
        assert 0 <= r["speed"] <= 140
        assert 600 <= r["engineRpm"] <= 6500
        assert 0 < r["fuelLevel"] <= 100
        assert r["batteryVoltage"] >= 12.0, "no spurious LOW_BATTERY"
        assert -90 <= r["position"]["latitude"] <= 90
        assert -180 <= r["position"]["longitude"] <= 180
        assert r["crashDetection"] in (0, 1)
        assert isinstance(r["dtc"], int)
    # it moves
    first, last = readings[0]["position"], readings[-1]["position"]
    assert first != last
    # crashes and trouble codes are rare
    assert sum(r["crashDetection"] for r in readings) <= 3
    assert sum(1 for r in readings if r["dtc"]) <= 1000


def test_vehicle_crash_and_dtc_happen_when_likely() -> None:
    sensor = SimulatedVehicle(
        device_id="car_1",
        clock=FakeClock(),
        crash_probability=1.0,
        dtc_probability=1.0,
        dtc_readings=3,
    )
    readings = [sensor.read() for _ in range(8)]
    assert all(r["crashDetection"] == 1 for r in readings)
    dtcs = [r["dtc"] for r in readings]
    assert dtcs[0] in (171, 300, 420, 442, 128)
    assert dtcs[0] == dtcs[1] == dtcs[2], "a trouble code persists for a while"
    assert 0 in dtcs, "then it clears"


def test_force_sets_the_next_reading_only() -> None:
    sensor = SimulatedVehicle(device_id="car_1", clock=FakeClock())
    sensor.read()
    sensor.force("batteryVoltage", 11.0)
    sensor.force("custom.flag", True)
    forced = sensor.read()
    assert forced["batteryVoltage"] == 11.0
    assert forced["custom.flag"] is True
    after = sensor.read()
    assert after["batteryVoltage"] >= 12.0
    assert "custom.flag" not in after
    assert_hub_accepts([forced, after])


def test_force_refuses_what_the_hub_would() -> None:
    sensor = SimulatedEms(device_id="d")
    with pytest.raises(ValueError, match="not a metric name"):
        sensor.force("9lives", 1)
    with pytest.raises(ValueError, match="finite"):
        sensor.force("voltage", math.inf)


# --- the registry --------------------------------------------------------------------------------


class Thermometer:
    name = "thermometer"

    def __init__(self, *, device_id: str, data_dir: Path) -> None:
        self.device_id = device_id
        self.data_dir = data_dir

    def read(self) -> dict[str, Any]:
        return {"roomTemperature": 21.5}


class Misnamed(Thermometer):
    name = "something_else"


def broken_factory(*, device_id: str, data_dir: Path) -> Sensor:
    raise RuntimeError("no bus")


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **targets: str) -> None:
    entries = [
        EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)
        for name, value in targets.items()
    ]

    def entry_points(*, group: str) -> list[EntryPoint]:
        return [e for e in entries if e.group == group]

    monkeypatch.setattr(registry, "entry_points", entry_points)


def test_plugins_come_from_entry_points(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_entry_points(
        monkeypatch,
        thermometer=f"{__name__}:Thermometer",
        system=f"{__name__}:Misnamed",  # a plugin cannot shadow a built-in
    )
    assert known_sensor_names() == [*BUILTIN_SENSORS, "thermometer"]
    system, thermometer = load_sensors(
        ["system", "thermometer"], device_id="ems_001", data_dir=tmp_path
    )
    assert isinstance(system, SystemSensor)
    assert isinstance(thermometer, Thermometer)
    assert thermometer.device_id == "ems_001"
    assert thermometer.data_dir == tmp_path
    assert_hub_accepts([thermometer.read()])


def test_unknown_sensor_lists_the_known_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_entry_points(monkeypatch, thermometer=f"{__name__}:Thermometer")
    with pytest.raises(ConfigError) as caught:
        load_sensors(["system", "barometer"], device_id="d", data_dir=tmp_path)
    assert str(caught.value) == (
        "sensors: unknown sensor 'barometer' "
        "(known: system, simulated_ems, simulated_vehicle, thermometer)"
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_module_xyz:Sensor", "cannot be loaded: ModuleNotFoundError"),
        (f"{__name__}:NoSuchClass", "cannot be loaded: AttributeError"),
        (f"{__name__}:broken_factory", "cannot be created: RuntimeError: no bus"),
        (f"{__name__}:Misnamed", "gave a sensor named 'something_else'"),
        ("math:pi", "cannot be created: TypeError"),
    ],
)
def test_a_broken_plugin_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, target: str, message: str
) -> None:
    fake_entry_points(monkeypatch, plugin=target)
    with pytest.raises(ConfigError, match=r"^sensors: 'plugin'") as caught:
        load_sensors(["plugin"], device_id="d", data_dir=tmp_path)
    assert message in str(caught.value)


def test_a_name_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="appears twice"):
        load_sensors(["system", "system"], device_id="d", data_dir=tmp_path)


def test_builtins_are_also_declared_as_entry_points() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][
        "ems.edge.sensors"
    ]
    assert set(declared) == set(BUILTIN_SENSORS)
    for name, target in declared.items():
        module, _, attr = target.partition(":")
        loaded = EntryPoint(name=name, value=target, group="ems.edge.sensors").load()
        assert loaded is BUILTIN_SENSORS[name], (module, attr)


def test_readings_stay_valid_over_a_long_run() -> None:
    """A long simulated day (one read a minute) never leaves the contract."""
    clock = FakeClock(step=60.0)
    sensors = [
        SimulatedEms(device_id="x", clock=clock),
        SimulatedVehicle(device_id="x", clock=clock),
    ]
    for _hours in range(3):  # 3 x 8 h, one telemetry message of 960 samples each
        assert_hub_accepts([s.read() for _ in range(480) for s in sensors])
