"""Unit tests of the hub's pure pieces: settings, fan-out queue policy, alerts, auth."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import orjson
import pytest

from ems.hub import auth
from ems.hub.alerts import DEFAULT_RULES, AlertEvaluator, RuleError, parse_rules
from ems.hub.fanout import OTHER, TELEMETRY, DashboardQueue, FanOut, Subscriber
from ems.hub.settings import HubSettings, SettingsError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


# --- settings ------------------------------------------------------------------------------


def test_defaults_need_no_environment() -> None:
    settings = HubSettings.from_env({})
    assert settings.data_dir == Path("./data")
    assert settings.database_url is None
    assert settings.heartbeat_s == 20.0
    assert settings.max_frame_bytes == 1_048_576


def test_environment_overrides() -> None:
    settings = HubSettings.from_env(
        {
            "EMS_HEARTBEAT_S": "0.5",
            "EMS_DATABASE_URL": "postgresql://u@h/db",
            "EMS_STRICT_METRICS": "true",
            "EMS_DATA_DIR": "/tmp/x",
        }
    )
    assert settings.heartbeat_s == 0.5
    assert settings.database_url == "postgresql://u@h/db"
    assert settings.strict_metrics is True
    assert settings.data_dir == Path("/tmp/x")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EMS_HEARTBEAT_S", "soon"),
        ("EMS_HEARTBEAT_S", "-1"),
        ("EMS_HEARTBEAT_S", "nan"),
        ("EMS_MAX_FRAME_BYTES", "1.5"),
        ("EMS_DATABASE_URL", "mysql://x"),
        ("EMS_STRICT_METRICS", "maybe"),
        ("EMS_DASHBOARD_FLUSH_MS", "50"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        HubSettings.from_env({name: value})


def _documented(header: str) -> set[str]:
    text = DOCS.read_text().split(f"\n{header}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(EMS_[A-Z0-9_]+)`", text, flags=re.MULTILINE))


def test_every_hub_setting_is_documented_and_every_documented_one_exists() -> None:
    documented = _documented("## Hub settings")
    fields = {"EMS_" + f.name.upper() for f in attrs.fields(HubSettings)}
    assert fields == documented


def test_every_agent_setting_is_documented_and_every_documented_one_exists() -> None:
    from ems.edge.config import ENV_VARS

    assert set(ENV_VARS) == _documented("### Agent settings")


# --- fan-out ---------------------------------------------------------------------------------


def test_queue_drops_oldest_telemetry_first_and_reports_lagged() -> None:
    queue = DashboardQueue(capacity=3)
    queue.put(TELEMETRY, b'{"n":1}')
    queue.put(OTHER, b'{"status":1}')
    queue.put(TELEMETRY, b'{"n":2}')
    queue.put(TELEMETRY, b'{"n":3}')  # over capacity: n=1 goes, the status stays
    frame = orjson.loads(queue.take_frame())
    assert frame["type"] == "batch"
    assert frame["messages"] == [
        {"type": "lagged", "dropped": 1},
        {"status": 1},
        {"n": 2},
        {"n": 3},
    ]
    assert queue.take_frame() is None
    assert queue.dropped_total == 1


def test_queue_drops_must_keep_updates_only_when_nothing_else_is_left() -> None:
    queue = DashboardQueue(capacity=1)
    queue.put(OTHER, b'{"a":1}')
    queue.put(OTHER, b'{"a":2}')
    assert orjson.loads(queue.take_frame())["messages"] == [
        {"type": "lagged", "dropped": 1},
        {"a": 2},
    ]


def test_single_update_is_sent_unbatched() -> None:
    queue = DashboardQueue(capacity=10)
    queue.put(TELEMETRY, b'{"type":"telemetry_update"}')
    assert queue.take_frame() == '{"type":"telemetry_update"}'


def test_targets_respect_wildcards_and_ownership() -> None:
    fanout = FanOut()
    admin = Subscriber(username="admin", is_admin=True, queue=DashboardQueue(10))
    alice = Subscriber(username="alice", is_admin=False, queue=DashboardQueue(10))
    bob = Subscriber(username="bob", is_admin=False, queue=DashboardQueue(10))
    for s in (admin, alice, bob):
        fanout.add(s)
    fanout.subscribe(admin, ["*"])
    fanout.subscribe(alice, ["*"])
    fanout.subscribe(bob, ["d2"])
    assert fanout.targets("d1", "alice") == {admin, alice}
    assert fanout.targets("d2", "carol") == {admin, bob}
    fanout.remove(admin)
    fanout.unsubscribe(bob, ["d2"])
    assert not fanout.targets("d2", "carol")


# --- alerts ----------------------------------------------------------------------------------


def test_alert_fires_when_rule_starts_to_hold_only() -> None:
    evaluator = AlertEvaluator()
    evaluator.set_rules(DEFAULT_RULES)
    assert evaluator.evaluate("d", {"batteryVoltage": 12.5}) is None
    fired = evaluator.evaluate("d", {"batteryVoltage": 11.0})
    assert fired is not None
    assert [f.rule.code for f in fired] == ["LOW_BATTERY"]
    assert evaluator.evaluate("d", {"batteryVoltage": 10.0}) is None  # still holding
    assert evaluator.evaluate("d", {"voltage": 1}) is None  # other metrics: no change
    assert evaluator.evaluate("d", {"batteryVoltage": 13.0}) is None
    assert evaluator.evaluate("d", {"batteryVoltage": 11.0}) is not None  # holds again
    assert evaluator.evaluate("other", {"crashDetection": 1})[0].rule.code == "CRASH_DETECTED"


@pytest.mark.parametrize(
    ("document", "where"),
    [
        ({"rules": "x"}, "rules"),
        ([{"code": "A"}], "rules[0].metric"),
        (
            [
                {
                    "code": "A",
                    "metric": "x",
                    "op": "~",
                    "threshold": 1,
                    "level": "info",
                    "message": "m",
                }
            ],
            "rules[0].op",
        ),
        (
            [
                {
                    "code": "A",
                    "metric": "x",
                    "op": "<",
                    "threshold": "1",
                    "level": "info",
                    "message": "m",
                }
            ],
            "rules[0].threshold",
        ),
        (
            [
                {
                    "code": "A",
                    "metric": "x",
                    "op": "<",
                    "threshold": 1,
                    "level": "loud",
                    "message": "m",
                }
            ],
            "rules[0].level",
        ),
    ],
)
def test_rule_documents_are_validated(document: object, where: str) -> None:
    with pytest.raises(RuleError, match=re.escape(where)):
        parse_rules(document)


# --- auth ------------------------------------------------------------------------------------


def test_tokens_and_passwords() -> None:
    token = auth.new_device_token()
    assert auth.token_matches(token, auth.token_hash(token))
    assert not auth.token_matches(token + "x", auth.token_hash(token))
    stored = auth.hash_password("correct horse")
    assert auth.verify_password("correct horse", stored)
    assert not auth.verify_password("wrong", stored)
    assert not auth.verify_password("x", "garbage")


def test_login_limiter_blocks_the_eleventh_until_the_minute_has_passed() -> None:
    limiter = auth.LoginLimiter(limit=10, window_s=60)
    for i in range(10):
        assert not limiter.blocked("admin", "1.2.3.4", float(i))
        limiter.failed("admin", "1.2.3.4", float(i))
    assert limiter.blocked("admin", "9.9.9.9", 30.0)  # same user, other address
    assert limiter.blocked("eve", "1.2.3.4", 30.0)  # same address, other user
    assert not limiter.blocked("eve", "9.9.9.9", 30.0)
    assert not limiter.blocked("admin", "1.2.3.4", 60.5)  # the first failure left the window
