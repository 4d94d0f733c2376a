"""The codec against the wire contract (protocol.md §1, §2): valid frames, envelope faults,
sample faults, forward compatibility, round trips, and the protocol package's purity."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ems.protocol
from ems.protocol import messages as m
from ems.protocol.codec import (
    Codec,
    MetricKind,
    SampleRules,
    decode_dashboard_message,
    decode_dashboard_update,
    decode_device_message,
    decode_hub_message,
    encode,
    to_dict,
)
from ems.protocol.errors import ErrorCode, ProtocolError
from tests import strategies as s

Decoder = Callable[[str | bytes], Any]

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rejected(decode: Decoder, text: str | bytes) -> ProtocolError:
    """The ProtocolError `decode` raises for `text`; always INVALID_MESSAGE_FORMAT here."""
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert info.value.code is ErrorCode.INVALID_MESSAGE_FORMAT
    return info.value


# =============================================================================================
# Valid examples, written as literal frames from the contract, decoded field by field


class TestDeviceToHub:
    def test_hello(self) -> None:
        msg = decode_device_message(
            '{"type":"hello","stream":"9f2c0d6e","agent":"ems-edge/1.0.0","firmware":"1.4.2",'
            ' "config_version":3,"capabilities":["command","config","software_update",'
            '"history_request","ssh_access"]}'
        )
        assert isinstance(msg, m.Hello)
        assert msg.stream == "9f2c0d6e"
        assert msg.agent == "ems-edge/1.0.0"
        assert msg.firmware == "1.4.2"
        assert msg.config_version == 3
        assert msg.capabilities == (
            "command",
            "config",
            "software_update",
            "history_request",
            "ssh_access",
        )

    def test_hello_minimal(self) -> None:
        msg = decode_device_message('{"type":"hello","stream":"s1"}')
        assert msg == m.Hello(stream="s1")
        assert (msg.agent, msg.firmware, msg.config_version, msg.capabilities) == (
            None,
            None,
            0,
            (),
        )

    def test_telemetry(self) -> None:
        msg = decode_device_message(
            '{"type":"telemetry","seq":57,"samples":[{"ts":1763800000123,'
            '"data":{"voltage":230.1,"current":4.2,"soc":87}}]}'
        )
        assert isinstance(msg, m.Telemetry)
        assert msg.seq == 57
        assert msg.samples == (
            m.Sample(ts=1763800000123, data={"voltage": 230.1, "current": 4.2, "soc": 87}),
        )
        assert msg.rejected == ()

    def test_telemetry_with_every_value_shape(self) -> None:
        msg = decode_device_message(
            '{"type":"telemetry","seq":58,"samples":[{"ts":1763800000123.5,"data":{'
            '"position":{"latitude":40.71,"longitude":-74.0},"engineRpm":900,'
            '"door.open":true,"mode":"eco","gps":{"fix":true,"sats":7,"src":"gnss"}}},'
            '{"ts":1763800001123,"data":{}}]}'
        )
        assert isinstance(msg, m.Telemetry)
        assert msg.rejected == ()
        first, second = msg.samples
        assert first.ts == 1763800000123.5
        assert first.data == {
            "position": {"latitude": 40.71, "longitude": -74.0},
            "engineRpm": 900,
            "door.open": True,
            "mode": "eco",
            "gps": {"fix": True, "sats": 7, "src": "gnss"},
        }
        assert second == m.Sample(ts=1763800001123, data={})

    def test_event(self) -> None:
        msg = decode_device_message(
            '{"type":"event","seq":58,"ts":1763800000200,"level":"warning","code":"DOOR_OPEN",'
            '"message":"door opened","data":{"door":2}}'
        )
        assert msg == m.Event(
            seq=58,
            ts=1763800000200,
            level=m.Level.WARNING,
            code="DOOR_OPEN",
            message="door opened",
            data={"door": 2},
        )
        assert msg.level is m.Level.WARNING

    def test_event_without_data(self) -> None:
        msg = decode_device_message(
            '{"type":"event","seq":1,"ts":5,"level":"critical","code":"C","message":""}'
        )
        assert isinstance(msg, m.Event)
        assert msg.level is m.Level.CRITICAL
        assert msg.data is None

    def test_command_result(self) -> None:
        msg = decode_device_message(
            '{"type":"command_result","seq":59,"id":"cmd-1","status":"running","progress":40}'
        )
        assert isinstance(msg, m.CommandResult)
        assert msg.seq == 59
        assert msg.id == "cmd-1"
        assert msg.status is m.CommandState.RUNNING
        assert msg.progress == 40
        assert msg.result is None
        assert msg.error is None

    def test_command_result_final(self) -> None:
        msg = decode_device_message(
            '{"type":"command_result","seq":60,"id":"cmd-1","status":"failed",'
            '"result":{"exit":3},"error":"disk full"}'
        )
        assert msg == m.CommandResult(
            seq=60,
            id="cmd-1",
            status=m.CommandState.FAILED,
            result={"exit": 3},
            error="disk full",
        )
        assert msg.status.is_final

    def test_config_applied(self) -> None:
        msg = decode_device_message(
            '{"type":"config_applied","seq":61,"version":4,"status":"rejected",'
            '"error":"interval_s: expected a number"}'
        )
        assert isinstance(msg, m.ConfigApplied)
        assert msg.seq == 61
        assert msg.version == 4
        assert msg.status is m.ConfigOutcome.REJECTED
        assert msg.error == "interval_s: expected a number"

    def test_history(self) -> None:
        msg = decode_device_message(
            '{"type":"history","seq":62,"request_id":"hr-7","samples":['
            '{"ts":1763700000000,"data":{"voltage":229.8}}],"final":true}'
        )
        assert isinstance(msg, m.History)
        assert msg.seq == 62
        assert msg.request_id == "hr-7"
        assert msg.samples == (m.Sample(ts=1763700000000, data={"voltage": 229.8}),)
        assert msg.final is True
        assert msg.rejected == ()

    def test_scheduled_history_with_no_samples(self) -> None:
        msg = decode_device_message(
            '{"type":"history","seq":63,"request_id":null,"samples":[],"final":false}'
        )
        assert msg == m.History(seq=63, request_id=None, samples=(), final=False)

    def test_heartbeat(self) -> None:
        msg = decode_device_message(
            '{"type":"heartbeat","ts":1763800000000,"status":{"uptime_s":3600,"outbox_depth":0}}'
        )
        assert msg == m.Heartbeat(ts=1763800000000, status={"uptime_s": 3600, "outbox_depth": 0})

    def test_bytes_frames_decode_too(self) -> None:
        msg = decode_device_message(b'{"type":"heartbeat","ts":1}')
        assert msg == m.Heartbeat(ts=1)


class TestHubToDevice:
    def test_welcome(self) -> None:
        msg = decode_hub_message(
            '{"type":"welcome","session_id":"sess-1","stream":"9f2c0d6e","acked_seq":41,'
            '"config_version":4,"heartbeat_s":20,"server_time":1763800000000}'
        )
        assert isinstance(msg, m.Welcome)
        assert msg.session_id == "sess-1"
        assert msg.stream == "9f2c0d6e"
        assert msg.acked_seq == 41
        assert msg.config_version == 4
        assert msg.heartbeat_s == 20
        assert msg.server_time == 1763800000000

    def test_welcome_float_heartbeat(self) -> None:
        msg = decode_hub_message(
            '{"type":"welcome","session_id":"s","stream":"x","acked_seq":0,'
            '"config_version":0,"heartbeat_s":0.5,"server_time":1763800000000.25}'
        )
        assert isinstance(msg, m.Welcome)
        assert msg.heartbeat_s == 0.5
        assert msg.server_time == 1763800000000.25

    def test_ack(self) -> None:
        assert decode_hub_message('{"type":"ack","seq":57}') == m.Ack(seq=57)

    def test_error(self) -> None:
        msg = decode_hub_message(
            '{"type":"error","code":"TELEMETRY_VALIDATION_FAILED","message":"1 sample rejected",'
            '"seq":57,"details":["samples[0].data.voltage: expected a number, got a string"]}'
        )
        assert isinstance(msg, m.Error)
        assert msg.code == ErrorCode.TELEMETRY_VALIDATION_FAILED
        assert msg.message == "1 sample rejected"
        assert msg.seq == 57
        assert msg.id is None
        assert msg.details == ("samples[0].data.voltage: expected a number, got a string",)

    def test_command(self) -> None:
        msg = decode_hub_message(
            '{"type":"command","id":"cmd-1","name":"reboot","params":{"delay_s":5},'
            '"expires_at":1763886400000}'
        )
        assert msg == m.Command(
            id="cmd-1", name="reboot", params={"delay_s": 5}, expires_at=1763886400000
        )

    def test_config(self) -> None:
        msg = decode_hub_message(
            '{"type":"config","version":4,"config":{"interval_s":1,"sensors":["system"]}}'
        )
        assert msg == m.Config(version=4, config={"interval_s": 1, "sensors": ["system"]})

    def test_software_update(self) -> None:
        sha = "ab" * 32
        msg = decode_hub_message(
            '{"type":"software_update","id":"cmd-2","version":"1.5.0",'
            f'"url":"/api/artifacts/{sha}","sha256":"{sha}","size":1048576,"signature":"c2ln"}}'
        )
        assert isinstance(msg, m.SoftwareUpdate)
        assert msg.id == "cmd-2"
        assert msg.version == "1.5.0"
        assert msg.url == f"/api/artifacts/{sha}"
        assert msg.sha256 == sha
        assert msg.size == 1048576
        assert msg.signature == "c2ln"

    def test_history_request(self) -> None:
        msg = decode_hub_message(
            '{"type":"history_request","id":"hr-7","from":1763700000000,"to":1763800000000,'
            '"metrics":["voltage","soc"]}'
        )
        assert isinstance(msg, m.HistoryRequest)
        assert msg.id == "hr-7"
        assert msg.from_ == 1763700000000
        assert msg.to == 1763800000000
        assert msg.metrics == ("voltage", "soc")

    def test_ssh_access(self) -> None:
        msg = decode_hub_message(
            '{"type":"ssh_access","id":"cmd-3","duration_s":600,'
            '"public_key":"ssh-ed25519 AAAA op@example","user":"ems"}'
        )
        assert msg == m.SshAccess(
            id="cmd-3", duration_s=600, public_key="ssh-ed25519 AAAA op@example", user="ems"
        )

    def test_heartbeat(self) -> None:
        assert decode_hub_message('{"type":"heartbeat","ts":1763800000000}') == m.Heartbeat(
            ts=1763800000000
        )

    def test_goaway(self) -> None:
        msg = decode_hub_message('{"type":"goaway","retry_after_ms":1000,"spread_ms":5000}')
        assert msg == m.GoAway(retry_after_ms=1000, spread_ms=5000)


class TestDashboardLink:
    def test_subscribe(self) -> None:
        msg = decode_dashboard_message('{"type":"subscribe","devices":["ems_001","ems_002"]}')
        assert msg == m.Subscribe(devices=("ems_001", "ems_002"))

    def test_subscribe_all(self) -> None:
        msg = decode_dashboard_message('{"type":"subscribe","devices":["*"]}')
        assert msg == m.Subscribe(devices=("*",))

    def test_unsubscribe(self) -> None:
        msg = decode_dashboard_message('{"type":"unsubscribe","devices":["ems_001"]}')
        assert msg == m.Unsubscribe(devices=("ems_001",))

    def test_subscribed(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"subscribed","devices":["ems_001"],'
            '"snapshot":[{"device_id":"ems_001","online":true,"last_seen":1763800000123,'
            '"latest":{"ts":1763800000123,"data":{"voltage":230.1}}}]}'
        )
        assert isinstance(msg, m.Subscribed)
        assert msg.devices == ("ems_001",)
        (snap,) = msg.snapshot
        assert snap.device_id == "ems_001"
        assert snap.online is True
        assert snap.last_seen == 1763800000123
        assert snap.latest == m.LatestSample(ts=1763800000123, data={"voltage": 230.1})

    def test_subscribed_device_never_seen(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"subscribed","devices":["ems_009"],'
            '"snapshot":[{"device_id":"ems_009","online":false,"last_seen":null,"latest":null}]}'
        )
        assert msg == m.Subscribed(
            devices=("ems_009",), snapshot=(m.DeviceSnapshot(device_id="ems_009", online=False),)
        )

    def test_unsubscribed(self) -> None:
        msg = decode_dashboard_update('{"type":"unsubscribed","devices":["ems_001"]}')
        assert msg == m.Unsubscribed(devices=("ems_001",))

    def test_telemetry_update(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"telemetry_update","device_id":"ems_001","seq":57,"ts":1763800000123,'
            '"data":{"voltage":230.1}}'
        )
        assert msg == m.TelemetryUpdate(
            device_id="ems_001", seq=57, ts=1763800000123, data={"voltage": 230.1}
        )

    def test_alert(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"alert","device_id":"ems_001","ts":1763800000123,"alert":{"level":"warning",'
            '"code":"LOW_BATTERY","message":"battery below 12 V"},"data":{"batteryVoltage":11.8}}'
        )
        assert isinstance(msg, m.Alert)
        assert msg.device_id == "ems_001"
        assert msg.ts == 1763800000123
        assert msg.alert == m.AlertInfo(
            level=m.Level.WARNING, code="LOW_BATTERY", message="battery below 12 V"
        )
        assert msg.data == {"batteryVoltage": 11.8}

    def test_device_status(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"device_status","device_id":"ems_001","online":false,"ts":1763800000123}'
        )
        assert msg == m.DeviceStatus(device_id="ems_001", online=False, ts=1763800000123)

    def test_event(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"event","device_id":"ems_001","ts":1763800000200,"level":"info",'
            '"code":"BOOT","message":"agent started"}'
        )
        assert msg == m.DeviceEvent(
            device_id="ems_001",
            ts=1763800000200,
            level=m.Level.INFO,
            code="BOOT",
            message="agent started",
        )

    def test_command_status(self) -> None:
        command = {
            "id": "cmd-1",
            "device_id": "ems_001",
            "name": "reboot",
            "params": {},
            "status": "succeeded",
            "progress": 100,
            "result": {"ok": True},
            "error": None,
            "created_at": 1763800000000,
            "updated_at": 1763800005000,
        }
        msg = decode_dashboard_update(
            '{"type":"command_status","command":{"id":"cmd-1","device_id":"ems_001",'
            '"name":"reboot","params":{},"status":"succeeded","progress":100,'
            '"result":{"ok":true},"error":null,"created_at":1763800000000,'
            '"updated_at":1763800005000}}'
        )
        assert msg == m.CommandStatus(command=command)

    def test_config_status(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"config_status","device_id":"ems_001","desired_version":4,'
            '"reported_version":3,"status":"applied"}'
        )
        assert msg == m.ConfigStatus(
            device_id="ems_001", desired_version=4, reported_version=3, status="applied"
        )

    def test_config_status_nothing_reported(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"config_status","device_id":"ems_001","desired_version":1,'
            '"reported_version":null,"status":null}'
        )
        assert msg == m.ConfigStatus(
            device_id="ems_001", desired_version=1, reported_version=None, status=None
        )

    def test_notification(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"notification","event":"maintenance","data":{"at":"22:00"}}'
        )
        assert msg == m.Notification(event="maintenance", data={"at": "22:00"})

    def test_lagged(self) -> None:
        assert decode_dashboard_update('{"type":"lagged","dropped":12}') == m.Lagged(dropped=12)

    def test_error(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"error","code":"SUBSCRIPTION_FAILED","message":"refused: ems_404"}'
        )
        assert msg == m.Error(code="SUBSCRIPTION_FAILED", message="refused: ems_404")

    def test_batch(self) -> None:
        msg = decode_dashboard_update(
            '{"type":"batch","messages":['
            '{"type":"telemetry_update","device_id":"ems_001","seq":57,"ts":1,"data":{"soc":80}},'
            '{"type":"device_status","device_id":"ems_001","online":false,"ts":2},'
            '{"type":"lagged","dropped":3}]}'
        )
        assert msg == m.Batch(
            messages=(
                m.TelemetryUpdate(device_id="ems_001", seq=57, ts=1, data={"soc": 80}),
                m.DeviceStatus(device_id="ems_001", online=False, ts=2),
                m.Lagged(dropped=3),
            )
        )

    def test_empty_batch(self) -> None:
        assert decode_dashboard_update('{"type":"batch","messages":[]}') == m.Batch(messages=())


# =============================================================================================
# Invalid examples per type: missing required field, wrong type


# (decoder, frame, text the message must contain, readable seq, readable id)
INVALID_FIELDS: list[tuple[Decoder, str, str, int | None, str | None]] = [
    # device to hub
    (decode_device_message, '{"type":"hello"}', "stream", None, None),
    (decode_device_message, '{"type":"hello","stream":7}', "stream", None, None),
    (decode_device_message, '{"type":"hello","stream":"s","config_version":"3"}',
     "config_version", None, None),
    (decode_device_message, '{"type":"hello","stream":"s","capabilities":"command"}',
     "capabilities", None, None),
    (decode_device_message, '{"type":"hello","stream":"s","capabilities":["command",1]}',
     "capabilities[1]", None, None),
    (decode_device_message, '{"type":"telemetry","seq":3}', "samples", 3, None),
    (decode_device_message, '{"type":"telemetry","seq":3,"samples":{"ts":1,"data":{}}}',
     "samples", 3, None),
    (decode_device_message, '{"type":"event","seq":4,"ts":1,"level":"info","code":"C"}',
     "message", 4, None),
    (decode_device_message, '{"type":"event","seq":4,"level":"info","code":"C","message":"m"}',
     "ts", 4, None),
    (decode_device_message,
     '{"type":"event","seq":4,"ts":"now","level":"info","code":"C","message":"m"}',
     "ts", 4, None),
    (decode_device_message,
     '{"type":"event","seq":4,"ts":true,"level":"info","code":"C","message":"m"}',
     "ts", 4, None),
    (decode_device_message,
     '{"type":"event","seq":4,"ts":1,"level":"fatal","code":"C","message":"m"}',
     "level", 4, None),
    (decode_device_message,
     '{"type":"event","seq":4,"ts":1,"level":"info","code":"C","message":"m","data":[1]}',
     "data", 4, None),
    (decode_device_message, '{"type":"command_result","seq":5,"id":"c-1"}', "status", 5, "c-1"),
    (decode_device_message, '{"type":"command_result","seq":5,"status":"received"}',
     "id", 5, None),
    (decode_device_message, '{"type":"command_result","seq":5,"id":"c-1","status":"done"}',
     "status", 5, "c-1"),
    (decode_device_message,
     '{"type":"command_result","seq":5,"id":"c-1","status":"running","progress":"50%"}',
     "progress", 5, "c-1"),
    (decode_device_message,
     '{"type":"command_result","seq":5,"id":"c-1","status":"running","progress":101}',
     "100", 5, "c-1"),
    (decode_device_message,
     '{"type":"command_result","seq":5,"id":"c-1","status":"succeeded","result":"ok"}',
     "result", 5, "c-1"),
    (decode_device_message, '{"type":"command_result","seq":5,"id":7,"status":"received"}',
     "id", 5, None),
    (decode_device_message, '{"type":"config_applied","seq":6,"status":"applied"}',
     "version", 6, None),
    (decode_device_message, '{"type":"config_applied","seq":6,"version":"4","status":"applied"}',
     "version", 6, None),
    (decode_device_message, '{"type":"config_applied","seq":6,"version":4,"status":"ok"}',
     "status", 6, None),
    (decode_device_message, '{"type":"history","seq":7,"request_id":null,"samples":[]}',
     "final", 7, None),
    (decode_device_message,
     '{"type":"history","seq":7,"request_id":null,"samples":[],"final":"yes"}',
     "final", 7, None),
    (decode_device_message, '{"type":"history","seq":7,"samples":[],"final":true}',
     "request_id", 7, None),
    (decode_device_message, '{"type":"history","seq":7,"request_id":9,"samples":[],"final":true}',
     "request_id", 7, None),
    (decode_device_message, '{"type":"history","seq":7,"request_id":null,"final":true}',
     "samples", 7, None),
    (decode_device_message, '{"type":"heartbeat"}', "ts", None, None),
    (decode_device_message, '{"type":"heartbeat","ts":"1"}', "ts", None, None),
    (decode_device_message, '{"type":"heartbeat","ts":1,"status":"ok"}', "status", None, None),
    # hub to device
    (decode_hub_message,
     '{"type":"welcome","stream":"s","acked_seq":0,"config_version":0,"heartbeat_s":20,'
     '"server_time":1}', "session_id", None, None),
    (decode_hub_message,
     '{"type":"welcome","session_id":"x","stream":"s","acked_seq":"0","config_version":0,'
     '"heartbeat_s":20,"server_time":1}', "acked_seq", None, None),
    (decode_hub_message,
     '{"type":"welcome","session_id":"x","stream":"s","acked_seq":0,"config_version":0,'
     '"heartbeat_s":"20","server_time":1}', "heartbeat_s", None, None),
    (decode_hub_message, '{"type":"ack"}', "seq", None, None),
    (decode_hub_message, '{"type":"ack","seq":"57"}', "seq", None, None),
    (decode_hub_message, '{"type":"ack","seq":57.0}', "seq", None, None),
    (decode_hub_message, '{"type":"error","message":"m","seq":3}', "code", 3, None),
    (decode_hub_message, '{"type":"error","code":5,"message":"m","id":"c-9"}', "code", None,
     "c-9"),
    (decode_hub_message, '{"type":"command","id":"c-1","params":{}}', "name", None, "c-1"),
    (decode_hub_message, '{"type":"command","id":"c-1","name":"reboot","params":[]}',
     "params", None, "c-1"),
    (decode_hub_message,
     '{"type":"command","id":"c-1","name":"reboot","params":{},"expires_at":"soon"}',
     "expires_at", None, "c-1"),
    (decode_hub_message, '{"type":"config","config":{}}', "version", None, None),
    (decode_hub_message, '{"type":"config","version":2,"config":"x=1"}', "config", None, None),
    (decode_hub_message,
     '{"type":"software_update","id":"c-2","version":"1","url":"/a","size":1}',
     "sha256", None, "c-2"),
    (decode_hub_message,
     '{"type":"software_update","id":"c-2","version":"1","url":"/a","sha256":"ab","size":"1"}',
     "size", None, "c-2"),
    (decode_hub_message, '{"type":"history_request","id":"h-1","from":1}', "to", None, "h-1"),
    (decode_hub_message, '{"type":"history_request","id":"h-1","from":"a","to":2}',
     "from", None, "h-1"),
    (decode_hub_message,
     '{"type":"history_request","id":"h-1","from":1,"to":2,"metrics":"voltage"}',
     "metrics", None, "h-1"),
    (decode_hub_message, '{"type":"ssh_access","id":"c-3","duration_s":60}', "public_key",
     None, "c-3"),
    (decode_hub_message, '{"type":"ssh_access","id":"c-3","duration_s":"60","public_key":"k"}',
     "duration_s", None, "c-3"),
    (decode_hub_message, '{"type":"heartbeat","ts":null}', "ts", None, None),
    (decode_hub_message, '{"type":"goaway","retry_after_ms":1000}', "spread_ms", None, None),
    (decode_hub_message, '{"type":"goaway","retry_after_ms":1.5,"spread_ms":10}',
     "retry_after_ms", None, None),
    # dashboard to hub
    (decode_dashboard_message, '{"type":"subscribe"}', "devices", None, None),
    (decode_dashboard_message, '{"type":"subscribe","devices":"*"}', "devices", None, None),
    (decode_dashboard_message, '{"type":"subscribe","devices":["a",2]}', "devices[1]", None,
     None),
    (decode_dashboard_message, '{"type":"unsubscribe"}', "devices", None, None),
    (decode_dashboard_message, '{"type":"unsubscribe","devices":{"a":1}}', "devices", None,
     None),
    # hub to dashboard
    (decode_dashboard_update, '{"type":"subscribed","snapshot":[]}', "devices", None, None),
    (decode_dashboard_update,
     '{"type":"subscribed","devices":["a"],"snapshot":[{"device_id":"a"}]}',
     "snapshot[0].online", None, None),
    (decode_dashboard_update,
     '{"type":"subscribed","devices":["a"],"snapshot":[{"device_id":"a","online":"yes"}]}',
     "snapshot[0].online", None, None),
    (decode_dashboard_update, '{"type":"unsubscribed","devices":[1]}', "devices[0]", None, None),
    (decode_dashboard_update,
     '{"type":"telemetry_update","device_id":"a","ts":1,"data":{}}', "seq", None, None),
    (decode_dashboard_update,
     '{"type":"telemetry_update","device_id":"a","seq":4,"ts":1,"data":[]}', "data", 4, None),
    (decode_dashboard_update, '{"type":"alert","device_id":"a","ts":1,"data":{}}', "alert",
     None, None),
    (decode_dashboard_update,
     '{"type":"alert","device_id":"a","ts":1,"alert":{"level":"loud","code":"c","message":"m"}}',
     "alert.level", None, None),
    (decode_dashboard_update, '{"type":"device_status","device_id":"a","ts":1}', "online",
     None, None),
    (decode_dashboard_update, '{"type":"device_status","device_id":"a","online":1,"ts":1}',
     "online", None, None),
    (decode_dashboard_update,
     '{"type":"event","device_id":"a","ts":1,"level":"info","code":"c"}', "message", None, None),
    (decode_dashboard_update, '{"type":"command_status"}', "command", None, None),
    (decode_dashboard_update, '{"type":"command_status","command":"c-1"}', "command", None,
     None),
    (decode_dashboard_update,
     '{"type":"config_status","device_id":"a","reported_version":1,"status":null}',
     "desired_version", None, None),
    (decode_dashboard_update,
     '{"type":"config_status","device_id":"a","desired_version":true,"reported_version":1,'
     '"status":null}', "desired_version", None, None),
    (decode_dashboard_update, '{"type":"notification","data":{}}', "event", None, None),
    (decode_dashboard_update, '{"type":"notification","event":3}', "event", None, None),
    (decode_dashboard_update, '{"type":"lagged"}', "dropped", None, None),
    (decode_dashboard_update, '{"type":"lagged","dropped":"12"}', "dropped", None, None),
    (decode_dashboard_update, '{"type":"error","code":"X"}', "message", None, None),
    (decode_dashboard_update, '{"type":"batch"}', "messages", None, None),
    (decode_dashboard_update, '{"type":"batch","messages":{}}', "messages", None, None),
    (decode_dashboard_update, '{"type":"batch","messages":[{"type":"lagged"}]}', "dropped",
     None, None),
    (decode_dashboard_update, '{"type":"batch","messages":[{"type":"lagged","dropped":1},7]}',
     "messages[1]", None, None),
    (decode_dashboard_update,
     '{"type":"batch","messages":[{"type":"batch","messages":[]}]}', "batch", None, None),
    (decode_dashboard_update, '{"type":"batch","messages":[{"type":"subscribe","devices":[]}]}',
     "subscribe", None, None),
]  # fmt: skip


@pytest.mark.parametrize(("decode", "frame", "names", "seq", "ident"), INVALID_FIELDS)
def test_invalid_field_is_rejected_whole(
    decode: Decoder, frame: str, names: str, seq: int | None, ident: str | None
) -> None:
    exc = rejected(decode, frame)
    assert names in exc.message
    assert exc.seq == seq
    assert exc.id == ident


def test_every_message_type_has_an_invalid_example() -> None:
    tags = {json.loads(frame)["type"] for _, frame, *_ in INVALID_FIELDS}
    assert tags >= {cls.TYPE for cls in s.BY_CLASS}


def test_error_message_starts_with_the_type() -> None:
    exc = rejected(decode_device_message, '{"type":"config_applied","seq":6,"status":"applied"}')
    assert exc.message == "config_applied: version: required field missing"


def test_every_missing_field_is_named() -> None:
    exc = rejected(decode_hub_message, '{"type":"welcome"}')
    for field in ("session_id", "stream", "acked_seq", "config_version", "heartbeat_s"):
        assert field in exc.message


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"heartbeat","ts":NaN}',
        '{"type":"heartbeat","ts":Infinity}',
        '{"type":"heartbeat","ts":-Infinity}',
        '{"type":"event","seq":1,"ts":NaN,"level":"info","code":"c","message":"m"}',
        '{"type":"command_result","seq":1,"id":"c","status":"running","progress":NaN}',
    ],
)
def test_non_finite_envelope_numbers_are_rejected(frame: str) -> None:
    exc = rejected(decode_device_message, frame)
    assert "finite" in exc.message


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"welcome","session_id":"x","stream":"s","acked_seq":0,"config_version":0,'
        '"heartbeat_s":Infinity,"server_time":1}',
        '{"type":"history_request","id":"h","from":NaN,"to":1}',
        '{"type":"ssh_access","id":"c","duration_s":Infinity,"public_key":"k"}',
        '{"type":"command","id":"c","name":"n","params":{},"expires_at":NaN}',
    ],
)
def test_non_finite_hub_numbers_are_rejected(frame: str) -> None:
    exc = rejected(decode_hub_message, frame)
    assert "finite" in exc.message


@pytest.mark.parametrize(
    ("decode", "frame", "field"),
    [
        (decode_device_message, '{"type":"heartbeat","ts":true}', "ts"),
        (decode_hub_message, '{"type":"heartbeat","ts":false}', "ts"),
        (
            decode_hub_message,
            '{"type":"welcome","session_id":"x","stream":"s","acked_seq":0,"config_version":0,'
            '"heartbeat_s":true,"server_time":1}',
            "heartbeat_s",
        ),
        (decode_hub_message, '{"type":"history_request","id":"h","from":1,"to":true}', "to"),
        (decode_hub_message, '{"type":"ssh_access","id":"c","duration_s":true,"public_key":"k"}',
         "duration_s"),
        (decode_dashboard_update,
         '{"type":"device_status","device_id":"a","online":true,"ts":true}', "ts"),
        (decode_dashboard_update,
         '{"type":"telemetry_update","device_id":"a","seq":1,"ts":false,"data":{}}', "ts"),
    ],
)  # fmt: skip
def test_boolean_is_not_a_number(decode: Decoder, frame: str, field: str) -> None:
    exc = rejected(decode, frame)
    assert f"{field}: expected a number, got a boolean" in exc.message


# =============================================================================================
# Envelope rejections (the frame is refused whole)

NOT_JSON = ["", "{", "hello", "{'type':'ack'}", '{"type":"ack",}', '{"type":"ack" "seq":1}']
NOT_OBJECTS = ["[]", '[{"type":"ack","seq":1}]', "5", "1.5", '"ack"', "null", "true"]
ALL_DECODERS = [
    decode_device_message,
    decode_hub_message,
    decode_dashboard_message,
    decode_dashboard_update,
]


@pytest.mark.parametrize("decode", ALL_DECODERS)
@pytest.mark.parametrize("frame", NOT_JSON)
def test_not_json(decode: Decoder, frame: str) -> None:
    exc = rejected(decode, frame)
    assert "JSON" in exc.message
    assert exc.seq is None


@pytest.mark.parametrize("frame", [b"\xff\xfe{}", b'{"type":"ack","seq":1,"x":"\xc3"}'])
def test_not_utf8(frame: bytes) -> None:
    exc = rejected(decode_hub_message, frame)
    assert exc.seq is None


@pytest.mark.parametrize("decode", ALL_DECODERS)
@pytest.mark.parametrize("frame", NOT_OBJECTS)
def test_json_but_not_an_object(decode: Decoder, frame: str) -> None:
    exc = rejected(decode, frame)
    assert "expected a JSON object" in exc.message
    assert exc.seq is None


@pytest.mark.parametrize(
    ("decode", "frame"),
    [
        (decode_device_message, '{"type":"nope","seq":3}'),
        (decode_device_message, '{"type":"welcome","seq":3}'),  # a hub type on the device side
        (decode_device_message, '{"type":"Telemetry","seq":3,"samples":[]}'),
        (decode_hub_message, '{"type":"telemetry","seq":3,"samples":[{"ts":1,"data":{}}]}'),
        (decode_dashboard_message, '{"type":"hello","seq":3,"stream":"s"}'),
        (decode_dashboard_update, '{"type":"subscribe","seq":3,"devices":["*"]}'),
    ],
)
def test_unknown_type(decode: Decoder, frame: str) -> None:
    exc = rejected(decode, frame)
    assert "type" in exc.message
    assert "unknown message type" in exc.message
    assert exc.seq == 3


def test_unknown_type_carries_id() -> None:
    exc = rejected(decode_hub_message, '{"type":"reboot","id":"c-4"}')
    assert exc.id == "c-4"


@pytest.mark.parametrize("decode", ALL_DECODERS)
def test_missing_type(decode: Decoder) -> None:
    exc = rejected(decode, '{"seq":4,"samples":[{"ts":1,"data":{}}]}')
    assert exc.message == "type: required field missing"
    assert exc.seq == 4


@pytest.mark.parametrize("tag", ["5", "null", "true", '["telemetry"]', '{"t":1}'])
def test_type_not_a_string(tag: str) -> None:
    exc = rejected(decode_device_message, f'{{"type":{tag},"seq":4}}')
    assert exc.message.startswith("type: expected a string")
    assert exc.seq == 4


# One valid body per reliable type, without `seq`.
RELIABLE_BODIES = {
    "telemetry": '"samples":[{"ts":1,"data":{"voltage":1}}]',
    "event": '"ts":1,"level":"info","code":"c","message":"m"',
    "command_result": '"id":"c-1","status":"received"',
    "config_applied": '"version":1,"status":"applied"',
    "history": '"request_id":null,"samples":[],"final":true',
}


@pytest.mark.parametrize("tag", sorted(RELIABLE_BODIES))
@pytest.mark.parametrize(
    ("seq_json", "reason"),
    [
        (None, "seq: required field missing"),
        ('"1"', "seq: expected an integer, got a string"),
        ("1.0", "seq: expected an integer"),
        ("1.5", "seq: expected an integer"),
        ("true", "seq: expected an integer, got a boolean"),
        ("null", "seq"),
        ("[1]", "seq: expected an integer, got an array"),
        ("NaN", "seq: expected an integer"),
    ],
)
def test_bad_seq(tag: str, seq_json: str | None, reason: str) -> None:
    seq_part = "" if seq_json is None else f'"seq":{seq_json},'
    frame = f'{{"type":"{tag}",{seq_part}{RELIABLE_BODIES[tag]}}}'
    exc = rejected(decode_device_message, frame)
    assert reason in exc.message
    assert exc.message.startswith(f"{tag}: ")
    assert exc.seq is None


@pytest.mark.parametrize("tag", sorted(RELIABLE_BODIES))
def test_valid_reliable_bodies(tag: str) -> None:
    msg = decode_device_message(f'{{"type":"{tag}","seq":12,{RELIABLE_BODIES[tag]}}}')
    assert tag == msg.TYPE
    assert msg.seq == 12


@pytest.mark.parametrize("tag", ["telemetry", "history"])
@pytest.mark.parametrize(
    ("samples_json", "kind"),
    [
        (None, "null"),
        ("null", "null"),
        ("{}", "an object"),
        ('"[]"', "a string"),
        ("3", "an integer"),
    ],
)
def test_samples_not_a_list(tag: str, samples_json: str | None, kind: str) -> None:
    samples_part = "" if samples_json is None else f',"samples":{samples_json}'
    frame = f'{{"type":"{tag}","seq":8,"request_id":null,"final":true{samples_part}}}'
    exc = rejected(decode_device_message, frame)
    assert f"samples: expected an array, got {kind}" in exc.message
    assert exc.seq == 8


def _samples_frame(tag: str, count: int, seq: int = 9) -> str:
    items = ",".join(f'{{"ts":{i},"data":{{"voltage":{i}}}}}' for i in range(count))
    return f'{{"type":"{tag}","seq":{seq},"request_id":null,"final":true,"samples":[{items}]}}'


def test_zero_samples() -> None:
    exc = rejected(decode_device_message, _samples_frame("telemetry", 0))
    assert "samples: expected 1 to 1000 samples, got 0" in exc.message
    assert exc.seq == 9


@pytest.mark.parametrize("tag", ["telemetry", "history"])
def test_1001_samples(tag: str) -> None:
    exc = rejected(decode_device_message, _samples_frame(tag, 1001))
    assert "1000" in exc.message
    assert "1001" in exc.message
    assert exc.seq == 9


@pytest.mark.parametrize("tag", ["telemetry", "history"])
def test_1000_samples_pass(tag: str) -> None:
    msg = decode_device_message(_samples_frame(tag, 1000))
    assert len(msg.samples) == 1000
    assert msg.samples[999] == m.Sample(ts=999, data={"voltage": 999})
    assert msg.rejected == ()


def test_history_may_be_empty() -> None:
    msg = decode_device_message(_samples_frame("history", 0))
    assert isinstance(msg, m.History)
    assert msg.samples == ()


@pytest.mark.parametrize("tag", ["telemetry", "history"])
@pytest.mark.parametrize(
    ("items", "index", "kind"),
    [
        ("[1]", 0, "an integer"),
        ('[{"ts":1,"data":{}},"x"]', 1, "a string"),
        ('[{"ts":1,"data":{}},{"ts":2,"data":{}},null]', 2, "null"),
        ("[[]]", 0, "an array"),
    ],
)
def test_sample_not_an_object(tag: str, items: str, index: int, kind: str) -> None:
    frame = f'{{"type":"{tag}","seq":10,"request_id":null,"final":true,"samples":{items}}}'
    exc = rejected(decode_device_message, frame)
    assert f"samples[{index}]: expected an object, got {kind}" in exc.message
    assert exc.seq == 10


# =============================================================================================
# Sample rejections (the sample is refused alone; its siblings are kept)

GOOD_BEFORE = '{"ts":100,"data":{"voltage":230.5}}'
GOOD_AFTER = '{"ts":300,"data":{"soc":50,"note":"ok"}}'

TOO_MANY = ",".join(f'"m{i}":{i}' for i in range(257))
JUST_ENOUGH = ",".join(f'"m{i}":{i}' for i in range(256))

# (the bad sample as JSON text, at index 1; the reasons it must produce)
SAMPLE_FAULTS: list[tuple[str, list[str]]] = [
    ('{"data":{"voltage":1}}', ["samples[1].ts: required field missing"]),
    ('{"ts":"1763800000000","data":{}}',
     ["samples[1].ts: expected a finite number, got a string"]),
    ('{"ts":true,"data":{}}', ["samples[1].ts: expected a finite number, got a boolean"]),
    ('{"ts":null,"data":{}}', ["samples[1].ts: expected a finite number, got null"]),
    ('{"ts":NaN,"data":{}}', ["samples[1].ts: expected a finite number, got a non-finite number"]),
    ('{"ts":Infinity,"data":{}}',
     ["samples[1].ts: expected a finite number, got a non-finite number"]),
    ('{"ts":-Infinity,"data":{}}',
     ["samples[1].ts: expected a finite number, got a non-finite number"]),
    ('{"ts":1,"data":{"x":NaN}}', ["samples[1].data.x: expected a finite number, got nan"]),
    ('{"ts":1,"data":{"x":Infinity}}', ["samples[1].data.x: expected a finite number, got inf"]),
    ('{"ts":1,"data":{"x":-Infinity}}',
     ["samples[1].data.x: expected a finite number, got -inf"]),
    ('{"ts":1,"data":{"voltage":NaN}}',
     ["samples[1].data.voltage: expected a finite number, got nan"]),
    ('{"ts":1,"data":{"gps":{"alt":Infinity}}}',
     ["samples[1].data.gps.alt: expected a finite number, got inf"]),
    ('{"ts":1,"data":{"position":{"latitude":NaN,"longitude":1}}}',
     ["samples[1].data.position.latitude: expected a number, got a non-finite number"]),
    ('{"ts":1,"data":{"note":"' + "x" * 257 + '"}}',
     ["samples[1].data.note: string longer than 256 characters"]),
    ('{"ts":1,"data":{"gps":{"label":"' + "y" * 257 + '"}}}',
     ["samples[1].data.gps.label: string longer than 256 characters"]),
    ('{"ts":1,"data":{' + TOO_MANY + "}}", ["samples[1].data: more than 256 metrics (257)"]),
    ('{"ts":1,"data":{"1abc":1}}', ["samples[1].data: metric name '1abc' is not allowed"]),
    ('{"ts":1,"data":{"a-b":1}}', ["samples[1].data: metric name 'a-b' is not allowed"]),
    ('{"ts":1,"data":{"":1}}', ["samples[1].data: metric name '' is not allowed"]),
    ('{"ts":1,"data":{"_x":1}}', ["samples[1].data: metric name '_x' is not allowed"]),
    ('{"ts":1,"data":{"' + "a" * 65 + '":1}}',
     [f"samples[1].data: metric name '{'a' * 65}' is not allowed"]),
    ('{"ts":1,"data":{"gps":{"fix":{"ok":true}}}}',
     ["samples[1].data.gps.fix: nested objects and arrays are not allowed"]),
    ('{"ts":1,"data":{"gps":{"sats":[1,2]}}}',
     ["samples[1].data.gps.sats: nested objects and arrays are not allowed"]),
    ('{"ts":1,"data":{"cells":[3.7,3.8]}}',
     ["samples[1].data.cells: expected a number, a boolean or a string, got an array"]),
    ('{"ts":1,"data":{"x":null}}',
     ["samples[1].data.x: expected a number, a boolean or a string, got null"]),
    ('{"ts":1,"data":{"voltage":"high"}}',
     ["samples[1].data.voltage: expected a number, got a string"]),
    ('{"ts":1,"data":{"soc":true}}', ["samples[1].data.soc: expected a number, got a boolean"]),
    ('{"ts":1,"data":{"dtc":[1]}}', ["samples[1].data.dtc: expected a number, got an array"]),
    ('{"ts":1,"data":{"position":{"latitude":"x","longitude":-74.0}}}',
     ["samples[1].data.position.latitude: expected a number, got a string"]),
    ('{"ts":1,"data":{"position":{"latitude":40.71}}}',
     ["samples[1].data.position.longitude: required field missing"]),
    ('{"ts":1,"data":{"position":"40.71,-74.0"}}',
     ["samples[1].data.position: expected an object of numbers latitude and longitude, "
      "got a string"]),
    ('{"ts":1}', ["samples[1].data: required field missing"]),
    ('{"ts":1,"data":[]}', ["samples[1].data: expected an object, got an array"]),
    # every fault of a sample is listed
    ('{"ts":"x","data":{"voltage":"high","soc":false,"ok":1}}',
     ["samples[1].ts: expected a finite number, got a string",
      "samples[1].data.voltage: expected a number, got a string",
      "samples[1].data.soc: expected a number, got a boolean"]),
]  # fmt: skip


@pytest.mark.parametrize("tag", ["telemetry", "history"])
@pytest.mark.parametrize(("bad", "reasons"), SAMPLE_FAULTS)
def test_sample_fault(tag: str, bad: str, reasons: list[str]) -> None:
    frame = (
        f'{{"type":"{tag}","seq":21,"request_id":"r","final":false,'
        f'"samples":[{GOOD_BEFORE},{bad},{GOOD_AFTER}]}}'
    )
    msg = decode_device_message(frame)
    assert isinstance(msg, m.Telemetry | m.History)
    assert msg.seq == 21
    assert msg.samples == (
        m.Sample(ts=100, data={"voltage": 230.5}),
        m.Sample(ts=300, data={"soc": 50, "note": "ok"}),
    )
    (rejection,) = msg.rejected
    assert rejection.index == 1
    assert list(rejection.reasons) == reasons
    assert rejection.describe() == "; ".join(reasons)


@pytest.mark.parametrize(
    "data",
    [
        JUST_ENOUGH,
        '"note":"' + "x" * 256 + '"',
        '"' + "a" * 64 + '":1',
        '"A.b_9":1',
        '"gps":{"label":"' + "y" * 256 + '","fix":true,"sats":7,"hdop":0.9}',
        '"position":{"latitude":40.71,"longitude":-74}',
        '"voltage":-0.0,"soc":0,"dtc":1e300',
    ],
)
def test_sample_limits_pass(data: str) -> None:
    msg = decode_device_message(
        f'{{"type":"telemetry","seq":1,"samples":[{{"ts":1,"data":{{{data}}}}}]}}'
    )
    assert isinstance(msg, m.Telemetry)
    assert msg.rejected == ()
    assert len(msg.samples) == 1


def test_all_samples_rejected_keeps_the_message() -> None:
    msg = decode_device_message(
        '{"type":"telemetry","seq":5,"samples":[{"ts":NaN,"data":{}},{"data":{}}]}'
    )
    assert isinstance(msg, m.Telemetry)
    assert msg.samples == ()
    assert [r.index for r in msg.rejected] == [0, 1]


def test_acceptance_line() -> None:
    msg = decode_device_message(
        '{"type":"telemetry","seq":1,"samples":[{"ts":1,"data":{"voltage":"high"}},'
        '{"ts":2,"data":{"voltage":230.5}}]}'
    )
    assert isinstance(msg, m.Telemetry)
    assert msg.seq == 1
    assert msg.samples == (m.Sample(ts=2, data={"voltage": 230.5}),)
    (rejection,) = msg.rejected
    assert rejection.index == 0
    assert any("samples[0].data.voltage" in reason for reason in rejection.reasons)

    with pytest.raises(ProtocolError) as info:
        decode_device_message('{"type":"telemetry","seq":1,"samples":[]}')
    assert info.value.code is ErrorCode.INVALID_MESSAGE_FORMAT
    assert info.value.seq == 1


class TestSampleRules:
    FRAME = (
        '{"type":"telemetry","seq":3,"samples":[{"ts":1,"data":{"voltage":230.1}},'
        '{"ts":2,"data":{"voltage":230.2,"cabinTemp":21.5}}]}'
    )

    def test_unknown_metrics_pass_by_default(self) -> None:
        msg = Codec().decode_device_message(self.FRAME)
        assert isinstance(msg, m.Telemetry)
        assert len(msg.samples) == 2
        assert msg.rejected == ()

    def test_unknown_metric_is_a_sample_fault_when_disallowed(self) -> None:
        codec = Codec(SampleRules(allow_unknown_metrics=False))
        msg = codec.decode_device_message(self.FRAME)
        assert isinstance(msg, m.Telemetry)
        assert msg.samples == (m.Sample(ts=1, data={"voltage": 230.1}),)
        (rejection,) = msg.rejected
        assert rejection.index == 1
        assert rejection.reasons == ("samples[1].data.cabinTemp: unknown metric",)

    def test_strict_rules_still_accept_every_typed_metric(self) -> None:
        codec = Codec(SampleRules(allow_unknown_metrics=False))
        frame = (
            '{"type":"history","seq":4,"request_id":null,"final":true,"samples":[{"ts":1,'
            '"data":{"voltage":1,"current":2,"power":3,"energy":4,"temperature":5,"soc":6,'
            '"engineRpm":7,"speed":8,"fuelLevel":9,"batteryVoltage":10,"crashDetection":0,'
            '"dtc":0,"position":{"latitude":1,"longitude":2}}}]}'
        )
        msg = codec.decode_device_message(frame)
        assert isinstance(msg, m.History)
        assert msg.rejected == ()
        assert len(msg.samples[0].data) == 13

    def test_custom_typed_metrics(self) -> None:
        codec = Codec(SampleRules(typed_metrics={"rpm": MetricKind.NUMBER}))
        msg = codec.decode_device_message(
            '{"type":"telemetry","seq":1,"samples":[{"ts":1,"data":{"rpm":"fast"}},'
            '{"ts":2,"data":{"voltage":"high"}}]}'
        )
        assert isinstance(msg, m.Telemetry)
        assert msg.samples == (m.Sample(ts=2, data={"voltage": "high"}),)
        assert msg.rejected[0].reasons == ("samples[0].data.rpm: expected a number, got a string",)


# =============================================================================================
# Forward compatibility: unknown fields are ignored, in every direction

EXTRA = {"x_future": {"nested": [1, 2]}, "zz": None, "type_hint": "ignored"}

# (decoder, a valid frame)
VALID_FRAMES: list[tuple[Decoder, str]] = [
    (decode_device_message, '{"type":"hello","stream":"s","config_version":3}'),
    (decode_device_message, '{"type":"telemetry","seq":1,"samples":[{"ts":1,"data":{"soc":1}}]}'),
    (decode_device_message,
     '{"type":"event","seq":2,"ts":1,"level":"info","code":"c","message":"m"}'),
    (decode_device_message, '{"type":"command_result","seq":3,"id":"c","status":"received"}'),
    (decode_device_message, '{"type":"config_applied","seq":4,"version":2,"status":"applied"}'),
    (decode_device_message,
     '{"type":"history","seq":5,"request_id":"r","samples":[{"ts":1,"data":{}}],"final":true}'),
    (decode_device_message, '{"type":"heartbeat","ts":1,"status":{"uptime_s":1}}'),
    (decode_hub_message,
     '{"type":"welcome","session_id":"x","stream":"s","acked_seq":0,"config_version":0,'
     '"heartbeat_s":20,"server_time":1}'),
    (decode_hub_message, '{"type":"ack","seq":57}'),
    (decode_hub_message, '{"type":"error","code":"INVALID_MESSAGE_FORMAT","message":"m","seq":3}'),
    (decode_hub_message, '{"type":"command","id":"c","name":"reboot","params":{}}'),
    (decode_hub_message, '{"type":"config","version":1,"config":{"a":1}}'),
    (decode_hub_message,
     '{"type":"software_update","id":"c","version":"1","url":"/a","sha256":"ab","size":1}'),
    (decode_hub_message, '{"type":"history_request","id":"h","from":1,"to":2}'),
    (decode_hub_message, '{"type":"ssh_access","id":"c","duration_s":60,"public_key":"k"}'),
    (decode_hub_message, '{"type":"heartbeat","ts":1}'),
    (decode_hub_message, '{"type":"goaway","retry_after_ms":1,"spread_ms":2}'),
    (decode_dashboard_message, '{"type":"subscribe","devices":["*"]}'),
    (decode_dashboard_message, '{"type":"unsubscribe","devices":["a"]}'),
    (decode_dashboard_update,
     '{"type":"subscribed","devices":["a"],'
     '"snapshot":[{"device_id":"a","online":true,"latest":{"ts":1,"data":{}}}]}'),
    (decode_dashboard_update, '{"type":"unsubscribed","devices":["a"]}'),
    (decode_dashboard_update,
     '{"type":"telemetry_update","device_id":"a","seq":1,"ts":1,"data":{}}'),
    (decode_dashboard_update,
     '{"type":"alert","device_id":"a","ts":1,'
     '"alert":{"level":"info","code":"c","message":"m"},"data":{}}'),
    (decode_dashboard_update, '{"type":"device_status","device_id":"a","online":true,"ts":1}'),
    (decode_dashboard_update,
     '{"type":"event","device_id":"a","ts":1,"level":"info","code":"c","message":"m"}'),
    (decode_dashboard_update, '{"type":"command_status","command":{"id":"c"}}'),
    (decode_dashboard_update,
     '{"type":"config_status","device_id":"a","desired_version":1,'
     '"reported_version":null,"status":null}'),
    (decode_dashboard_update, '{"type":"notification","event":"e","data":1}'),
    (decode_dashboard_update, '{"type":"lagged","dropped":1}'),
    (decode_dashboard_update, '{"type":"error","code":"SUBSCRIPTION_FAILED","message":"m"}'),
    (decode_dashboard_update, '{"type":"batch","messages":[{"type":"lagged","dropped":1}]}'),
]  # fmt: skip


def _with_extras(value: Any) -> Any:
    """`value` with EXTRA added to every object in it that is not free-form data."""
    if isinstance(value, dict):
        out = {k: v if k in {"data", "config", "params", "command", "status"} else _with_extras(v)
               for k, v in value.items()}  # fmt: skip
        return {**out, **EXTRA}
    if isinstance(value, list):
        return [_with_extras(item) for item in value]
    return value


def test_valid_frames_cover_every_message_type() -> None:
    tags = {json.loads(frame)["type"] for _, frame in VALID_FRAMES}
    assert tags == {cls.TYPE for cls in s.BY_CLASS}


@pytest.mark.parametrize(("decode", "frame"), VALID_FRAMES)
def test_unknown_fields_are_ignored(decode: Decoder, frame: str) -> None:
    plain = decode(frame)
    extended = json.dumps(_with_extras(json.loads(frame)))
    assert "x_future" in extended
    assert decode(extended) == plain


# =============================================================================================
# Encoding


def test_encode_leaves_out_unset_optionals() -> None:
    # `expires_at`? is optional and unset; `params` is a required field of the contract
    assert json.loads(encode(m.Command(id="c", name="reboot"))) == {
        "type": "command",
        "id": "c",
        "name": "reboot",
        "params": {},
    }
    assert json.loads(encode(m.Heartbeat(ts=5))) == {"type": "heartbeat", "ts": 5}
    assert json.loads(encode(m.Error(code="NOT_FOUND", message="m"))) == {
        "type": "error",
        "code": "NOT_FOUND",
        "message": "m",
    }
    assert json.loads(encode(m.CommandResult(seq=1, id="c", status=m.CommandState.RECEIVED))) == {
        "type": "command_result",
        "seq": 1,
        "id": "c",
        "status": "received",
    }


def test_encode_uses_wire_names() -> None:
    frame = json.loads(encode(m.HistoryRequest(id="h", from_=1, to=2)))
    assert frame == {"type": "history_request", "id": "h", "from": 1, "to": 2}


def test_encode_type_comes_first() -> None:
    assert next(iter(to_dict(m.Ack(seq=1)))) == "type"
    assert encode(m.Ack(seq=1)) == '{"type":"ack","seq":1}'


def test_encode_never_sends_rejections() -> None:
    msg = decode_device_message(
        '{"type":"telemetry","seq":1,"samples":[{"ts":1,"data":{"voltage":"high"}},'
        '{"ts":2,"data":{"voltage":230.5}}]}'
    )
    assert msg.rejected
    assert json.loads(encode(msg)) == {
        "type": "telemetry",
        "seq": 1,
        "samples": [{"ts": 2, "data": {"voltage": 230.5}}],
    }


def test_encode_history_keeps_null_request_id() -> None:
    frame = json.loads(encode(m.History(seq=1, request_id=None, samples=(), final=True)))
    assert frame == {"type": "history", "seq": 1, "request_id": None, "samples": [], "final": True}


def test_encode_batch_tags_each_element() -> None:
    frame = json.loads(
        encode(m.Batch(messages=(m.Lagged(dropped=2), m.Error(code="X", message="y"))))
    )
    assert frame == {
        "type": "batch",
        "messages": [
            {"type": "lagged", "dropped": 2},
            {"type": "error", "code": "X", "message": "y"},
        ],
    }


# =============================================================================================
# Round trips: decode(encode(m)) == m for every message class

DEVICE = set(m.DEVICE_MESSAGE_TYPES)
HUB = set(m.HUB_MESSAGE_TYPES)
REQUEST = set(m.DASHBOARD_REQUEST_TYPES)
UPDATE = set(m.DASHBOARD_UPDATE_TYPES)


def _decoders_for(cls: type[Any]) -> list[Decoder]:
    out: list[Decoder] = []
    if cls in DEVICE:
        out.append(decode_device_message)
    if cls in HUB:
        out.append(decode_hub_message)
    if cls in REQUEST:
        out.append(decode_dashboard_message)
    if cls in UPDATE:
        out.append(decode_dashboard_update)
    return out


def _wire_classes() -> set[type[Any]]:
    return {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and isinstance(getattr(obj, "TYPE", None), str)
    }


def test_strategies_cover_every_message_class() -> None:
    assert set(s.BY_CLASS) == _wire_classes()
    assert _wire_classes() == DEVICE | HUB | REQUEST | UPDATE


@pytest.mark.parametrize("cls", sorted(s.BY_CLASS, key=lambda c: c.__name__), ids=lambda c: c.TYPE)
@FAST
@given(data=st.data())
def test_round_trip_by_class(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(s.BY_CLASS[cls])
    assert type(message) is cls
    text = encode(message)
    for decode in _decoders_for(cls):
        assert decode(text) == message
        assert decode(text.encode()) == message


@pytest.mark.parametrize(
    ("strategy", "decode"),
    [
        (s.device_messages(), decode_device_message),
        (s.hub_messages(), decode_hub_message),
        (s.dashboard_requests(), decode_dashboard_message),
        (s.dashboard_updates(), decode_dashboard_update),
    ],
    ids=["device", "hub", "dashboard_request", "dashboard_update"],
)
@FAST
@given(data=st.data())
def test_round_trip_by_direction(
    strategy: st.SearchStrategy[Any], decode: Decoder, data: st.DataObject
) -> None:
    message = data.draw(strategy)
    assert decode(encode(message)) == message


@FAST
@given(message=s.messages())
def test_round_trip_any_message(message: Any) -> None:
    decoded = [decode(encode(message)) for decode in _decoders_for(type(message))]
    assert decoded
    assert all(d == message for d in decoded)


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    message=st.builds(
        m.Telemetry,
        seq=s.seqs(),
        samples=st.lists(
            st.builds(m.Sample, ts=s.timestamps(), data=s.typed_metrics(max_size=3)),
            min_size=200,
            max_size=1000,
        ).map(tuple),
    )
)
def test_round_trip_large_telemetry(message: m.Telemetry) -> None:
    assert decode_device_message(encode(message)) == message


@FAST
@given(sample=s.samples(max_metrics=256))
def test_generated_samples_are_valid(sample: m.Sample) -> None:
    frame = json.dumps(
        {"type": "telemetry", "seq": 1, "samples": [{"ts": sample.ts, "data": sample.data}]}
    )
    msg = decode_device_message(frame)
    assert msg.rejected == ()
    assert msg.samples == (sample,)


# Decoding never fails with anything but ProtocolError.


def _decoded_or_protocol_error(decode: Decoder, frame: str) -> None:
    """Any other exception escapes and fails the test."""
    error: ProtocolError | None = None
    try:
        decode(frame)
    except ProtocolError as exc:
        error = exc
    assert error is None or error.code is ErrorCode.INVALID_MESSAGE_FORMAT


_ALL_TAGS = sorted({cls.TYPE for cls in _wire_classes()} | {"", "batch"})
_FIELD_NAMES = sorted(
    {"seq", "id", "ts", "samples", "messages", "data", "devices", "status", "from", "alert"}
    | {a.name for cls in _wire_classes() for a in getattr(cls, "__attrs_attrs__", ())}
)


@FAST
@given(
    tag=st.sampled_from(_ALL_TAGS),
    fields=st.dictionaries(st.sampled_from(_FIELD_NAMES), s.json_values(), max_size=6),
)
def test_decoders_raise_only_protocol_errors(tag: str, fields: dict[str, Any]) -> None:
    frame = json.dumps({"type": tag, **fields})
    for decode in ALL_DECODERS:
        _decoded_or_protocol_error(decode, frame)


@FAST
@given(text=st.text(max_size=40))
def test_arbitrary_text_raises_only_protocol_errors(text: str) -> None:
    for decode in ALL_DECODERS:
        _decoded_or_protocol_error(decode, text)


# =============================================================================================
# Purity: the protocol package never imports trio, opens sockets or reads clocks

PROTOCOL_DIR = Path(ems.protocol.__file__).parent
FORBIDDEN_MODULES = {"trio", "socket", "threading", "time"}
FORBIDDEN_CALLS = {("time", "time"), ("time", "monotonic")}


def test_protocol_imports_without_trio() -> None:
    code = (
        "import sys\n"
        "sys.modules['trio'] = None\n"
        "import ems.protocol\n"
        "import ems.protocol.hub_session, ems.protocol.device_session\n"
        "assert sys.modules['trio'] is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROTOCOL_DIR.parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _violations(tree: ast.AST) -> list[str]:
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"line {node.lineno}: from {node.module} import ...")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) in FORBIDDEN_CALLS
        ):
            found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}()")
    return found


def test_protocol_sources_read_no_clock_and_open_no_socket() -> None:
    sources = sorted(PROTOCOL_DIR.glob("*.py"))
    assert {p.name for p in sources} >= {"codec.py", "messages.py", "errors.py"}
    problems = {
        p.name: found for p in sources if (found := _violations(ast.parse(p.read_text(), str(p))))
    }
    assert problems == {}


def test_the_scan_itself_catches_violations() -> None:
    tree = ast.parse(
        "import time\nfrom trio import sleep\nimport socket as s\nimport threading.local\n"
        "t = time.monotonic()\nu = time.time()\n"
    )
    assert len(_violations(tree)) == 6
