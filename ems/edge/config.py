"""The agent's settings: a TOML file, then `EMS_*` variables over it, in one frozen attrs class.

`load_settings(path, os.environ)` reads the file (optional), applies the variables, and returns an
`EdgeSettings`, or raises `ConfigError` whose message names the one key that is wrong
(`edge.toml: [sensors].intervals.system: expected a positive number, got "fast"`,
`EMS_HUB_URL: expected ws:// or wss://`). Unknown keys are errors too, so a typo never passes
silently. No message, log line or repr ever holds the device token: the settings name the token
*file*, and `read_token()` reads it when the agent connects.

TOML layout (every key optional except the three the variables can also give; see
`docs/edge.example.toml`)::

    device_id = "ems_001"                 # EMS_DEVICE_ID; ^[A-Za-z0-9_.-]{1,64}$
    hub_url = "wss://hub.example.com"     # EMS_HUB_URL; ws:// or wss://, no credentials, no query
    token_file = "/etc/ems-edge/token"    # EMS_TOKEN_FILE; the device token, alone in the file
    ca_file = "/etc/ems-edge/ca.pem"      # EMS_CA_FILE; wss:// only (default: system CAs)
    data_dir = "/var/lib/ems-edge"        # EMS_DATA_DIR; default ./edge-data

    [sensors]
    enabled = ["system", "simulated_ems"] # EMS_SENSORS (comma-separated)
    batch_interval_s = 1.0                # EMS_BATCH_INTERVAL_S: one telemetry message per interval
    intervals = { system = 5.0 }          # sensor -> seconds between reads (default 1.0)

    [history]                             # local history store (every sample, for uploads)
    retention_s = 604800                  # EMS_HISTORY_RETENTION_S (7 days)
    max_rows = 1000000                    # EMS_HISTORY_MAX_ROWS

    [outbox]
    max_bytes = 67108864                  # EMS_OUTBOX_MAX_BYTES (64 MiB)

    [jobs]                                # job -> seconds, or { interval_s, jitter_s }
    history_upload = 3600
    ota_check = { interval_s = 3600, jitter_s = 600 }   # jitter default: 10 % of the interval

    [commands]
    allowed = ["ping", "reboot", "restart_agent"]
    timeout_s = 60
    argv = { reboot = ["systemctl", "reboot"], restart_agent = "systemctl restart ems-edge" }

    [ota]                                 # argv: a TOML array, or a string split like a shell
    install = ["/usr/local/bin/ems-install"]     # EMS_OTA_INSTALL (the image path is appended)
    healthcheck = "/usr/local/bin/ems-health"    # EMS_OTA_HEALTHCHECK
    rollback = "/usr/local/bin/ems-rollback"     # EMS_OTA_ROLLBACK
    pubkey_file = "/etc/ems-edge/ota.pem"        # EMS_OTA_PUBKEY_FILE

    [ssh]
    authorized_keys = "/home/pi/.ssh/authorized_keys"   # EMS_SSH_AUTHORIZED_KEYS

Relative paths in the file are taken relative to the file's directory; relative paths in
variables, and the defaults, relative to the working directory. An empty variable counts as unset.
Argv strings are split with `shlex.split` and never given to a shell. `[commands].argv` entries
are merged over the defaults (`reboot`, `restart_agent`); `ping` is built in and has no argv.
"""

from __future__ import annotations

import math
import os
import shlex
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import attrs
import orjson

from ems.protocol.codec import COMMAND_NAME, DEVICE_ID

DEFAULT_SENSORS: tuple[str, ...] = ("system", "simulated_ems")
DEFAULT_SENSOR_INTERVAL_S = 1.0
DEFAULT_JOBS: dict[str, float] = {
    "history_upload": 3600.0,
    "history_prune": 600.0,
    "ota_check": 3600.0,
}
"""The agent's scheduled jobs and their intervals; `[jobs]` may only name these."""
DEFAULT_JITTER_SHARE = 0.1
DEFAULT_COMMAND_ARGV: dict[str, list[str]] = {
    "reboot": ["systemctl", "reboot"],
    "restart_agent": ["systemctl", "restart", "ems-edge"],
}
DEFAULT_ALLOWED_COMMANDS: tuple[str, ...] = ("ping", "reboot", "restart_agent")

ENV_VARS: dict[str, str] = {
    "EMS_DEVICE_ID": "device_id",
    "EMS_HUB_URL": "hub_url",
    "EMS_TOKEN_FILE": "token_file",
    "EMS_CA_FILE": "ca_file",
    "EMS_DATA_DIR": "data_dir",
    "EMS_SENSORS": "sensors",
    "EMS_BATCH_INTERVAL_S": "batch_interval_s",
    "EMS_HISTORY_RETENTION_S": "history_retention_s",
    "EMS_HISTORY_MAX_ROWS": "history_max_rows",
    "EMS_OUTBOX_MAX_BYTES": "outbox_max_bytes",
    "EMS_OTA_INSTALL": "ota_install",
    "EMS_OTA_HEALTHCHECK": "ota_healthcheck",
    "EMS_OTA_ROLLBACK": "ota_rollback",
    "EMS_OTA_PUBKEY_FILE": "ota_pubkey_file",
    "EMS_SSH_AUTHORIZED_KEYS": "ssh_authorized_keys",
}
"""Every variable the agent reads, and the `EdgeSettings` field it sets."""


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and never holds a secret."""


# ---------------------------------------------------------------------------------------------
# Checks shared by the class (field names) and the loader (TOML keys, variable names): each
# returns why a value is wrong, or None.


def _device_id_fault(value: object) -> str | None:
    if type(value) is str and DEVICE_ID.fullmatch(value):
        return None
    return f"expected 1 to 64 of A-Z a-z 0-9 _ . -, got {_show(value)}"


def _hub_url_fault(value: object) -> str | None:
    """Why `value` is not a usable hub URL. Never quotes the URL: it might hold a credential."""
    if type(value) is not str:
        return f"expected a ws:// or wss:// URL, got {_kind(value)}"
    if not value.startswith(("ws://", "wss://")):
        return "expected ws:// or wss://"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return "not a valid URL (bad host or port)"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "credentials are not allowed in the URL (the token comes from the token file)"
    if parts.query or "?" in value:
        return "a query string is not allowed in the URL (the token comes from the token file)"
    if parts.fragment or "#" in value:
        return "a fragment is not allowed in the URL"
    if not parts.hostname:
        return "the URL has no host"
    return None


def _positive_fault(value: object) -> str | None:
    if type(value) in (int, float) and math.isfinite(value) and value > 0:  # type: ignore[arg-type]
        return None
    return f"expected a positive number, got {_show(value)}"


def _positive_int_fault(value: object) -> str | None:
    if type(value) is int and value > 0:
        return None
    return f"expected a positive integer, got {_show(value)}"


def _argv_fault(value: object) -> str | None:
    if type(value) is list and value and all(type(a) is str and a for a in value):
        return None
    return f"expected a non-empty list of non-empty strings, got {_show(value)}"


def _name_fault(value: object) -> str | None:
    if type(value) is str and COMMAND_NAME.fullmatch(value):
        return None
    return f"expected a name matching ^[a-z][a-z0-9_]{{0,63}}$, got {_show(value)}"


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _show(value: object) -> str:
    """A short rendering of a bad value for an error message (strings quoted, shapes named)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 40 else value[:40] + "…"
        return orjson.dumps(text).decode()
    if isinstance(value, int | float):
        return repr(value)
    return _kind(value)


def _check(
    fault: Callable[[object], str | None],
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def validate(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        reason = fault(value)
        if reason is not None:
            raise ConfigError(f"{attribute.name}: {reason}")

    return validate


def _optional(fault: Callable[[object], str | None]) -> Callable[[object], str | None]:
    return lambda value: None if value is None else fault(value)


def _each_value(fault: Callable[[object], str | None]) -> Callable[[object], str | None]:
    def check(mapping: object) -> str | None:
        if not isinstance(mapping, dict):
            return f"expected a table, got {_kind(mapping)}"
        for key, value in mapping.items():
            reason = fault(value)
            if reason is not None:
                return f"{key}: {reason}"
        return None

    return check


def _names_fault(value: object) -> str | None:
    if not isinstance(value, tuple) or not value:
        return "expected at least one name"
    for item in value:
        if type(item) is not str or not item.strip():
            return f"expected names, got {_show(item)}"
    if len(set(value)) != len(value):
        return "a name appears twice"
    return None


def _strip_slash(url: str) -> str:
    return url.rstrip("/") if isinstance(url, str) else url


def _default_authorized_keys(settings: EdgeSettings) -> Path:
    return settings.data_dir / "authorized_keys"


@attrs.frozen(kw_only=True)
class EdgeSettings:
    """Everything the agent reads at start. Build it with `load_settings`."""

    device_id: str = attrs.field(validator=_check(_device_id_fault))
    hub_url: str = attrs.field(converter=_strip_slash, validator=_check(_hub_url_fault))
    """`ws://host:port` or `wss://host[:port][/prefix]`; the agent appends `/ws/device/{id}`."""
    token_file: Path = attrs.field(converter=Path)
    """The device token, alone in this file; read by `read_token()`, never held here."""
    ca_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    """CA bundle for `wss://` (None: the system's trust store)."""
    data_dir: Path = attrs.field(default=Path("./edge-data"), converter=Path)
    """Outbox, history and command record live here."""
    sensors: tuple[str, ...] = attrs.field(
        default=DEFAULT_SENSORS, converter=tuple, validator=_check(_names_fault)
    )
    sensor_intervals: dict[str, float] = attrs.field(
        factory=dict, validator=_check(_each_value(_positive_fault))
    )
    """Seconds between reads, per sensor; every enabled sensor has an entry (default 1.0)."""
    batch_interval_s: float = attrs.field(default=1.0, validator=_check(_positive_fault))
    """Seconds between telemetry messages (each carries the samples taken since the last)."""
    history_retention_s: float = attrs.field(
        default=7 * 86_400.0, validator=_check(_positive_fault)
    )
    history_max_rows: int = attrs.field(default=1_000_000, validator=_check(_positive_int_fault))
    outbox_max_bytes: int = attrs.field(
        default=64 * 1024 * 1024, validator=_check(_positive_int_fault)
    )
    jobs: dict[str, float] = attrs.field(
        factory=lambda: dict(DEFAULT_JOBS), validator=_check(_each_value(_positive_fault))
    )
    """Scheduled job -> seconds between runs."""
    job_jitters: dict[str, float] = attrs.field(factory=dict)
    """Job -> jitter in seconds, where set explicitly; see `job_jitter()` for the default."""
    commands: dict[str, list[str]] = attrs.field(
        factory=lambda: {k: list(v) for k, v in DEFAULT_COMMAND_ARGV.items()},
        validator=_check(_each_value(_argv_fault)),
    )
    """Command name -> argv of the system command it runs (never through a shell)."""
    allowed_commands: tuple[str, ...] = attrs.field(
        default=DEFAULT_ALLOWED_COMMANDS, converter=tuple
    )
    """Command names the agent accepts; any other name is answered `rejected`."""
    command_timeout_s: float = attrs.field(default=60.0, validator=_check(_positive_fault))
    ota_install: list[str] | None = attrs.field(
        default=None, validator=_check(_optional(_argv_fault))
    )
    """Installer argv (the staged image's path is appended); None: `software_update` rejected."""
    ota_healthcheck: list[str] | None = attrs.field(
        default=None, validator=_check(_optional(_argv_fault))
    )
    """Run after a successful install; exit 0 means healthy. None: healthy."""
    ota_rollback: list[str] | None = attrs.field(
        default=None, validator=_check(_optional(_argv_fault))
    )
    """Run when the health check fails."""
    ota_pubkey_file: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(Path)
    )
    """Ed25519 public key (PEM); when set, images without a valid signature are refused."""
    ssh_authorized_keys: Path = attrs.field(
        default=attrs.Factory(_default_authorized_keys, takes_self=True), converter=Path
    )
    """The authorized_keys file the agent manages for `ssh_access`."""

    def __attrs_post_init__(self) -> None:
        intervals = dict.fromkeys(self.sensors, DEFAULT_SENSOR_INTERVAL_S)
        intervals.update(self.sensor_intervals)
        object.__setattr__(self, "sensor_intervals", intervals)
        for name, jitter in self.job_jitters.items():
            interval = self.jobs.get(name)
            if interval is None:
                raise ConfigError(f"job_jitters.{name}: no such job")
            if not (type(jitter) in (int, float) and 0 <= jitter <= interval):
                raise ConfigError(
                    f"job_jitters.{name}: expected 0 to {interval} seconds, got {_show(jitter)}"
                )
        for name in (*self.commands, *self.allowed_commands):
            reason = _name_fault(name)
            if reason is not None:
                raise ConfigError(f"commands: {reason}")

    # --- derived values --------------------------------------------------------------------

    @property
    def device_url(self) -> str:
        """The device link's URL: `{hub_url}/ws/device/{device_id}` (no credential in it)."""
        return f"{self.hub_url}/ws/device/{self.device_id}"

    @property
    def http_url(self) -> str:
        """The hub's HTTP base URL (`http://` for `ws://`, `https://` for `wss://`)."""
        return "http" + self.hub_url.removeprefix("ws")

    def sensor_interval(self, name: str) -> float:
        return self.sensor_intervals.get(name, DEFAULT_SENSOR_INTERVAL_S)

    def job_jitter(self, name: str) -> float:
        """Seconds a job's runs may move either way: as set, else 10 % of its interval."""
        if name in self.job_jitters:
            return float(self.job_jitters[name])
        return DEFAULT_JITTER_SHARE * self.jobs.get(name, DEFAULT_JOBS.get(name, 0.0))

    def read_token(self) -> str:
        """The device token from `token_file`, stripped. Raises ConfigError (without the
        token in it) when the file is missing, unreadable, empty or holds more than a token."""
        where = f"token_file {str(self.token_file)!r}"
        try:
            raw = self.token_file.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"{where}: is a directory, not a file") from None
        except OSError as exc:
            raise ConfigError(
                f"{where}: cannot be read ({exc.strerror or type(exc).__name__})"
            ) from None
        try:
            token = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"{where}: the token must be printable ASCII") from None
        if not token:
            raise ConfigError(f"{where}: the file is empty")
        if not all(33 <= ord(c) <= 126 for c in token):
            raise ConfigError(
                f"{where}: expected one token with no spaces or line breaks inside it"
            )
        return token


# ---------------------------------------------------------------------------------------------
# Loading


def load_settings(config_path: Path | None, environ: Mapping[str, str]) -> EdgeSettings:
    """Settings from the TOML file at `config_path` (None: no file), then `EMS_*` variables.

    Raises ConfigError naming the file and key, or the variable, of the first bad value.
    """
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if config_path is not None:
        reader = _TomlReader(Path(config_path))
        values, where = reader.read()
    env_values, env_where = _read_env(environ)
    values.update(env_values)
    where.update(env_where)
    for field, variable in (
        ("device_id", "EMS_DEVICE_ID"),
        ("hub_url", "EMS_HUB_URL"),
        ("token_file", "EMS_TOKEN_FILE"),
    ):
        if field not in values:
            raise ConfigError(
                f"{field}: required; set {variable} or `{field}` in the config file"
                + ("" if config_path is not None else " (--config)")
            )
    _cross_checks(values, where)
    try:
        return EdgeSettings(**values)
    except ConfigError as exc:
        # A field validator fired: put the key's origin in front of the field name.
        field, _, reason = str(exc).partition(": ")
        field = field.split(".", 1)[0]
        if field in where:
            raise ConfigError(f"{where[field]}: {reason}") from None
        raise


def _cross_checks(values: dict[str, Any], where: dict[str, str]) -> None:
    ca_file = values.get("ca_file")
    if ca_file is not None:
        if not str(values["hub_url"]).startswith("wss://"):
            raise ConfigError(f"{where['ca_file']}: a CA file is only used with a wss:// hub URL")
        if not Path(ca_file).is_file():
            raise ConfigError(f"{where['ca_file']}: {str(ca_file)!r} is not a readable file")
    pubkey = values.get("ota_pubkey_file")
    if pubkey is not None and not Path(pubkey).is_file():
        raise ConfigError(f"{where['ota_pubkey_file']}: {str(pubkey)!r} is not a readable file")
    enabled = values.get("sensors", DEFAULT_SENSORS)
    intervals = values.get("sensor_intervals", {})
    unknown = [name for name in intervals if name not in enabled]
    if unknown:
        from ems.edge.sensors import known_sensor_names  # the registry imports this module

        known = known_sensor_names()
        for name in unknown:
            if name not in known:
                raise ConfigError(
                    f"{where['sensor_intervals']}.{name}: unknown sensor "
                    f"(known: {', '.join(sorted(known))})"
                )


# --- TOML --------------------------------------------------------------------------------------

_TOP_KEYS = (
    "device_id",
    "hub_url",
    "token_file",
    "ca_file",
    "data_dir",
    "sensors",
    "history",
    "outbox",
    "jobs",
    "commands",
    "ota",
    "ssh",
)
_TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "sensors": ("enabled", "batch_interval_s", "intervals"),
    "history": ("retention_s", "max_rows"),
    "outbox": ("max_bytes",),
    "commands": ("allowed", "timeout_s", "argv"),
    "ota": ("install", "healthcheck", "rollback", "pubkey_file"),
    "ssh": ("authorized_keys",),
}
_JOB_KEYS = ("interval_s", "jitter_s")


def _key_text(key: str) -> str:
    bare = key and all(c.isalnum() or c in "_-" for c in key) and key.isascii()
    return key if bare else orjson.dumps(key).decode()


class _TomlReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.parent

    def label(self, *keys: str) -> str:
        """`device_id`, `[sensors].intervals.system`: where a key sits in the file."""
        head, *rest = keys
        if not rest:
            return f"{self.path}: {_key_text(head)}"
        return f"{self.path}: [{_key_text(head)}]." + ".".join(_key_text(k) for k in rest)

    def fail(self, keys: tuple[str, ...], reason: str) -> NoReturn:
        raise ConfigError(f"{self.label(*keys)}: {reason}")

    def check(self, keys: tuple[str, ...], value: object, fault: Callable[[object], str | None]):
        reason = fault(value)
        if reason is not None:
            self.fail(keys, reason)
        return value

    def no_unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], *at: str) -> None:
        unknown = [k for k in table if k not in allowed]
        if unknown:
            names = ", ".join(orjson.dumps(k).decode() for k in unknown)
            place = f"{self.path}: [{'.'.join(_key_text(k) for k in at)}]" if at else str(self.path)
            plural = "s" if len(unknown) > 1 else ""
            raise ConfigError(
                f"{place}: unknown key{plural} {names} (known: {', '.join(sorted(allowed))})"
            )

    def table(self, keys: tuple[str, ...], value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(keys, f"expected a table, got {_kind(value)}")
        return value

    def path_value(self, keys: tuple[str, ...], value: object) -> Path:
        if type(value) is not str or not value:
            self.fail(keys, f"expected a path (a non-empty string), got {_show(value)}")
        return self.base / Path(value).expanduser()

    def argv(self, keys: tuple[str, ...], value: object) -> list[str]:
        if type(value) is str:
            try:
                value = shlex.split(value)
            except ValueError as exc:
                self.fail(keys, f"cannot split the command line: {exc}")
        return self.check(keys, value, _argv_fault)  # type: ignore[return-value]

    def read(self) -> tuple[dict[str, Any], dict[str, str]]:
        try:
            with self.path.open("rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{self.path}: config file not found") from None
        except OSError as exc:
            raise ConfigError(
                f"{self.path}: cannot read the config file ({exc.strerror})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.path}: not valid TOML: {exc}") from None
        self.no_unknown_keys(doc, _TOP_KEYS)
        values: dict[str, Any] = {}
        where: dict[str, str] = {}

        def put(field: str, keys: tuple[str, ...], value: Any) -> None:
            values[field] = value
            where[field] = self.label(*keys)

        if "device_id" in doc:
            put(
                "device_id",
                ("device_id",),
                self.check(("device_id",), doc["device_id"], _device_id_fault),
            )
        if "hub_url" in doc:
            put("hub_url", ("hub_url",), self.check(("hub_url",), doc["hub_url"], _hub_url_fault))
        for key in ("token_file", "ca_file", "data_dir"):
            if key in doc:
                put(key, (key,), self.path_value((key,), doc[key]))

        if "sensors" in doc:
            sensors = self.table(("sensors",), doc["sensors"])
            self.no_unknown_keys(sensors, _TABLE_KEYS["sensors"], "sensors")
            if "enabled" in sensors:
                keys = ("sensors", "enabled")
                enabled = sensors["enabled"]
                if type(enabled) is not list or not all(type(s) is str for s in enabled):
                    self.fail(keys, f"expected an array of sensor names, got {_show(enabled)}")
                put("sensors", keys, tuple(self.check(keys, tuple(enabled), _names_fault)))
            if "batch_interval_s" in sensors:
                keys = ("sensors", "batch_interval_s")
                put("batch_interval_s", keys, self.check(keys, sensors[keys[1]], _positive_fault))
            if "intervals" in sensors:
                keys = ("sensors", "intervals")
                intervals = self.table(keys, sensors["intervals"])
                for name, seconds in intervals.items():
                    self.check((*keys, name), seconds, _positive_fault)
                put("sensor_intervals", keys, {k: float(v) for k, v in intervals.items()})

        if "history" in doc:
            history = self.table(("history",), doc["history"])
            self.no_unknown_keys(history, _TABLE_KEYS["history"], "history")
            if "retention_s" in history:
                keys = ("history", "retention_s")
                put(
                    "history_retention_s", keys, self.check(keys, history[keys[1]], _positive_fault)
                )
            if "max_rows" in history:
                keys = ("history", "max_rows")
                put(
                    "history_max_rows",
                    keys,
                    self.check(keys, history[keys[1]], _positive_int_fault),
                )

        if "outbox" in doc:
            outbox = self.table(("outbox",), doc["outbox"])
            self.no_unknown_keys(outbox, _TABLE_KEYS["outbox"], "outbox")
            if "max_bytes" in outbox:
                keys = ("outbox", "max_bytes")
                put(
                    "outbox_max_bytes", keys, self.check(keys, outbox[keys[1]], _positive_int_fault)
                )

        if "jobs" in doc:
            self._read_jobs(self.table(("jobs",), doc["jobs"]), put)

        if "commands" in doc:
            commands = self.table(("commands",), doc["commands"])
            self.no_unknown_keys(commands, _TABLE_KEYS["commands"], "commands")
            if "allowed" in commands:
                keys = ("commands", "allowed")
                allowed = commands["allowed"]
                if type(allowed) is not list:
                    self.fail(keys, f"expected an array of command names, got {_show(allowed)}")
                for name in allowed:
                    self.check(keys, name, _name_fault)
                put("allowed_commands", keys, tuple(allowed))
            if "timeout_s" in commands:
                keys = ("commands", "timeout_s")
                put("command_timeout_s", keys, self.check(keys, commands[keys[1]], _positive_fault))
            if "argv" in commands:
                keys = ("commands", "argv")
                table = self.table(keys, commands["argv"])
                merged = {k: list(v) for k, v in DEFAULT_COMMAND_ARGV.items()}
                for name, argv in table.items():
                    reason = _name_fault(name)
                    if reason is not None:
                        self.fail((*keys, name), f"not a command name: {reason}")
                    merged[name] = self.argv((*keys, name), argv)
                put("commands", keys, merged)

        if "ota" in doc:
            ota = self.table(("ota",), doc["ota"])
            self.no_unknown_keys(ota, _TABLE_KEYS["ota"], "ota")
            for key in ("install", "healthcheck", "rollback"):
                if key in ota:
                    put(f"ota_{key}", ("ota", key), self.argv(("ota", key), ota[key]))
            if "pubkey_file" in ota:
                keys = ("ota", "pubkey_file")
                put("ota_pubkey_file", keys, self.path_value(keys, ota["pubkey_file"]))

        if "ssh" in doc:
            ssh = self.table(("ssh",), doc["ssh"])
            self.no_unknown_keys(ssh, _TABLE_KEYS["ssh"], "ssh")
            if "authorized_keys" in ssh:
                keys = ("ssh", "authorized_keys")
                put("ssh_authorized_keys", keys, self.path_value(keys, ssh["authorized_keys"]))
        return values, where

    def _read_jobs(
        self, jobs: dict[str, Any], put: Callable[[str, tuple[str, ...], Any], None]
    ) -> None:
        intervals = dict(DEFAULT_JOBS)
        jitters: dict[str, float] = {}
        for name, spec in jobs.items():
            keys = ("jobs", name)
            if name not in DEFAULT_JOBS:
                self.fail(keys, f"unknown job (known: {', '.join(DEFAULT_JOBS)})")
            if isinstance(spec, dict):
                self.no_unknown_keys(spec, _JOB_KEYS, "jobs", name)
                if "interval_s" not in spec:
                    self.fail((*keys, "interval_s"), "required")
                interval = self.check((*keys, "interval_s"), spec["interval_s"], _positive_fault)
                if "jitter_s" in spec:
                    jitter = spec["jitter_s"]
                    ok = type(jitter) in (int, float) and 0 <= jitter <= interval
                    if not ok:
                        self.fail(
                            (*keys, "jitter_s"),
                            f"expected 0 to {interval} seconds (the interval), got {_show(jitter)}",
                        )
                    jitters[name] = float(jitter)
            else:
                interval = self.check(keys, spec, _positive_fault)
            intervals[name] = float(interval)  # type: ignore[arg-type]
        put("jobs", ("jobs",), intervals)
        if jitters:
            put("job_jitters", ("jobs",), jitters)


# --- environment -------------------------------------------------------------------------------


def _env_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected a positive number, got {_show(raw)}")
    return value


def _env_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {_show(raw)}")
    return value


def _env_argv(name: str, raw: str) -> list[str]:
    try:
        argv = shlex.split(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: cannot split the command line: {exc}") from None
    if not argv:
        raise ConfigError(f"{name}: expected a command line, got only spaces")
    return argv


def _env_sensors(name: str, raw: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    reason = _names_fault(names)
    if reason is not None:
        raise ConfigError(
            f"{name}: {reason} (comma-separated sensor names, e.g. system,simulated_ems)"
        )
    return names


def _env_device_id(name: str, raw: str) -> str:
    reason = _device_id_fault(raw)
    if reason is not None:
        raise ConfigError(f"{name}: {reason}")
    return raw


def _env_hub_url(name: str, raw: str) -> str:
    reason = _hub_url_fault(raw)
    if reason is not None:
        raise ConfigError(f"{name}: {reason}")
    return raw


def _env_path(_name: str, raw: str) -> Path:
    return Path(raw).expanduser()


_ENV_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "EMS_DEVICE_ID": _env_device_id,
    "EMS_HUB_URL": _env_hub_url,
    "EMS_TOKEN_FILE": _env_path,
    "EMS_CA_FILE": _env_path,
    "EMS_DATA_DIR": _env_path,
    "EMS_SENSORS": _env_sensors,
    "EMS_BATCH_INTERVAL_S": _env_float,
    "EMS_HISTORY_RETENTION_S": _env_float,
    "EMS_HISTORY_MAX_ROWS": _env_int,
    "EMS_OUTBOX_MAX_BYTES": _env_int,
    "EMS_OTA_INSTALL": _env_argv,
    "EMS_OTA_HEALTHCHECK": _env_argv,
    "EMS_OTA_ROLLBACK": _env_argv,
    "EMS_OTA_PUBKEY_FILE": _env_path,
    "EMS_SSH_AUTHORIZED_KEYS": _env_path,
}
assert _ENV_PARSERS.keys() == ENV_VARS.keys()


def _read_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for name, field in ENV_VARS.items():
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        values[field] = _ENV_PARSERS[name](name, raw.strip())
        where[field] = name
    return values, where


def load_from_environment(config_path: Path | None = None) -> EdgeSettings:
    """`load_settings` with this process's environment."""
    return load_settings(config_path, os.environ)
