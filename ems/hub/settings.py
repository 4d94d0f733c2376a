"""The hub's settings: every `EMS_*` variable it reads, in one attrs class.

`docs/operations.md` lists the same names; a test checks the two agree. A bad value stops the hub
at start with one message naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs


class SettingsError(ValueError):
    """A setting has a value the hub cannot use; the message names the variable."""


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise SettingsError(f"{_env_name(attribute.name)} must be positive, got {value}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise SettingsError(f"{_env_name(attribute.name)} must not be negative, got {value}")


def _at_most(limit: float) -> Callable[[object, attrs.Attribute[Any], float], None]:
    def check(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if value > limit:
            raise SettingsError(f"{_env_name(attribute.name)} must be at most {limit}, got {value}")

    return check


def _env_name(field_name: str) -> str:
    return "EMS_" + field_name.upper()


@attrs.frozen(kw_only=True)
class HubSettings:
    data_dir: Path = Path("./data")
    """Where the embedded SQLite database and the artifacts live."""
    database_url: str | None = None
    """`postgresql://…` to use PostgreSQL instead of the embedded SQLite."""
    redis_url: str | None = None
    """`redis://…` to join other hub processes (step 7)."""
    admin_password: str | None = attrs.field(default=None, repr=False)
    """Password of `admin`, created on first start if missing; generated and printed if unset."""
    heartbeat_s: float = attrs.field(default=20.0, validator=_positive)
    hello_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    max_frame_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    max_body_bytes: int = attrs.field(default=1_048_576, validator=_positive)
    max_artifact_bytes: int = attrs.field(default=268_435_456, validator=_positive)
    rate_limit_per_s: float = attrs.field(default=200.0, validator=_positive)
    """Frames per second one device connection may send, sustained."""
    rate_limit_burst: float = attrs.field(default=400.0, validator=_positive)
    ingest_queue: int = attrs.field(default=20_000, validator=_positive)
    """Messages waiting for the store before device readers are pushed back."""
    store_batch_max: int = attrs.field(default=5_000, validator=_positive)
    """Most messages one store transaction takes."""
    store_commit_ms: float = attrs.field(default=50.0, validator=_positive)
    """How long the ingest writer gathers messages into one transaction (delays acks only)."""
    dashboard_queue: int = attrs.field(default=5_000, validator=_positive)
    """Updates queued per dashboard before its oldest telemetry is dropped (`lagged`)."""
    dashboard_flush_ms: float = attrs.field(default=10.0, validator=[_positive, _at_most(20.0)])
    """How long dashboard updates gather into one `batch` frame (at most 20 ms)."""
    strict_metrics: bool = False
    """Reject unknown metric names (they pass by default)."""
    session_ttl_s: float = attrs.field(default=86_400.0, validator=_positive)
    """Lifetime of a login token."""
    login_attempts_per_minute: int = attrs.field(default=10, validator=_positive)
    max_pending_commands: int = attrs.field(default=50, validator=_positive)
    goaway_retry_ms: int = attrs.field(default=1_000, validator=_positive)
    goaway_spread_ms: int = attrs.field(default=10_000, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=2.0, validator=_positive)
    """How long a closing connection waits for its last acks before `goaway` and 1001."""
    gc_gen0_threshold: int = attrs.field(default=10_000, validator=_not_negative)
    """Generation-0 threshold when `gc_freeze_s` is 0 (Python's automatic collections on); both
    0: Python's collector exactly as it comes (for comparison)."""
    gc_freeze_s: float = attrs.field(default=1.0, validator=_not_negative)
    """How often what is alive is frozen (`gc.freeze()`); while on, Python's automatic
    collections are off (they scanned every connection's objects, over and over) and full
    collections run as `gc_full_collect_s` says (ems/hub/collector.py)."""
    gc_full_collect_s: float = attrs.field(default=3_600.0, validator=_positive)
    """How often the frozen objects are collected after all (the cyclic garbage among them);
    sooner once resident memory has grown past twice what it was after the last one + 512 MiB."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HubSettings:
        """Read every field from its `EMS_<FIELD>` variable; unset ones keep their default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            name = _env_name(field.name)
            raw = environ.get(name)
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(name, raw, _CONVERTERS[field.name])
        return cls(**values)


def _parse(name: str, raw: str, convert: Callable[[str], Any]) -> Any:
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not valid: {exc}") from None


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _float(raw: str) -> float:
    value = float(raw)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


def _url(*schemes: str) -> Callable[[str], str]:
    def convert(raw: str) -> str:
        if not raw.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"expected a {' or '.join(schemes)}:// URL")
        return raw

    return convert


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "data_dir": Path,
    "database_url": _url("postgresql", "postgres"),
    "redis_url": _url("redis", "rediss", "unix"),
    "admin_password": str,
    "heartbeat_s": _float,
    "hello_timeout_s": _float,
    "max_frame_bytes": int,
    "max_body_bytes": int,
    "max_artifact_bytes": int,
    "rate_limit_per_s": _float,
    "rate_limit_burst": _float,
    "ingest_queue": int,
    "store_batch_max": int,
    "store_commit_ms": _float,
    "dashboard_queue": int,
    "dashboard_flush_ms": _float,
    "strict_metrics": _bool,
    "session_ttl_s": _float,
    "login_attempts_per_minute": int,
    "max_pending_commands": int,
    "goaway_retry_ms": int,
    "goaway_spread_ms": int,
    "shutdown_grace_s": _float,
    "gc_gen0_threshold": int,
    "gc_freeze_s": _float,
    "gc_full_collect_s": _float,
}
