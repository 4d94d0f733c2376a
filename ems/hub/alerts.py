"""Alert rules and their evaluation.

A rule fires when it *starts* to hold for a device, not on every sample while it holds, so the
evaluator remembers, per device and rule, whether the rule held at the last sample carrying its
metric. Evaluation runs inline on the ingest hot path (a dictionary lookup per metric present):
a hop to another task per sample would cost more than the check itself.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ems.protocol.codec import METRIC_NAME

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
LEVELS = ("info", "warning", "critical")


class RuleError(ValueError):
    """A rule document is invalid; the message names the place."""


@attrs.frozen(kw_only=True)
class AlertRule:
    code: str
    metric: str
    op: str
    threshold: float
    level: str
    message: str

    def holds(self, value: object) -> bool:
        if type(value) not in (int, float):
            return False
        return OPERATORS[self.op](value, self.threshold)

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        code="LOW_BATTERY",
        metric="batteryVoltage",
        op="<",
        threshold=12.0,
        level="warning",
        message="Battery voltage below 12.0 V",
    ),
    AlertRule(
        code="CRASH_DETECTED",
        metric="crashDetection",
        op=">",
        threshold=0,
        level="critical",
        message="Crash detected",
    ),
    AlertRule(
        code="HIGH_RPM",
        metric="engineRpm",
        op=">",
        threshold=4000,
        level="warning",
        message="Engine RPM above 4000",
    ),
    AlertRule(
        code="DTC_DETECTED",
        metric="dtc",
        op=">",
        threshold=0,
        level="warning",
        message="Diagnostic trouble code reported",
    ),
)


def parse_rules(document: object) -> tuple[AlertRule, ...]:
    """Validate a `PUT /api/alert-rules` body: `{"rules": [...]}` or a bare list."""
    if isinstance(document, dict) and "rules" in document:
        document = document["rules"]
    if not isinstance(document, list):
        raise RuleError("rules: expected an array of rule objects")
    rules = []
    codes: set[str] = set()
    for index, raw in enumerate(document):
        where = f"rules[{index}]"
        if not isinstance(raw, dict):
            raise RuleError(f"{where}: expected an object")
        for key in ("code", "metric", "op", "level", "message"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise RuleError(f"{where}.{key}: expected a non-empty string")
        threshold = raw.get("threshold")
        if type(threshold) not in (int, float) or threshold != threshold:
            raise RuleError(f"{where}.threshold: expected a number")
        if raw["op"] not in OPERATORS:
            raise RuleError(f"{where}.op: expected one of {', '.join(OPERATORS)}")
        if raw["level"] not in LEVELS:
            raise RuleError(f"{where}.level: expected one of {', '.join(LEVELS)}")
        if not METRIC_NAME.fullmatch(raw["metric"]):
            raise RuleError(f"{where}.metric: not a valid metric name")
        if raw["code"] in codes:
            raise RuleError(f"{where}.code: duplicate code {raw['code']!r}")
        codes.add(raw["code"])
        rules.append(
            AlertRule(
                code=raw["code"],
                metric=raw["metric"],
                op=raw["op"],
                threshold=float(threshold),
                level=raw["level"],
                message=raw["message"][:500],
            )
        )
    return tuple(rules)


@attrs.frozen
class Firing:
    rule: AlertRule
    value: object


@attrs.define(eq=False)
class AlertEvaluator:
    """Edge-triggered rule evaluation per device."""

    _by_metric: dict[str, tuple[AlertRule, ...]] = attrs.field(factory=dict)
    _holding: dict[tuple[str, str], bool] = attrs.field(factory=dict)
    rules: tuple[AlertRule, ...] = ()

    def set_rules(self, rules: Iterable[AlertRule]) -> None:
        self.rules = tuple(rules)
        index: dict[str, list[AlertRule]] = {}
        for rule in self.rules:
            index.setdefault(rule.metric, []).append(rule)
        self._by_metric = {metric: tuple(group) for metric, group in index.items()}
        self._holding.clear()

    def evaluate(self, device_id: str, data: dict[str, Any]) -> list[Firing] | None:
        """Rules that start to hold with this sample (None, the common case, for none)."""
        by_metric = self._by_metric
        if by_metric.keys().isdisjoint(data):
            return None  # the common case: no rule watches any metric of this sample
        fired: list[Firing] | None = None
        for metric, value in data.items():
            rules = by_metric.get(metric)
            if rules is None:
                continue
            for rule in rules:
                key = (device_id, rule.code)
                now_holds = rule.holds(value)
                if now_holds and not self._holding.get(key, False):
                    if fired is None:
                        fired = []
                    fired.append(Firing(rule, value))
                if now_holds:
                    self._holding[key] = True
                else:
                    self._holding.pop(key, None)
        return fired

    def forget(self, device_id: str) -> None:
        for key in [k for k in self._holding if k[0] == device_id]:
            del self._holding[key]
