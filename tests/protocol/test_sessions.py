"""HubSession and DeviceSession as pure functions of (inputs, now): no sockets, no sleeping."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ems.protocol import messages as m
from ems.protocol._window import CommandRecord, TokenBucket
from ems.protocol.codec import decode_device_message, encode
from ems.protocol.device_session import (
    Acked,
    BadFrame,
    DeviceLinkState,
    DeviceSession,
    Dispatch,
    ErrorReceived,
    GoingAway,
    LinkDead,
    Redelivered,
    Welcomed,
)
from ems.protocol.errors import CloseCode, LocalProtocolError
from ems.protocol.hub_session import (
    _TRANSITIONS,
    REMOTE_INPUTS,
    CloseConnection,
    HeartbeatReceived,
    HelloReceived,
    HubSession,
    Input,
    LinkState,
    MessageReceived,
)
from tests.helpers import SessionPair

HELLO = '{"type":"hello","stream":"s1","agent":"t/1","firmware":"1.0","config_version":2}'


def frames(session: HubSession | DeviceSession) -> list[dict]:
    return [orjson.loads(text) for text in session.data_to_send()]


def events(session: HubSession | DeviceSession) -> list:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def telemetry(seq: int, ts: float = 1.0, **data: object) -> str:
    return encode(m.Telemetry(seq=seq, samples=(m.Sample(ts=ts, data=data or {"soc": 50}),)))


def open_hub(acked: int = 0, **kwargs: object) -> HubSession:
    hub = HubSession(now=0.0, heartbeat_s=10.0, **kwargs)  # type: ignore[arg-type]
    hub.receive_text(HELLO, 0.0)
    (hello,) = events(hub)
    assert isinstance(hello, HelloReceived)
    hub.accept(session_id="sid", acked_seq=acked, config_version=3, server_time=5.0)
    return hub


# --- HubSession ----------------------------------------------------------------------------


def test_hello_deadline_closes_4001() -> None:
    hub = HubSession(now=0.0)
    assert hub.next_deadline() == 10.0
    hub.handle_timer(9.9)
    assert events(hub) == []
    hub.handle_timer(10.0)
    assert events(hub) == [CloseConnection(CloseCode.NO_HELLO, "no hello in time")]
    assert hub.state is LinkState.CLOSED
    assert hub.next_deadline() is None


def test_message_before_hello_closes_4001() -> None:
    hub = HubSession(now=0.0)
    hub.receive_text(telemetry(1), 0.0)
    (event,) = events(hub)
    assert isinstance(event, CloseConnection)
    assert event.code is CloseCode.NO_HELLO


def test_invalid_frame_before_hello_gets_error_and_4001() -> None:
    hub = HubSession(now=0.0)
    hub.receive_text("{not json", 0.0)
    assert frames(hub)[0]["code"] == "INVALID_MESSAGE_FORMAT"
    assert isinstance(events(hub)[0], CloseConnection)


def test_welcome_carries_the_streams_acked_seq() -> None:
    hub = open_hub(acked=41)
    (welcome,) = frames(hub)
    assert welcome == {
        "type": "welcome",
        "session_id": "sid",
        "stream": "s1",
        "acked_seq": 41,
        "config_version": 3,
        "heartbeat_s": 10.0,
        "server_time": 5.0,
    }
    assert hub.state is LinkState.OPEN


def test_mixed_telemetry_one_error_and_the_good_sample_goes_on() -> None:
    """The issue's acceptance line: one TELEMETRY_VALIDATION_FAILED naming seq 1, ts 2 stored."""
    hub = open_hub()
    frames(hub)
    hub.receive_text(
        '{"type":"telemetry","seq":1,"samples":[{"ts":1,"data":{"voltage":"high"}},'
        '{"ts":2,"data":{"voltage":230.5}}]}',
        1.0,
    )
    (error,) = frames(hub)
    assert error["type"] == "error"
    assert error["code"] == "TELEMETRY_VALIDATION_FAILED"
    assert error["seq"] == 1
    assert "samples[0].data.voltage" in error["message"]
    (event,) = events(hub)
    assert isinstance(event, MessageReceived)
    assert event.seq == 1
    assert event.message.samples == (m.Sample(ts=2, data={"voltage": 230.5}),)
    hub.committed(1)
    assert frames(hub) == [{"type": "ack", "seq": 1}]


def test_one_cumulative_ack_per_commit() -> None:
    hub = open_hub(acked=10)
    frames(hub)
    for seq in (11, 12, 13):
        hub.receive_text(telemetry(seq, ts=seq), 1.0)
    assert [e.seq for e in events(hub)] == [11, 12, 13]
    assert frames(hub) == []  # nothing acked before the store confirms
    hub.committed(12)
    assert frames(hub) == [{"type": "ack", "seq": 12}]
    hub.committed(13)
    assert frames(hub) == [{"type": "ack", "seq": 13}]


def test_duplicates_are_reacked_never_processed_twice() -> None:
    hub = open_hub(acked=5)
    frames(hub)
    hub.receive_text(telemetry(4), 1.0)
    hub.receive_text(telemetry(5), 1.0)
    assert events(hub) == []
    assert frames(hub) == [{"type": "ack", "seq": 5}]  # one ack for both duplicates
    hub.receive_text(telemetry(6), 1.0)
    hub.receive_text(telemetry(6), 1.0)  # in flight: covered by the coming ack
    assert len(events(hub)) == 1
    assert frames(hub) == []
    hub.committed(6)
    assert frames(hub) == [{"type": "ack", "seq": 6}]


def test_out_of_order_arrival_is_stored_and_holds_the_ack_back() -> None:
    """A client that sends 3 before 2 (the contract says seqs grow in send order) loses nothing
    as long as 2 arrives before 3 is acked: 2 is new (above the ack), not a duplicate."""
    hub = open_hub(acked=1)
    frames(hub)
    hub.receive_text(telemetry(3, ts=3), 1.0)
    assert [e.seq for e in events(hub)] == [3]
    hub.receive_text(telemetry(2, ts=2), 1.0)
    assert [e.seq for e in events(hub)] == [2]
    assert hub.ack_after(3) == 1  # 2 is still on its way to the store
    hub.committed(3)
    assert frames(hub) == []
    assert hub.ack_after(2) == 3
    hub.committed(2)
    assert frames(hub) == [{"type": "ack", "seq": 3}]
    hub.receive_text(telemetry(2, ts=2), 1.0)  # now a duplicate of something acked
    assert events(hub) == []
    assert frames(hub) == [{"type": "ack", "seq": 3}]


def test_invalid_reliable_message_is_rejected_for_good_and_acked_in_order() -> None:
    hub = open_hub()
    frames(hub)
    hub.receive_text(telemetry(1), 1.0)
    hub.receive_text('{"type":"telemetry","seq":2,"samples":[]}', 1.0)
    (error,) = frames(hub)
    assert error["code"] == "INVALID_MESSAGE_FORMAT"
    assert error["seq"] == 2
    assert hub.state is LinkState.OPEN
    _first, second = events(hub)
    assert second == MessageReceived(2, None)
    hub.committed(1)
    assert frames(hub) == [{"type": "ack", "seq": 1}]
    hub.committed(2)
    assert frames(hub) == [{"type": "ack", "seq": 2}]


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1,2]",
        '{"type":"nope"}',
        '{"type":"telemetry","seq":"x","samples":[{"ts":1,"data":{}}]}',
        '{"type":"event","seq":3,"ts":1,"level":"loud","code":"x","message":"y"}',
    ],
)
def test_invalid_messages_get_error_and_the_link_stays_open(text: str) -> None:
    hub = open_hub()
    frames(hub)
    hub.receive_text(text, 1.0)
    (error,) = frames(hub)
    assert error["code"] == "INVALID_MESSAGE_FORMAT"
    assert hub.state is LinkState.OPEN
    assert not any(isinstance(e, CloseConnection) for e in events(hub))


def test_heartbeats_and_silence() -> None:
    hub = open_hub()
    frames(hub)
    assert hub.next_deadline() == 10.0
    hub.handle_timer(10.0)
    (beat,) = frames(hub)
    assert beat["type"] == "heartbeat"
    hub.receive_text('{"type":"heartbeat","ts":1}', 15.0)
    assert isinstance(events(hub)[0], HeartbeatReceived)
    hub.handle_timer(20.0)
    hub.handle_timer(30.0)
    assert [f["type"] for f in frames(hub)] == ["heartbeat", "heartbeat"]
    assert hub.state is LinkState.OPEN
    hub.handle_timer(44.9)
    assert hub.state is LinkState.OPEN
    hub.handle_timer(45.0)  # three intervals after the last frame at 15.0
    assert events(hub) == [
        CloseConnection(CloseCode.SILENT, "no traffic for three heartbeat intervals")
    ]


def test_oversize_frame_closes_1009() -> None:
    hub = open_hub(max_frame_bytes=1000)
    frames(hub)
    hub.receive_text(telemetry(1, note="x" * 200) + " " * 1000, 1.0)
    assert frames(hub)[0]["code"] == "MESSAGE_TOO_LARGE"
    assert events(hub)[0].code is CloseCode.MESSAGE_TOO_BIG


def test_rate_limit_errors_then_4008_on_abuse() -> None:
    hub = open_hub(rate_per_s=1.0, rate_burst=3.0, abuse_strikes=3)
    frames(hub)
    for _ in range(3):
        hub.receive_text('{"type":"heartbeat","ts":1}', 1.0)
    events(hub)
    hub.receive_text('{"type":"heartbeat","ts":1}', 1.0)
    assert frames(hub)[0]["code"] == "RATE_LIMIT_EXCEEDED"
    assert hub.state is LinkState.OPEN
    hub.receive_text('{"type":"heartbeat","ts":1}', 1.0)
    hub.receive_text('{"type":"heartbeat","ts":1}', 1.0)
    assert events(hub)[-1].code is CloseCode.RATE_LIMITED


def test_reliable_message_over_the_rate_closes_4008_without_acking_it() -> None:
    hub = open_hub(rate_per_s=1.0, rate_burst=1.0)
    frames(hub)
    hub.receive_text(telemetry(1), 1.0)
    hub.receive_text(telemetry(2, ts=2), 1.0)
    first, close = events(hub)
    assert first.seq == 1
    assert close.code is CloseCode.RATE_LIMITED
    hub.committed(1)
    errors = frames(hub)
    assert errors[0]["code"] == "RATE_LIMIT_EXCEEDED"
    assert errors[0]["seq"] == 2
    assert hub.acked == 1  # seq 2 stays with the device, which sends it again


@given(state=st.sampled_from(LinkState), action=st.sampled_from(Input))
def test_transition_table_is_total(state: LinkState, action: Input) -> None:
    """Every (state, input) is either in the table, or a remote input that closes the link, or a
    local misuse that raises."""
    hub = HubSession(now=0.0)
    hub.state = state
    if (state, action) in _TRANSITIONS:
        assert hub._move(action)
        assert hub.state is _TRANSITIONS[(state, action)]
    elif action in REMOTE_INPUTS:
        assert not hub._move(action)
        assert hub.state is LinkState.CLOSED
    else:
        with pytest.raises(LocalProtocolError):
            hub._move(action)


def test_sending_before_welcome_is_a_local_error() -> None:
    hub = HubSession(now=0.0)
    with pytest.raises(LocalProtocolError):
        hub.send(m.Ack(seq=1))


# --- DeviceSession -------------------------------------------------------------------------


def new_device(**kwargs: object) -> DeviceSession:
    return DeviceSession(hello=m.Hello(stream="s1"), now=0.0, **kwargs)  # type: ignore[arg-type]


def welcome(acked: int = 0, heartbeat_s: float = 10.0) -> str:
    return encode(
        m.Welcome(
            session_id="x",
            stream="s1",
            acked_seq=acked,
            config_version=1,
            heartbeat_s=heartbeat_s,
            server_time=0,
        )
    )


def test_device_says_hello_and_takes_the_welcome() -> None:
    device = new_device()
    assert frames(device) == [
        {"type": "hello", "stream": "s1", "config_version": 0, "capabilities": []}
    ]
    device.receive_text(welcome(acked=7), 0.5)
    evs = events(device)
    assert isinstance(evs[0], Welcomed)
    assert evs[1] == Acked(7)
    assert device.state is DeviceLinkState.OPEN
    assert device.sent_high == 7


def test_no_welcome_in_time_means_the_link_is_dead() -> None:
    device = new_device()
    device.handle_timer(10.0)
    assert isinstance(events(device)[0], LinkDead)


def test_send_window_and_cumulative_acks() -> None:
    device = new_device(max_in_flight=2)
    device.receive_text(welcome(), 0.0)
    events(device)
    frames(device)
    with pytest.raises(LocalProtocolError):
        device.send_reliable(0, "x", 0.0)
    device.send_reliable(1, telemetry(1), 0.0)
    device.send_reliable(2, telemetry(2), 0.0)
    assert device.window_free() == 0
    assert len(frames(device)) == 2
    device.receive_text('{"type":"ack","seq":2}', 1.0)
    assert events(device) == [Acked(2)]
    assert device.window_free() == 2
    device.receive_text('{"type":"ack","seq":1}', 1.0)  # stale ack: nothing happens
    assert events(device) == []


def test_reliable_send_before_welcome_is_a_local_error() -> None:
    device = new_device()
    with pytest.raises(LocalProtocolError):
        device.send_reliable(1, telemetry(1), 0.0)


def test_redelivered_command_is_not_dispatched_again_even_after_restart() -> None:
    record = CommandRecord()
    device = new_device(record=record)
    device.receive_text(welcome(), 0.0)
    events(device)
    command = '{"type":"command","id":"c1","name":"ping","params":{}}'
    device.receive_text(command, 1.0)
    (dispatch,) = events(device)
    assert isinstance(dispatch, Dispatch)
    record.update(m.CommandResult(seq=9, id="c1", status=m.CommandState.SUCCEEDED))
    # a new connection (or a new process with the persisted record)
    again = new_device(record=CommandRecord(entries=record._entries.copy()))
    again.receive_text(welcome(), 2.0)
    events(again)
    again.receive_text(command, 2.0)
    (redelivered,) = events(again)
    assert isinstance(redelivered, Redelivered)
    assert redelivered.last.status is m.CommandState.SUCCEEDED


def test_device_heartbeats_answers_and_idles() -> None:
    device = new_device()
    device.receive_text(welcome(heartbeat_s=10.0), 0.0)
    frames(device)
    device.status["outbox_depth"] = 3
    device.receive_text('{"type":"heartbeat","ts":1}', 1.0)
    (answer,) = frames(device)
    assert answer["type"] == "heartbeat"
    assert answer["status"] == {"outbox_depth": 3}
    assert device.next_deadline() == 11.0
    device.handle_timer(11.0)
    assert frames(device)[0]["type"] == "heartbeat"
    device.handle_timer(31.0)
    assert isinstance(events(device)[-1], LinkDead)


def test_device_reports_goaway_errors_and_bad_frames_and_stays_open() -> None:
    device = new_device()
    device.receive_text(welcome(), 0.0)
    events(device)
    device.receive_text('{"type":"goaway","retry_after_ms":500,"spread_ms":1000}', 1.0)
    device.receive_text('{"type":"error","code":"RATE_LIMIT_EXCEEDED","message":"slow"}', 1.0)
    device.receive_text("garbage", 1.0)
    first, second, third = events(device)
    assert first == GoingAway(500, 1000)
    assert isinstance(second, ErrorReceived)
    assert isinstance(third, BadFrame)
    assert device.state is DeviceLinkState.OPEN


def test_token_bucket_refills() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0)
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.take(0.5)


# --- the pair, deterministic scenarios the stateful test also explores ----------------------


def test_partial_commit_acks_only_what_is_stored() -> None:
    pair = SessionPair()
    pair.connect()
    pair.deliver_up(1)
    pair.deliver_down(1)
    pair.produce()
    pair.produce()
    pair.deliver_up(2)
    pair.store_commits(limit=1)
    pair.deliver_down(5)
    assert set(pair.outbox) == {2}
    pair.drain()
    assert pair.store.samples == pair.produced


def test_hub_restart_loses_uncommitted_but_the_device_resends() -> None:
    pair = SessionPair()
    pair.connect()
    pair.deliver_up(1)
    pair.deliver_down(1)
    pair.produce(3)
    pair.deliver_up(1)
    assert pair.ingest_buffer
    pair.restart_hub()
    pair.drain()
    assert pair.store.samples == pair.produced


def test_decoded_duplicate_check_uses_the_same_codec() -> None:
    assert isinstance(decode_device_message(telemetry(3)), m.Telemetry)
