"""Text <-> message, through one cattrs converter with orjson.

Which code for which fault (protocol.md §1):
- envelope faults (not JSON, not an object, unknown `type`, a missing or mistyped envelope field,
  `samples` not a list of 1..1000 objects) raise `ProtocolError(INVALID_MESSAGE_FORMAT)` naming
  the exact place, with the `seq`/`id` of the message when they could be read;
- sample faults never raise: `Telemetry`/`History` keep their valid samples and list the rest in
  `rejected`, each with its index and reasons (`samples[0].data.voltage: expected a number, got
  a string`), so the hub stores the good ones and answers one `TELEMETRY_VALIDATION_FAILED`.

The converter's primitive hooks are strict (no `"5"` -> 5, no `true` as a number). Samples, the
hot path, are checked by a hand-written function registered on the converter: a 50-sample batch
is decoded with one pass over plain dicts and no per-field exception machinery.
"""

from __future__ import annotations

import enum
import json
import math
import re
import types
import typing
from typing import Any, TypeVar

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override
from cattrs.preconf.orjson import make_converter

from ems.protocol import messages as m
from ems.protocol.errors import ProtocolError

if typing.TYPE_CHECKING:
    from collections.abc import Callable, Iterable

T = TypeVar("T")

MAX_SAMPLES = 1000
MAX_METRICS = 256
MAX_STRING = 256
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]{0,63}")
DEVICE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
COMMAND_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def json_kind(value: object) -> str:
    """How the contract's error messages name a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number" if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Sample rules: which metrics are typed, and whether unknown ones pass.


class MetricKind(enum.Enum):
    NUMBER = "a number"
    POSITION = "an object of numbers latitude and longitude"


DEFAULT_TYPED_METRICS: dict[str, MetricKind] = {
    name: MetricKind.NUMBER
    for name in (
        "voltage",
        "current",
        "power",
        "energy",
        "temperature",
        "soc",
        "engineRpm",
        "speed",
        "fuelLevel",
        "batteryVoltage",
        "crashDetection",
        "dtc",
    )
} | {"position": MetricKind.POSITION}


@attrs.frozen(kw_only=True)
class SampleRules:
    """How samples are judged; the hub builds one from its settings."""

    typed_metrics: dict[str, MetricKind] = attrs.field(factory=lambda: dict(DEFAULT_TYPED_METRICS))
    allow_unknown_metrics: bool = True


DEFAULT_RULES = SampleRules()

# Metric names repeat on every sample; checking a name once against the pattern is enough.
_VALID_NAMES: set[str] = set()
_VALID_NAMES_CAP = 65536


def _name_ok(name: object) -> bool:
    if name in _VALID_NAMES:
        return True
    if isinstance(name, str) and METRIC_NAME.fullmatch(name):
        if len(_VALID_NAMES) < _VALID_NAMES_CAP:
            _VALID_NAMES.add(name)
        return True
    return False


def _is_number(value: object) -> bool:
    kind = type(value)
    return kind is int or (kind is float and math.isfinite(value))  # type: ignore[arg-type]


def _scalar_fault(path: str, value: object) -> str | None:
    """Why `value` is not an allowed scalar (finite number, boolean, short string), or None."""
    kind = type(value)
    if kind is int or kind is bool:
        return None
    if kind is float:
        return None if math.isfinite(value) else f"{path}: expected a finite number, got {value}"  # type: ignore[arg-type]
    if kind is str:
        if len(value) <= MAX_STRING:  # type: ignore[arg-type]
            return None
        return f"{path}: string longer than {MAX_STRING} characters"
    return f"{path}: expected a number, a boolean or a string, got {json_kind(value)}"


def _value_faults(path: str, value: object, out: list[str]) -> None:
    if type(value) is dict:
        if len(value) > MAX_METRICS:
            out.append(f"{path}: more than {MAX_METRICS} fields")
            return
        for key, inner in value.items():
            if not isinstance(key, str) or not 0 < len(key) <= 64:
                out.append(f"{path}: field names must be 1 to 64 characters")
                continue
            fault = _scalar_fault(f"{path}.{key}", inner)
            if fault is not None:
                if type(inner) is dict or type(inner) is list:
                    fault = f"{path}.{key}: nested objects and arrays are not allowed"
                out.append(fault)
        return
    fault = _scalar_fault(path, value)
    if fault is not None:
        out.append(fault)


def _typed_faults(path: str, kind: MetricKind, value: object, out: list[str]) -> None:
    if kind is MetricKind.NUMBER:
        if not _is_number(value):
            if type(value) is float:
                out.append(f"{path}: expected a finite number, got {value}")
            else:
                out.append(f"{path}: expected a number, got {json_kind(value)}")
        return
    # POSITION
    if type(value) is not dict:
        out.append(f"{path}: expected {kind.value}, got {json_kind(value)}")
        return
    for key in ("latitude", "longitude"):
        if key not in value:
            out.append(f"{path}.{key}: required field missing")
    for key, inner in value.items():
        if not _is_number(inner):
            out.append(f"{path}.{key}: expected a number, got {json_kind(inner)}")


def check_sample(index: int, raw: dict[str, Any], rules: SampleRules) -> m.Sample | list[str]:
    """A valid `Sample`, or the reasons (by path) why sample `index` is refused."""
    ts = raw.get("ts")
    data = raw.get("data")
    faults: list[str] | None = None
    if not _is_number(ts):
        faults = []
        if ts is None and "ts" not in raw:
            faults.append(f"samples[{index}].ts: required field missing")
        else:
            faults.append(f"samples[{index}].ts: expected a finite number, got {json_kind(ts)}")
    if type(data) is not dict:
        faults = faults or []
        if "data" not in raw:
            faults.append(f"samples[{index}].data: required field missing")
        else:
            faults.append(f"samples[{index}].data: expected an object, got {json_kind(data)}")
        return faults
    if len(data) > MAX_METRICS:
        faults = faults or []
        faults.append(f"samples[{index}].data: more than {MAX_METRICS} metrics ({len(data)})")
        return faults
    typed = rules.typed_metrics
    for name, value in data.items():
        kind = typed.get(name)
        if kind is not None:
            # Fast accept for the common case: a typed number metric holding a plain number.
            if kind is MetricKind.NUMBER and (
                type(value) is int or (type(value) is float and math.isfinite(value))
            ):
                continue
            faults = faults or []
            _typed_faults(f"samples[{index}].data.{name}", kind, value, faults)
            continue
        if not _name_ok(name):
            faults = faults or []
            faults.append(f"samples[{index}].data: metric name {str(name)[:80]!r} is not allowed")
            continue
        if not rules.allow_unknown_metrics:
            faults = faults or []
            faults.append(f"samples[{index}].data.{name}: unknown metric")
            continue
        vtype = type(value)
        if vtype is int or vtype is bool or (vtype is str and len(value) <= MAX_STRING):
            continue
        if vtype is float and math.isfinite(value):
            continue
        faults = faults or []
        _value_faults(f"samples[{index}].data.{name}", value, faults)
    if faults:
        return faults
    return m.Sample(ts=ts, data=data)  # type: ignore[arg-type]


def _split_samples(
    raw: object, rules: SampleRules, *, min_count: int
) -> tuple[tuple[m.Sample, ...], tuple[m.SampleRejection, ...]]:
    if type(raw) is not list:
        raise _EnvelopeFault(f"samples: expected an array, got {json_kind(raw)}")
    count = len(raw)
    if not min_count <= count <= MAX_SAMPLES:
        raise _EnvelopeFault(f"samples: expected {min_count} to {MAX_SAMPLES} samples, got {count}")
    valid: list[m.Sample] = []
    rejected: list[m.SampleRejection] = []
    for index, item in enumerate(raw):
        if type(item) is not dict:
            raise _EnvelopeFault(f"samples[{index}]: expected an object, got {json_kind(item)}")
        outcome = check_sample(index, item, rules)
        if type(outcome) is list:
            rejected.append(m.SampleRejection(index=index, reasons=tuple(outcome)))
        else:
            valid.append(outcome)  # type: ignore[arg-type]
    return tuple(valid), tuple(rejected)


class _EnvelopeFault(Exception):
    """Raised inside structuring; becomes a ProtocolError with seq/id at the top."""


# ---------------------------------------------------------------------------------------------
# The converter


def _strict_int(value: object, _: object) -> int:
    if type(value) is int:
        return value
    raise TypeError(f"expected an integer, got {json_kind(value)}")


def _strict_number(value: object, _: object) -> int | float:
    if type(value) is int:
        return value
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise ValueError(f"expected a finite number, got {value}")
    raise TypeError(f"expected a number, got {json_kind(value)}")


def _strict_str(value: object, _: object) -> str:
    if type(value) is str:
        return value
    raise TypeError(f"expected a string, got {json_kind(value)}")


def _strict_bool(value: object, _: object) -> bool:
    if type(value) is bool:
        return value
    raise TypeError(f"expected a boolean, got {json_kind(value)}")


def _json_object(value: object, _: object) -> dict[str, Any]:
    if type(value) is dict:
        return value
    raise TypeError(f"expected an object, got {json_kind(value)}")


def _any(value: object, _: object) -> object:
    return value


def _is_union_with_none(tp: object) -> bool:
    origin = typing.get_origin(tp)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(
        tp
    )


def _is_string_tuple(tp: object) -> bool:
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, ...)


def _strict_str_tuple(value: object, _: object) -> tuple[str, ...]:
    if type(value) is not list:
        raise TypeError(f"expected an array of strings, got {json_kind(value)}")
    for index, item in enumerate(value):
        if type(item) is not str:
            raise TypeError(f"[{index}]: expected a string, got {json_kind(item)}")
    return tuple(value)


def _enum_hook(value: object, tp: type[enum.Enum]) -> enum.Enum:
    try:
        return tp(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in tp)
        raise ValueError(f"expected one of {allowed}, got {str(value)[:40]!r}") from None


def _build_converter(rules: SampleRules) -> cattrs.Converter:
    conv = make_converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_number)
    # A union: `register_structure_hook` would file it where the preconf's union passthrough
    # (which lets booleans and NaN through) shadows it, so match the type with a predicate.
    conv.register_structure_hook_func(lambda tp: tp == m.Number, _strict_number)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook_func(lambda tp: tp == m.JsonObject, _json_object)
    conv.register_structure_hook_func(lambda tp: tp is typing.Any, _any)
    conv.register_structure_hook_func(_is_string_tuple, _strict_str_tuple)
    for enum_cls in (m.Level, m.CommandState, m.ConfigOutcome):
        conv.register_structure_hook(enum_cls, _enum_hook)

    def optional_hook(tp: object) -> Callable[[object, object], object]:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        target: Any = inner[0] if len(inner) == 1 else typing.Union[tuple(inner)]  # noqa: UP007
        handler: Any
        handler = _strict_number if set(inner) == {int, float} else conv.get_structure_hook(target)

        def structure_optional(value: object, _: object) -> object:
            return None if value is None else handler(value, target)

        return structure_optional

    conv.register_structure_hook_factory(_is_union_with_none, optional_hook)

    # Renames and omitted fields, for both directions.
    renames = {m.HistoryRequest: {"from_": override(rename="from")}}
    for cls in (*m.DEVICE_MESSAGE_TYPES, *m.HUB_MESSAGE_TYPES, *m.DASHBOARD_REQUEST_TYPES):
        if cls in (m.Telemetry, m.History):
            continue
        extra = renames.get(cls, {})
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv, **extra))
    for cls in (
        *m.DEVICE_MESSAGE_TYPES,
        *m.HUB_MESSAGE_TYPES,
        *m.DASHBOARD_REQUEST_TYPES,
        *m.DASHBOARD_UPDATE_TYPES,
        m.DeviceSnapshot,
        m.LatestSample,
        m.AlertInfo,
    ):
        if cls in (m.Telemetry, m.History, m.Batch):
            continue
        # Optional fields that are unset (None) stay off the wire; everything else is sent.
        extra = {
            a.name: override(omit_if_default=True) for a in attrs.fields(cls) if a.default is None
        } | renames.get(cls, {})
        fn = make_dict_unstructure_fn(cls, conv, **extra)
        conv.register_unstructure_hook(cls, fn)

    def structure_telemetry(obj: dict[str, Any], _: object) -> m.Telemetry:
        seq = _envelope_int(obj, "seq")
        samples, rejected = _split_samples(obj.get("samples"), rules, min_count=1)
        return m.Telemetry(seq=seq, samples=samples, rejected=rejected)

    def structure_history(obj: dict[str, Any], _: object) -> m.History:
        seq = _envelope_int(obj, "seq")
        if "request_id" not in obj:  # required; null (not absent) marks a scheduled upload
            raise _EnvelopeFault("request_id: required field missing")
        request_id = obj["request_id"]
        if request_id is not None and type(request_id) is not str:
            raise _EnvelopeFault(
                f"request_id: expected a string or null, got {json_kind(request_id)}"
            )
        final = obj.get("final")
        if type(final) is not bool:
            if "final" not in obj:
                raise _EnvelopeFault("final: required field missing")
            raise _EnvelopeFault(f"final: expected a boolean, got {json_kind(final)}")
        samples, rejected = _split_samples(obj.get("samples"), rules, min_count=0)
        return m.History(
            seq=seq, request_id=request_id, samples=samples, final=final, rejected=rejected
        )

    conv.register_structure_hook(m.Telemetry, structure_telemetry)
    conv.register_structure_hook(m.History, structure_history)

    def unstructure_samples(samples: Iterable[m.Sample]) -> list[dict[str, Any]]:
        return [{"ts": s.ts, "data": s.data} for s in samples]

    conv.register_unstructure_hook(
        m.Telemetry,
        lambda t: {"seq": t.seq, "samples": unstructure_samples(t.samples)},
    )
    conv.register_unstructure_hook(
        m.History,
        lambda h: {
            "seq": h.seq,
            "request_id": h.request_id,
            "samples": unstructure_samples(h.samples),
            "final": h.final,
        },
    )
    conv.register_unstructure_hook(
        m.Batch, lambda b: {"messages": [_tagged(conv, item) for item in b.messages]}
    )
    return conv


def _envelope_int(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if type(value) is int:
        return value
    if key not in obj:
        raise _EnvelopeFault(f"{key}: required field missing")
    raise _EnvelopeFault(f"{key}: expected an integer, got {json_kind(value)}")


def _tagged(conv: cattrs.Converter, message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": message.TYPE}
    data.update(conv.unstructure(message))
    return data


# ---------------------------------------------------------------------------------------------
# Turning cattrs' exception trees into "path: reason" lines


def _describe(exc: BaseException) -> list[str]:
    lines: list[str] = []
    for text in cattrs.transform_error(exc, path="$", format_exception=_format_leaf):
        reason, _, path = text.rpartition(" @ ")
        path = path.removeprefix("$").removeprefix(".")
        if reason.startswith("[") and "]: " in reason:  # index inside a string array
            index, _, reason = reason.partition(": ")
            path += index
        lines.append(f"{path}: {reason}" if path else reason)
    return lines


def _format_leaf(exc: BaseException, _type: object) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, _EnvelopeFault):
        return str(exc)
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Public API


_DEVICE_TYPES: dict[str, type[Any]] = {cls.TYPE: cls for cls in m.DEVICE_MESSAGE_TYPES}
_HUB_TYPES: dict[str, type[Any]] = {cls.TYPE: cls for cls in m.HUB_MESSAGE_TYPES}
_DASHBOARD_REQUEST_TYPES: dict[str, type[Any]] = {
    cls.TYPE: cls for cls in m.DASHBOARD_REQUEST_TYPES
}
_DASHBOARD_UPDATE_TYPES: dict[str, type[Any]] = {cls.TYPE: cls for cls in m.DASHBOARD_UPDATE_TYPES}


class Codec:
    """Decoding with one set of sample rules; the hub makes one from its settings."""

    def __init__(self, rules: SampleRules = DEFAULT_RULES) -> None:
        self.rules = rules
        self._conv = _build_converter(rules)

    def _parse(self, text: str | bytes) -> dict[str, Any]:
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            obj = _lenient_parse(text, exc)
        if type(obj) is not dict:
            raise ProtocolError(f"expected a JSON object, got {json_kind(obj)}")
        return obj

    def _structure(self, obj: dict[str, Any], table: dict[str, type[T]], link: str) -> T:
        tag = obj.get("type")
        cls = table.get(tag) if type(tag) is str else None
        if cls is None:
            seq, ident = _readable_ids(obj)
            if "type" not in obj:
                reason = "type: required field missing"
            elif type(tag) is not str:
                reason = f"type: expected a string, got {json_kind(tag)}"
            else:
                reason = f"type: unknown message type {tag[:64]!r} on the {link} link"
            raise ProtocolError(reason, seq=seq, id=ident)
        try:
            return self._conv.structure(obj, cls)
        except _EnvelopeFault as exc:
            seq, ident = _readable_ids(obj, cls)
            raise ProtocolError(f"{cls.TYPE}: {exc}", seq=seq, id=ident) from None
        except (cattrs.ClassValidationError, cattrs.IterableValidationError) as exc:
            seq, ident = _readable_ids(obj, cls)
            reasons = "; ".join(_describe(exc))
            raise ProtocolError(f"{cls.TYPE}: {reasons}", seq=seq, id=ident) from None

    def decode_device_message(self, text: str | bytes) -> m.DeviceMessage:
        """A device-to-hub frame as a message; raises ProtocolError on an envelope fault."""
        return self._structure(self._parse(text), _DEVICE_TYPES, "device")

    def decode_hub_message(self, text: str | bytes) -> m.HubMessage:
        """A hub-to-device frame as a message (the agent's side)."""
        return self._structure(self._parse(text), _HUB_TYPES, "device")

    def decode_dashboard_message(self, text: str | bytes) -> m.DashboardRequest:
        """A dashboard-to-hub frame (`subscribe`, `unsubscribe`)."""
        return self._structure(self._parse(text), _DASHBOARD_REQUEST_TYPES, "dashboard")

    def decode_dashboard_update(self, text: str | bytes) -> m.DashboardUpdate | m.Batch:
        """A hub-to-dashboard frame (the dashboard client's side; tests and benchmarks)."""
        obj = self._parse(text)
        if obj.get("type") == "batch" and type(obj.get("messages")) is list:
            items = []
            for index, item in enumerate(obj["messages"]):
                if type(item) is not dict:
                    raise ProtocolError(f"batch: messages[{index}]: expected an object")
                items.append(self._structure(item, _DASHBOARD_UPDATE_TYPES, "dashboard"))
            return m.Batch(messages=tuple(items))
        return self._structure(obj, _DASHBOARD_UPDATE_TYPES, "dashboard")

    def to_dict(self, message: Any) -> dict[str, Any]:
        """The wire form of `message` as a dict, `type` first."""
        return _tagged(self._conv, message)

    def encode(self, message: Any) -> str:
        """The text frame for `message`."""
        return orjson.dumps(_tagged(self._conv, message)).decode()


def _lenient_parse(text: str | bytes, exc: orjson.JSONDecodeError) -> Any:
    """Second chance for frames orjson refuses only because of NaN/Infinity literals.

    Those are sample faults, not envelope faults, so the stdlib parser (which reads them as
    floats) gets one try; anything it also refuses is not JSON. Off the hot path.
    """
    try:
        obj = json.loads(text)
        orjson.dumps(obj)  # refuses lone surrogates and other things we could not send on
    except (ValueError, TypeError, orjson.JSONEncodeError):
        raise ProtocolError(f"not valid JSON: {exc.msg} at position {exc.pos}") from None
    return obj


def _readable_ids(obj: dict[str, Any], cls: type | None = None) -> tuple[int | None, str | None]:
    """The `seq` and `id` of a refused message, where they mean something: a stray `seq` on a
    known unreliable type (hello, heartbeat) must not be acknowledged as a rejected message."""
    seq = None if cls in (m.Hello, m.Heartbeat) else obj.get("seq")
    ident = obj.get("id")
    return (
        seq if type(seq) is int else None,
        ident if type(ident) is str else None,
    )


_default = Codec()
decode_device_message = _default.decode_device_message
decode_hub_message = _default.decode_hub_message
decode_dashboard_message = _default.decode_dashboard_message
decode_dashboard_update = _default.decode_dashboard_update
encode = _default.encode
to_dict = _default.to_dict
