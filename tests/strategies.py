"""Hypothesis strategies for the wire contract (protocol.md), all in one place.

Everything built here is valid under the contract and survives a JSON round trip exactly: floats
are finite, integers stay within +-2**53, strings hold no lone surrogates, and `rejected` on
`Telemetry`/`History` stays `()` (it never goes on the wire). Sizes are small by default; pass
larger bounds where a test needs them.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from ems.protocol import messages as m
from ems.protocol.codec import DEFAULT_TYPED_METRICS, MAX_STRING, MetricKind
from ems.protocol.errors import ErrorCode

MAX_SAFE_INT = 2**53

# ---------------------------------------------------------------------------------------------
# Scalars


def safe_ints(
    min_value: int = -MAX_SAFE_INT, max_value: int = MAX_SAFE_INT
) -> st.SearchStrategy[int]:
    return st.integers(min_value=min_value, max_value=max_value)


def finite_floats(
    min_value: float | None = None, max_value: float | None = None
) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False
    )


def finite_numbers(
    min_value: int | None = None, max_value: int | None = None
) -> st.SearchStrategy[int | float]:
    """JSON numbers that round-trip exactly: safe integers and finite floats."""
    lo = -MAX_SAFE_INT if min_value is None else min_value
    hi = MAX_SAFE_INT if max_value is None else max_value
    return st.one_of(safe_ints(lo, hi), finite_floats(min_value, max_value))


def timestamps() -> st.SearchStrategy[int | float]:
    """Epoch milliseconds, integer or float."""
    return finite_numbers(0, MAX_SAFE_INT)


def seqs() -> st.SearchStrategy[int]:
    return safe_ints(0, MAX_SAFE_INT)


def short_text(min_size: int = 0, max_size: int = 24) -> st.SearchStrategy[str]:
    return st.text(min_size=min_size, max_size=max_size)


def identifiers() -> st.SearchStrategy[str]:
    """Ids (session, command, request): any non-empty string."""
    return short_text(1, 24)


def device_ids() -> st.SearchStrategy[str]:
    return st.from_regex(r"\A[A-Za-z0-9_.-]{1,64}\Z", fullmatch=True)


def command_names() -> st.SearchStrategy[str]:
    return st.from_regex(r"\A[a-z][a-z0-9_]{0,63}\Z", fullmatch=True)


# ---------------------------------------------------------------------------------------------
# Telemetry data


def metric_names() -> st.SearchStrategy[str]:
    """Names matching `^[A-Za-z][A-Za-z0-9_.]{0,63}$`."""
    return st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.]{0,63}\Z", fullmatch=True)


def unknown_metric_names() -> st.SearchStrategy[str]:
    """Valid names that are not typed metrics (so any allowed value shape passes)."""
    return metric_names().filter(lambda name: name not in DEFAULT_TYPED_METRICS)


def metric_strings() -> st.SearchStrategy[str]:
    return st.text(max_size=MAX_STRING)


def metric_scalars() -> st.SearchStrategy[int | float | bool | str]:
    """A finite number, a boolean, or a string of at most 256 characters."""
    return st.one_of(finite_numbers(), st.booleans(), metric_strings())


def flat_objects(max_size: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """One flat object of scalars (field names are 1..64 characters)."""
    return st.dictionaries(short_text(1, 64), metric_scalars(), max_size=max_size)


def metric_values() -> st.SearchStrategy[Any]:
    return st.one_of(metric_scalars(), flat_objects())


def positions() -> st.SearchStrategy[dict[str, int | float]]:
    return st.fixed_dictionaries(
        {"latitude": finite_numbers(-90, 90), "longitude": finite_numbers(-180, 180)}
    )


def typed_metric_value(kind: MetricKind) -> st.SearchStrategy[Any]:
    if kind is MetricKind.POSITION:
        return positions()
    return finite_numbers()


def typed_metrics(max_size: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the hub's typed metrics, each holding a value of its type."""
    names = sorted(DEFAULT_TYPED_METRICS)
    return st.lists(st.sampled_from(names), unique=True, max_size=max_size).flatmap(
        lambda chosen: st.fixed_dictionaries(
            {name: typed_metric_value(DEFAULT_TYPED_METRICS[name]) for name in chosen}
        )
    )


def sample_data(max_metrics: int = 6) -> st.SearchStrategy[dict[str, Any]]:
    """A sample's `data`: typed metrics of the right type plus unknown metrics of any allowed
    shape; at most `max_metrics` (<= 256) of them."""
    half = max(max_metrics // 2, 0)
    return st.builds(
        lambda typed, other: {**other, **typed},
        typed_metrics(max_size=half),
        st.dictionaries(unknown_metric_names(), metric_values(), max_size=max_metrics - half),
    )


def samples(max_metrics: int = 6) -> st.SearchStrategy[m.Sample]:
    return st.builds(m.Sample, ts=timestamps(), data=sample_data(max_metrics))


def sample_lists(min_size: int = 1, max_size: int = 5) -> st.SearchStrategy[tuple[m.Sample, ...]]:
    return st.lists(samples(), min_size=min_size, max_size=max_size).map(tuple)


# ---------------------------------------------------------------------------------------------
# Free-form JSON (config documents, command params and results, notification data)


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    return st.recursive(
        st.one_of(st.none(), st.booleans(), finite_numbers(), short_text()),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(short_text(max_size=8), children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


def json_objects(max_size: int = 3) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(short_text(max_size=8), json_values(), max_size=max_size)


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def _tuples(strategy: st.SearchStrategy[Any], max_size: int = 3) -> st.SearchStrategy[tuple]:
    return st.lists(strategy, max_size=max_size).map(tuple)


# ---------------------------------------------------------------------------------------------
# Device link, device to hub


def hellos() -> st.SearchStrategy[m.Hello]:
    return st.builds(
        m.Hello,
        stream=identifiers(),
        agent=_optional(short_text()),
        firmware=_optional(short_text()),
        config_version=safe_ints(0),
        capabilities=_tuples(
            st.sampled_from(
                ["command", "config", "software_update", "history_request", "ssh_access"]
            ),
            max_size=5,
        ),
    )


def telemetries(max_samples: int = 5) -> st.SearchStrategy[m.Telemetry]:
    """`Telemetry` with 1..max_samples (at most 1000) valid samples."""
    return st.builds(m.Telemetry, seq=seqs(), samples=sample_lists(1, max_samples))


def events() -> st.SearchStrategy[m.Event]:
    return st.builds(
        m.Event,
        seq=seqs(),
        ts=timestamps(),
        level=st.sampled_from(m.Level),
        code=short_text(1),
        message=short_text(),
        data=_optional(json_objects()),
    )


def command_results() -> st.SearchStrategy[m.CommandResult]:
    return st.builds(
        m.CommandResult,
        seq=seqs(),
        id=identifiers(),
        status=st.sampled_from(m.CommandState),
        progress=_optional(finite_numbers(0, 100)),
        result=_optional(json_objects()),
        error=_optional(short_text()),
    )


def configs_applied() -> st.SearchStrategy[m.ConfigApplied]:
    return st.builds(
        m.ConfigApplied,
        seq=seqs(),
        version=safe_ints(0),
        status=st.sampled_from(m.ConfigOutcome),
        error=_optional(short_text()),
    )


def histories(max_samples: int = 5) -> st.SearchStrategy[m.History]:
    """`History` with 0..max_samples valid samples."""
    return st.builds(
        m.History,
        seq=seqs(),
        request_id=_optional(identifiers()),
        samples=sample_lists(0, max_samples),
        final=st.booleans(),
    )


def device_heartbeats() -> st.SearchStrategy[m.Heartbeat]:
    status = st.fixed_dictionaries(
        {}, optional={"uptime_s": finite_numbers(0), "outbox_depth": safe_ints(0)}
    )
    return st.builds(m.Heartbeat, ts=timestamps(), status=_optional(status | json_objects()))


def hub_heartbeats() -> st.SearchStrategy[m.Heartbeat]:
    return st.builds(m.Heartbeat, ts=timestamps())


def device_messages() -> st.SearchStrategy[m.DeviceMessage]:
    return st.one_of(
        hellos(),
        telemetries(),
        events(),
        command_results(),
        configs_applied(),
        histories(),
        device_heartbeats(),
    )


# ---------------------------------------------------------------------------------------------
# Device link, hub to device


def welcomes() -> st.SearchStrategy[m.Welcome]:
    return st.builds(
        m.Welcome,
        session_id=identifiers(),
        stream=identifiers(),
        acked_seq=seqs(),
        config_version=safe_ints(0),
        heartbeat_s=finite_numbers(0, 3600),
        server_time=timestamps(),
    )


def acks() -> st.SearchStrategy[m.Ack]:
    return st.builds(m.Ack, seq=seqs())


def errors() -> st.SearchStrategy[m.Error]:
    return st.builds(
        m.Error,
        code=st.sampled_from([code.value for code in ErrorCode]),
        message=short_text(),
        seq=_optional(seqs()),
        id=_optional(identifiers()),
        details=_optional(_tuples(short_text())),
    )


def commands() -> st.SearchStrategy[m.Command]:
    return st.builds(
        m.Command,
        id=identifiers(),
        name=command_names(),
        params=json_objects(),
        expires_at=_optional(timestamps()),
    )


def configs() -> st.SearchStrategy[m.Config]:
    return st.builds(m.Config, version=safe_ints(0), config=json_objects())


def software_updates() -> st.SearchStrategy[m.SoftwareUpdate]:
    return st.builds(
        m.SoftwareUpdate,
        id=identifiers(),
        version=short_text(1),
        url=short_text(1).map(lambda s: "/api/artifacts/" + s),
        sha256=st.from_regex(r"\A[0-9a-f]{64}\Z", fullmatch=True),
        size=safe_ints(0),
        signature=_optional(short_text(1)),
    )


def history_requests() -> st.SearchStrategy[m.HistoryRequest]:
    return st.builds(
        m.HistoryRequest,
        id=identifiers(),
        from_=timestamps(),
        to=timestamps(),
        metrics=_optional(_tuples(metric_names())),
    )


def ssh_accesses() -> st.SearchStrategy[m.SshAccess]:
    return st.builds(
        m.SshAccess,
        id=identifiers(),
        duration_s=finite_numbers(1, 86400),
        public_key=short_text(1),
        user=_optional(short_text(1)),
    )


def goaways() -> st.SearchStrategy[m.GoAway]:
    return st.builds(m.GoAway, retry_after_ms=safe_ints(0), spread_ms=safe_ints(0))


def hub_messages() -> st.SearchStrategy[m.HubMessage]:
    return st.one_of(
        welcomes(),
        acks(),
        errors(),
        commands(),
        configs(),
        software_updates(),
        history_requests(),
        ssh_accesses(),
        hub_heartbeats(),
        goaways(),
    )


# ---------------------------------------------------------------------------------------------
# Dashboard link


def subscription_targets() -> st.SearchStrategy[tuple[str, ...]]:
    return _tuples(device_ids() | st.just("*"))


def subscribes() -> st.SearchStrategy[m.Subscribe]:
    return st.builds(m.Subscribe, devices=subscription_targets())


def unsubscribes() -> st.SearchStrategy[m.Unsubscribe]:
    return st.builds(m.Unsubscribe, devices=subscription_targets())


def dashboard_requests() -> st.SearchStrategy[m.DashboardRequest]:
    return st.one_of(subscribes(), unsubscribes())


def device_snapshots() -> st.SearchStrategy[m.DeviceSnapshot]:
    return st.builds(
        m.DeviceSnapshot,
        device_id=device_ids(),
        online=st.booleans(),
        last_seen=_optional(timestamps()),
        latest=_optional(st.builds(m.LatestSample, ts=timestamps(), data=sample_data())),
    )


def subscribeds() -> st.SearchStrategy[m.Subscribed]:
    return st.builds(
        m.Subscribed, devices=_tuples(device_ids()), snapshot=_tuples(device_snapshots())
    )


def unsubscribeds() -> st.SearchStrategy[m.Unsubscribed]:
    return st.builds(m.Unsubscribed, devices=_tuples(device_ids()))


def telemetry_updates() -> st.SearchStrategy[m.TelemetryUpdate]:
    return st.builds(
        m.TelemetryUpdate, device_id=device_ids(), seq=seqs(), ts=timestamps(), data=sample_data()
    )


def alerts() -> st.SearchStrategy[m.Alert]:
    info = st.builds(
        m.AlertInfo, level=st.sampled_from(m.Level), code=short_text(1), message=short_text()
    )
    return st.builds(
        m.Alert, device_id=device_ids(), ts=timestamps(), alert=info, data=sample_data()
    )


def device_statuses() -> st.SearchStrategy[m.DeviceStatus]:
    return st.builds(m.DeviceStatus, device_id=device_ids(), online=st.booleans(), ts=timestamps())


def device_events() -> st.SearchStrategy[m.DeviceEvent]:
    return st.builds(
        m.DeviceEvent,
        device_id=device_ids(),
        ts=timestamps(),
        level=st.sampled_from(m.Level),
        code=short_text(1),
        message=short_text(),
    )


def command_statuses() -> st.SearchStrategy[m.CommandStatus]:
    command = st.fixed_dictionaries(
        {
            "id": identifiers(),
            "device_id": device_ids(),
            "name": command_names(),
            "params": json_objects(),
            "status": st.sampled_from(
                [
                    *("pending", "sent", "received", "running"),
                    *("succeeded", "failed", "rejected", "expired"),
                ]
            ),
            "progress": _optional(finite_numbers(0, 100)),
            "result": _optional(json_objects()),
            "error": _optional(short_text()),
            "created_at": timestamps(),
            "updated_at": timestamps(),
        }
    )
    return st.builds(m.CommandStatus, command=command | json_objects())


def config_statuses() -> st.SearchStrategy[m.ConfigStatus]:
    return st.builds(
        m.ConfigStatus,
        device_id=device_ids(),
        desired_version=safe_ints(0),
        reported_version=_optional(safe_ints(0)),
        status=_optional(st.sampled_from(["applied", "rejected", "pending"]) | short_text()),
    )


def notifications() -> st.SearchStrategy[m.Notification]:
    return st.builds(m.Notification, event=short_text(1), data=json_values())


def laggeds() -> st.SearchStrategy[m.Lagged]:
    return st.builds(m.Lagged, dropped=safe_ints(0))


def single_dashboard_updates() -> st.SearchStrategy[m.DashboardUpdate]:
    """One hub-to-dashboard message (anything but `batch`)."""
    return st.one_of(
        subscribeds(),
        unsubscribeds(),
        telemetry_updates(),
        alerts(),
        device_statuses(),
        device_events(),
        command_statuses(),
        config_statuses(),
        notifications(),
        laggeds(),
        errors(),
    )


def batches(max_size: int = 5) -> st.SearchStrategy[m.Batch]:
    return st.builds(m.Batch, messages=_tuples(single_dashboard_updates(), max_size=max_size))


def dashboard_updates() -> st.SearchStrategy[m.DashboardUpdate | m.Batch]:
    return st.one_of(single_dashboard_updates(), batches())


def messages() -> st.SearchStrategy[Any]:
    """A valid instance of any message class, in any direction."""
    return st.one_of(device_messages(), hub_messages(), dashboard_requests(), dashboard_updates())


# Every wire message class with the strategy that builds it. `Heartbeat` and `Error` travel in
# more than one direction; their strategy here covers the widest shape.
BY_CLASS: dict[type[Any], st.SearchStrategy[Any]] = {
    m.Hello: hellos(),
    m.Telemetry: telemetries(),
    m.Event: events(),
    m.CommandResult: command_results(),
    m.ConfigApplied: configs_applied(),
    m.History: histories(),
    m.Heartbeat: device_heartbeats(),
    m.Welcome: welcomes(),
    m.Ack: acks(),
    m.Error: errors(),
    m.Command: commands(),
    m.Config: configs(),
    m.SoftwareUpdate: software_updates(),
    m.HistoryRequest: history_requests(),
    m.SshAccess: ssh_accesses(),
    m.GoAway: goaways(),
    m.Subscribe: subscribes(),
    m.Unsubscribe: unsubscribes(),
    m.Subscribed: subscribeds(),
    m.Unsubscribed: unsubscribeds(),
    m.TelemetryUpdate: telemetry_updates(),
    m.Alert: alerts(),
    m.DeviceStatus: device_statuses(),
    m.DeviceEvent: device_events(),
    m.CommandStatus: command_statuses(),
    m.ConfigStatus: config_statuses(),
    m.Notification: notifications(),
    m.Lagged: laggeds(),
    m.Batch: batches(),
}
