"""The agent's settings: TOML plus `EMS_*` overrides, errors that name the key, no token leaks."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
import pytest

from ems.edge.config import (
    DEFAULT_JOBS,
    ENV_VARS,
    ConfigError,
    EdgeSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "edge.example.toml"
SECRET = "s3cr3t-T0KEN-value-9f2c0d6e"

REQUIRED_ENV = {
    "EMS_HUB_URL": "ws://127.0.0.1:8000",
    "EMS_DEVICE_ID": "ems_001",
    "EMS_TOKEN_FILE": "/run/ems/token",
}


def write(tmp_path: Path, text: str, name: str = "edge.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_toml(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> EdgeSettings:
    return load_settings(write(tmp_path, text), environ or {})


BASE = """
device_id = "ems_001"
hub_url = "ws://hub.local:8000"
token_file = "token"
"""


# --- what loads ----------------------------------------------------------------------------


def test_three_variables_need_no_config_file() -> None:
    settings = load_settings(None, REQUIRED_ENV)
    assert settings.device_id == "ems_001"
    assert settings.hub_url == "ws://127.0.0.1:8000"
    assert settings.token_file == Path("/run/ems/token")
    assert settings.data_dir == Path("./edge-data")
    assert settings.sensors == ("system", "simulated_ems")
    assert settings.sensor_intervals == {"system": 1.0, "simulated_ems": 1.0}
    assert settings.batch_interval_s == 1.0
    assert settings.history_retention_s == 7 * 86_400
    assert settings.history_max_rows == 1_000_000
    assert settings.outbox_max_bytes == 64 * 1024 * 1024
    assert settings.jobs == DEFAULT_JOBS
    assert settings.job_jitter("history_upload") == pytest.approx(360.0)
    assert settings.commands == {
        "reboot": ["systemctl", "reboot"],
        "restart_agent": ["systemctl", "restart", "ems-edge"],
    }
    assert settings.allowed_commands == ("ping", "reboot", "restart_agent")
    assert settings.command_timeout_s == 60.0
    assert settings.ota_install is None
    assert settings.ota_healthcheck is None
    assert settings.ota_rollback is None
    assert settings.ota_pubkey_file is None
    assert settings.ca_file is None
    assert settings.ssh_authorized_keys == Path("./edge-data/authorized_keys")
    assert settings.device_url == "ws://127.0.0.1:8000/ws/device/ems_001"
    assert settings.http_url == "http://127.0.0.1:8000"


def test_full_toml(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "ota.pem").write_text("key")
    settings = load_toml(
        tmp_path,
        """
device_id = "pi-7.lab"
hub_url = "wss://hub.example.com/ems/"
token_file = "secrets/token"
ca_file = "ca.pem"
data_dir = "/var/lib/ems-edge"

[sensors]
enabled = ["system", "simulated_vehicle"]
batch_interval_s = 2.5
intervals = { system = 5, simulated_vehicle = 0.5 }

[history]
retention_s = 3600
max_rows = 500

[outbox]
max_bytes = 1048576

[jobs]
history_upload = 60
ota_check = { interval_s = 120, jitter_s = 0 }

[commands]
allowed = ["ping", "reboot", "blink"]
timeout_s = 5
argv = { blink = "led --blink 'fast please'", reboot = ["/sbin/reboot", "-f"] }

[ota]
install = "/usr/bin/ems-install --quiet"
healthcheck = ["/usr/bin/health"]
rollback = "/usr/bin/rollback"
pubkey_file = "ota.pem"

[ssh]
authorized_keys = "/home/pi/.ssh/authorized_keys"
""",
    )
    assert settings.device_id == "pi-7.lab"
    assert settings.hub_url == "wss://hub.example.com/ems"
    assert settings.device_url == "wss://hub.example.com/ems/ws/device/pi-7.lab"
    assert settings.http_url == "https://hub.example.com/ems"
    # relative paths in the file are relative to the file's directory
    assert settings.token_file == tmp_path / "secrets" / "token"
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.data_dir == Path("/var/lib/ems-edge")
    assert settings.sensors == ("system", "simulated_vehicle")
    assert settings.sensor_intervals == {"system": 5.0, "simulated_vehicle": 0.5}
    assert settings.batch_interval_s == 2.5
    assert settings.history_retention_s == 3600
    assert settings.history_max_rows == 500
    assert settings.outbox_max_bytes == 1_048_576
    assert settings.jobs == {**DEFAULT_JOBS, "history_upload": 60.0, "ota_check": 120.0}
    assert settings.job_jitter("ota_check") == 0.0
    assert settings.job_jitter("history_upload") == pytest.approx(6.0)
    assert settings.allowed_commands == ("ping", "reboot", "blink")
    assert settings.command_timeout_s == 5
    assert settings.commands == {
        "reboot": ["/sbin/reboot", "-f"],
        "restart_agent": ["systemctl", "restart", "ems-edge"],
        "blink": ["led", "--blink", "fast please"],
    }
    assert settings.ota_install == ["/usr/bin/ems-install", "--quiet"]
    assert settings.ota_healthcheck == ["/usr/bin/health"]
    assert settings.ota_rollback == ["/usr/bin/rollback"]
    assert settings.ota_pubkey_file == tmp_path / "ota.pem"
    assert settings.ssh_authorized_keys == Path("/home/pi/.ssh/authorized_keys")


def test_variables_override_the_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("ca")
    settings = load_toml(
        tmp_path,
        BASE
        + """
data_dir = "from-file"
[sensors]
enabled = ["system"]
batch_interval_s = 3
[history]
max_rows = 10
""",
        {
            "EMS_HUB_URL": "wss://other.example:9443",
            "EMS_DEVICE_ID": "ems_002",
            "EMS_TOKEN_FILE": "/etc/tok",
            "EMS_CA_FILE": str(tmp_path / "ca.pem"),
            "EMS_DATA_DIR": "/data/edge",
            "EMS_SENSORS": " simulated_ems , simulated_vehicle,",
            "EMS_BATCH_INTERVAL_S": "0.5",
            "EMS_HISTORY_RETENTION_S": "60",
            "EMS_HISTORY_MAX_ROWS": "20",
            "EMS_OUTBOX_MAX_BYTES": "4096",
            "EMS_OTA_INSTALL": "/opt/install --image 'with space'",
            "EMS_OTA_HEALTHCHECK": "/opt/health",
            "EMS_OTA_ROLLBACK": "/opt/rollback now",
            "EMS_SSH_AUTHORIZED_KEYS": "/etc/ems/keys",
            "EMS_UNRELATED": "ignored",
        },
    )
    assert settings.hub_url == "wss://other.example:9443"
    assert settings.device_id == "ems_002"
    assert settings.token_file == Path("/etc/tok")
    assert settings.ca_file == tmp_path / "ca.pem"
    assert settings.data_dir == Path("/data/edge")
    assert settings.sensors == ("simulated_ems", "simulated_vehicle")
    assert settings.sensor_intervals == {"simulated_ems": 1.0, "simulated_vehicle": 1.0}
    assert settings.batch_interval_s == 0.5
    assert settings.history_retention_s == 60
    assert settings.history_max_rows == 20
    assert settings.outbox_max_bytes == 4096
    assert settings.ota_install == ["/opt/install", "--image", "with space"]
    assert settings.ota_healthcheck == ["/opt/health"]
    assert settings.ota_rollback == ["/opt/rollback", "now"]
    assert settings.ssh_authorized_keys == Path("/etc/ems/keys")


def test_authorized_keys_default_follows_the_data_dir() -> None:
    settings = load_settings(None, {**REQUIRED_ENV, "EMS_DATA_DIR": "/srv/edge"})
    assert settings.ssh_authorized_keys == Path("/srv/edge/authorized_keys")


def test_empty_variables_count_as_unset(tmp_path: Path) -> None:
    settings = load_toml(tmp_path, BASE, {"EMS_HUB_URL": "", "EMS_OTA_INSTALL": "  "})
    assert settings.hub_url == "ws://hub.local:8000"
    assert settings.ota_install is None


def test_intervals_may_name_a_known_sensor_that_is_not_enabled(tmp_path: Path) -> None:
    settings = load_toml(
        tmp_path, BASE + '[sensors]\nenabled = ["system"]\nintervals = { simulated_vehicle = 2 }\n'
    )
    assert settings.sensor_interval("system") == 1.0
    assert settings.sensor_interval("simulated_vehicle") == 2.0


def test_example_file_loads(tmp_path: Path) -> None:
    """docs/edge.example.toml uses every table and key, and all of them are accepted."""
    (tmp_path / "ca.pem").write_text("ca")
    (tmp_path / "ota.pem").write_text("key")
    text = EXAMPLE.read_text()
    text = text.replace("/etc/ems-edge/ca.pem", str(tmp_path / "ca.pem"))
    text = text.replace("/etc/ems-edge/ota.pem", str(tmp_path / "ota.pem"))
    settings = load_toml(tmp_path, text)
    assert settings.hub_url == "wss://hub.example.com"
    assert settings.sensor_intervals["system"] == 5.0
    assert settings.ota_healthcheck == ["/usr/local/bin/ems-health", "--quick"]
    assert settings.commands["restart_agent"] == ["systemctl", "restart", "ems-edge"]
    # every table of the example is one the loader knows, and the example shows all of them
    doc = tomllib.loads(EXAMPLE.read_text())
    assert set(doc) == {
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
    }


def test_every_variable_is_in_the_module_docs_and_the_example() -> None:
    import ems.edge.config as config

    doc = config.__doc__ or ""
    example = EXAMPLE.read_text()
    for name in ENV_VARS:
        assert name in doc, name
        assert name in example, name
    fields = {f.name for f in attrs.fields(EdgeSettings)}
    assert set(ENV_VARS.values()) <= fields


# --- what does not load, and how it says so -------------------------------------------------


BAD_FILES = [
    (
        BASE + '[sensors]\nintervals = { system = "fast" }\n',
        'edge.toml: [sensors].intervals.system: expected a positive number, got "fast"',
    ),
    (
        BASE + "[sensors]\nintervals = { system = -1 }\n",
        "edge.toml: [sensors].intervals.system: expected a positive number, got -1",
    ),
    (
        BASE + "[sensors]\nintervals = { system = nan }\n",
        "edge.toml: [sensors].intervals.system: expected a positive number, got nan",
    ),
    (
        BASE + "[sensors]\nintervals = { sytem = 5 }\n",
        "edge.toml: [sensors].intervals.sytem: unknown sensor (known: ",
    ),
    (
        BASE + "[sensors]\nbatch_interval_s = true\n",
        "edge.toml: [sensors].batch_interval_s: expected a positive number, got true",
    ),
    (
        BASE + '[sensors]\nenabled = "system"\n',
        'edge.toml: [sensors].enabled: expected an array of sensor names, got "system"',
    ),
    (
        BASE + "[sensors]\nenabled = []\n",
        "edge.toml: [sensors].enabled: expected at least one name",
    ),
    (
        BASE + '[sensors]\nenabled = ["system", "system"]\n',
        "edge.toml: [sensors].enabled: a name appears twice",
    ),
    (
        BASE + "[sensors]\ninterval = 5\n",
        'edge.toml: [sensors]: unknown key "interval" (known: batch_interval_s, enabled, '
        "intervals)",
    ),
    (
        BASE + "sensors = 3\n",
        "edge.toml: sensors: expected a table, got a number",
    ),
    (
        'device_id = "bad id!"\nhub_url = "ws://h"\ntoken_file = "t"\n',
        'edge.toml: device_id: expected 1 to 64 of A-Z a-z 0-9 _ . -, got "bad id!"',
    ),
    (
        'device_id = "d"\nhub_url = "http://h"\ntoken_file = "t"\n',
        "edge.toml: hub_url: expected ws:// or wss://",
    ),
    (
        'device_id = "d"\nhub_url = "ws://"\ntoken_file = "t"\n',
        "edge.toml: hub_url: the URL has no host",
    ),
    (
        'device_id = "d"\nhub_url = "ws://h:port"\ntoken_file = "t"\n',
        "edge.toml: hub_url: not a valid URL (bad host or port)",
    ),
    (
        'device_id = "d"\nhub_url = "ws://h"\ntoken_file = ""\n',
        "edge.toml: token_file: expected a path (a non-empty string), got",
    ),
    (
        BASE + "[history]\nmax_rows = 1.5\n",
        "edge.toml: [history].max_rows: expected a positive integer, got 1.5",
    ),
    (
        BASE + "[history]\nretention_s = 0\n",
        "edge.toml: [history].retention_s: expected a positive number, got 0",
    ),
    (
        BASE + "[outbox]\nmax_bytes = -5\n",
        "edge.toml: [outbox].max_bytes: expected a positive integer, got -5",
    ),
    (
        BASE + "[jobs]\nhistory_uplod = 60\n",
        "edge.toml: [jobs].history_uplod: unknown job (known: history_upload, ",
    ),
    (
        BASE + "[jobs]\nota_check = { interval_s = 60, jitter_s = 61 }\n",
        "edge.toml: [jobs].ota_check.jitter_s: expected 0 to 60 seconds (the interval), got 61",
    ),
    (
        BASE + "[jobs]\nota_check = { jitter_s = 6 }\n",
        "edge.toml: [jobs].ota_check.interval_s: required",
    ),
    (
        BASE + "[jobs]\nota_check = { interval_s = 60, jiter_s = 6 }\n",
        'edge.toml: [jobs.ota_check]: unknown key "jiter_s"',
    ),
    (
        BASE + '[commands]\nallowed = ["Reboot"]\n',
        "edge.toml: [commands].allowed: expected a name matching",
    ),
    (
        BASE + "[commands]\nargv = { reboot = [] }\n",
        "edge.toml: [commands].argv.reboot: expected a non-empty list of non-empty strings, "
        "got an array",
    ),
    (
        BASE + '[commands]\nargv = { reboot = "unclosed \'quote" }\n',
        "edge.toml: [commands].argv.reboot: cannot split the command line: No closing quotation",
    ),
    (
        BASE + '[commands]\nargv = { "bad name" = ["x"] }\n',
        'edge.toml: [commands].argv."bad name": not a command name',
    ),
    (
        BASE + "[ota]\ninstall = [1, 2]\n",
        "edge.toml: [ota].install: expected a non-empty list of non-empty strings",
    ),
    (
        BASE + '[ota]\npubkey_file = "missing.pem"\n',
        "edge.toml: [ota].pubkey_file: ",
    ),
    (
        BASE + '[ssh]\nauthorised_keys = "k"\n',
        'edge.toml: [ssh]: unknown key "authorised_keys" (known: authorized_keys)',
    ),
    (
        BASE + 'ca_file = "ca.pem"\n',
        "edge.toml: ca_file: a CA file is only used with a wss:// hub URL",
    ),
    (
        'device_id = "d"\nhub_url = "wss://h"\ntoken_file = "t"\nca_file = "nope.pem"\n',
        "edge.toml: ca_file: ",
    ),
    (
        BASE + "device_id = 5\n",
        "not valid TOML",  # a key given twice
    ),
    (
        BASE + "[sensors\n",
        "edge.toml: not valid TOML: ",
    ),
]


@pytest.mark.parametrize(
    ("text", "message"),
    BAD_FILES,
    ids=[
        f"{i}-{message.removeprefix('edge.toml: ')[:40]}"
        for i, (_, message) in enumerate(BAD_FILES)
    ],
)
def test_a_bad_value_names_its_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_toml(tmp_path, text)
    assert str(caught.value).startswith(str(tmp_path)), str(caught.value)
    assert message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_top_level_keys_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_toml(tmp_path, BASE + 'hub_ulr = "ws://x"\ntoken = "' + SECRET + '"\n')
    message = str(caught.value)
    assert '"hub_ulr"' in message
    assert '"token"' in message
    assert "unknown keys" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("EMS_HUB_URL", "http://hub:8000", "EMS_HUB_URL: expected ws:// or wss://"),
        ("EMS_DEVICE_ID", "no spaces", "EMS_DEVICE_ID: expected 1 to 64 of"),
        ("EMS_DEVICE_ID", "x" * 65, "EMS_DEVICE_ID: expected 1 to 64 of"),
        ("EMS_SENSORS", ",,", "EMS_SENSORS: expected at least one name"),
        ("EMS_SENSORS", "system,system", "EMS_SENSORS: a name appears twice"),
        (
            "EMS_BATCH_INTERVAL_S",
            "soon",
            'EMS_BATCH_INTERVAL_S: expected a positive number, got "soon"',
        ),
        ("EMS_BATCH_INTERVAL_S", "-1", "EMS_BATCH_INTERVAL_S: expected a positive number"),
        ("EMS_BATCH_INTERVAL_S", "inf", "EMS_BATCH_INTERVAL_S: expected a positive number"),
        ("EMS_HISTORY_MAX_ROWS", "1e6", "EMS_HISTORY_MAX_ROWS: expected a positive integer"),
        ("EMS_OUTBOX_MAX_BYTES", "0", "EMS_OUTBOX_MAX_BYTES: expected a positive integer"),
        ("EMS_OTA_INSTALL", "/bin/x 'open", "EMS_OTA_INSTALL: cannot split the command line"),
        ("EMS_CA_FILE", "/etc/ca.pem", "EMS_CA_FILE: a CA file is only used with a wss://"),
        ("EMS_OTA_PUBKEY_FILE", "/nonexistent/k.pem", "EMS_OTA_PUBKEY_FILE: "),
    ],
)
def test_a_bad_variable_is_named(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**REQUIRED_ENV, name: value})
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("missing", ["EMS_HUB_URL", "EMS_DEVICE_ID", "EMS_TOKEN_FILE"])
def test_required_settings(missing: str) -> None:
    environ = {k: v for k, v in REQUIRED_ENV.items() if k != missing}
    field = ENV_VARS[missing]
    with pytest.raises(ConfigError, match=rf"^{field}: required; set {missing} or `{field}`"):
        load_settings(None, environ)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml", REQUIRED_ENV)


# --- the token never leaks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"ws://device:{SECRET}@hub:8000",
        f"ws://{SECRET}@hub:8000",
        f"wss://hub:8000/?token={SECRET}",
        f"wss://hub:8000/path?access_token={SECRET}",
        f"ws://hub/#{SECRET}",
    ],
)
def test_a_credential_in_the_hub_url_is_refused_without_being_repeated(
    tmp_path: Path, url: str
) -> None:
    with pytest.raises(ConfigError) as from_env:
        load_settings(None, {**REQUIRED_ENV, "EMS_HUB_URL": url})
    assert str(from_env.value).startswith("EMS_HUB_URL: ")
    with pytest.raises(ConfigError) as from_file:
        load_toml(tmp_path, f'device_id = "d"\ntoken_file = "t"\nhub_url = "{url}"\n')
    assert "hub_url: " in str(from_file.value)
    for error in (from_env.value, from_file.value):
        assert SECRET not in str(error)
        assert SECRET not in repr(error)
        assert error.__cause__ is None or SECRET not in str(error.__cause__)


def test_read_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {SECRET}\n")
    settings = load_settings(None, {**REQUIRED_ENV, "EMS_TOKEN_FILE": str(token_file)})
    assert settings.read_token() == SECRET
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        (f"{SECRET}\n{SECRET}", "expected one token with no spaces or line breaks"),
        (f"{SECRET} extra", "expected one token with no spaces or line breaks"),
        (f"{SECRET}\N{SNOWMAN}", "the token must be printable ASCII"),
    ],
)
def test_a_bad_token_file_is_explained_without_the_token(
    tmp_path: Path, content: str | None, message: str
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    settings = EdgeSettings(device_id="d", hub_url="ws://h", token_file=token_file)
    with pytest.raises(ConfigError) as caught:
        settings.read_token()
    assert message in str(caught.value)
    assert "token_file" in str(caught.value)
    assert str(token_file) in str(caught.value)
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)
    assert caught.value.__cause__ is None


def test_a_directory_is_not_a_token_file(tmp_path: Path) -> None:
    settings = EdgeSettings(device_id="d", hub_url="ws://h", token_file=tmp_path)
    with pytest.raises(ConfigError, match="is a directory"):
        settings.read_token()


# --- the class on its own ------------------------------------------------------------------


def test_direct_construction_validates_fields() -> None:
    with pytest.raises(ConfigError, match=r"^device_id: "):
        EdgeSettings(device_id="", hub_url="ws://h", token_file=Path("t"))
    with pytest.raises(ConfigError, match=r"^hub_url: expected ws:// or wss://"):
        EdgeSettings(device_id="d", hub_url="tcp://h", token_file=Path("t"))
    with pytest.raises(ConfigError, match=r"^batch_interval_s: "):
        EdgeSettings(device_id="d", hub_url="ws://h", token_file=Path("t"), batch_interval_s=0)
    with pytest.raises(ConfigError, match=r"^job_jitters.ota_check: expected 0 to 3600.0"):
        EdgeSettings(
            device_id="d", hub_url="ws://h", token_file=Path("t"), job_jitters={"ota_check": 1e9}
        )
    with pytest.raises(ConfigError, match=r"^commands: expected a name matching"):
        EdgeSettings(
            device_id="d", hub_url="ws://h", token_file=Path("t"), allowed_commands=("Ping",)
        )


def test_settings_are_frozen() -> None:
    settings = load_settings(None, REQUIRED_ENV)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.device_id = "other"  # type: ignore[misc]


def test_error_messages_are_one_line_naming_a_key(tmp_path: Path) -> None:
    """The shape the agent prints at start: `<file>: <key>: <reason>`."""
    with pytest.raises(ConfigError) as caught:
        load_toml(tmp_path, BASE + '[sensors]\nintervals = { system = "fast" }\n')
    assert re.fullmatch(r".+edge\.toml: \[sensors\]\.intervals\.system: .+", str(caught.value))
