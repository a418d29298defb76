"""Alert rules and their evaluation: pure, clocked by the caller, so every rule is unit-testable.

The one rule: an alert is raised once and resolved once. A rule measures one number (a used
fraction, or seconds something has lasted). It raises when the number has stayed at or above
`threshold` for `for_` seconds, and resolves when it has stayed below `clear` for `clear_for`
seconds; `clear` below `threshold` is the hysteresis band, so a number wandering around the
threshold neither raises nor resolves again. An unknown number (no sample yet) changes nothing.

Rules are configured as NAME.FIELD=VALUE overrides of DEFAULT_RULES (parse_alert_overrides), so
any settings loader (flags, HERDER_* variables, TOML) can hand over the same strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from herder.clients.proto.v1 import supervisor_pb2

# The rule names; what each measures is in DEFAULT_RULES' `measures`.
MEMORY_PRESSURE = "memory_pressure"
CPU_SATURATION = "cpu_saturation"
DISK_ALMOST_FULL = "disk_almost_full"
ATTEMPT_PAST_TIMEOUT = "attempt_past_timeout"
HANDLER_UNREACHABLE = "handler_unreachable"
HEARTBEAT_LAG = "heartbeat_lag"

SEVERITIES = ("info", "warning", "critical")
# What a rule's number is: a fraction 0..1 (shown as a percentage) or a number of seconds.
FRACTION = "fraction"
SECONDS = "seconds"


@dataclass(frozen=True, slots=True)
class AlertRule:
    """One rule: raise at value >= threshold held `for_` seconds, resolve at value < clear held `clear_for` seconds."""

    name: str
    measures: str
    unit: str
    threshold: float
    clear: float
    for_: float
    clear_for: float
    severity: str = "warning"
    enabled: bool = True

    def problems(self) -> list[str]:
        """What is wrong with this rule's values (empty when it is valid)."""
        found = []
        if self.unit == FRACTION:
            for what, value in (("threshold", self.threshold), ("clear", self.clear)):
                if not 0.0 <= value <= 1.0:
                    found.append(f"{self.name}.{what} must be a fraction 0 to 1 (or 0% to 100%), got {value:g}")
        elif self.threshold < 0 or self.clear < 0:
            found.append(f"{self.name}: threshold and clear must be >= 0 seconds")
        if self.clear > self.threshold:
            found.append(f"{self.name}.clear ({self.clear:g}) must not be above its threshold ({self.threshold:g})")
        if self.for_ < 0 or self.clear_for < 0:
            found.append(f"{self.name}: for and clear_for must be >= 0 seconds")
        if self.severity not in SEVERITIES:
            found.append(f"{self.name}.severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        return found

    def show(self, value: float) -> str:
        return f"{value * 100:.0f}%" if self.unit == FRACTION else f"{value:.3g}s"


DEFAULT_RULES: tuple[AlertRule, ...] = (
    AlertRule(MEMORY_PRESSURE, "memory in use (total minus available)", FRACTION, 0.90, 0.85, 30.0, 30.0),
    AlertRule(CPU_SATURATION, "the node's CPU use", FRACTION, 0.95, 0.85, 60.0, 30.0),
    AlertRule(DISK_ALMOST_FULL, "the sampled filesystem's use", FRACTION, 0.90, 0.85, 60.0, 60.0, "critical"),
    AlertRule(ATTEMPT_PAST_TIMEOUT, "how long an attempt has run past its timeout", SECONDS, 10.0, 1.0, 0.0, 0.0),
    AlertRule(HANDLER_UNREACHABLE, "how long the handler has not answered", SECONDS, 10.0, 1.0, 0.0, 5.0, "critical"),
    AlertRule(HEARTBEAT_LAG, "how long the coordinator has not been heard", SECONDS, 10.0, 5.0, 0.0, 5.0, "critical"),
)

# Bounds on the alerts a heartbeat carries (one per rule today), checked by the coordinator.
MAX_HEARTBEAT_ALERTS = 32
MAX_ID_CHARS = 128
MAX_NAME_CHARS = 64
MAX_MESSAGE_CHARS = 1024

_SEVERITY = {
    "info": supervisor_pb2.ALERT_SEVERITY_INFO,
    "warning": supervisor_pb2.ALERT_SEVERITY_WARNING,
    "critical": supervisor_pb2.ALERT_SEVERITY_CRITICAL,
}

_FIELDS = ("enabled", "threshold", "clear", "for", "clear_for", "severity")
_OVERRIDE = re.compile(r"^([a-z_]+)\.([a-z_]+)=(.*)$")
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_alert_overrides(
    overrides: Iterable[str], rules: Iterable[AlertRule] = DEFAULT_RULES
) -> tuple[AlertRule, ...]:
    """The rules with NAME.FIELD=VALUE overrides applied (e.g. memory_pressure.threshold=80%).

    Fields: enabled (true/false), threshold and clear (a fraction 0.8 or 80% for resource rules,
    seconds for the others), for and clear_for (seconds: 30, 30s, 500ms, 2m), severity
    (info/warning/critical). Setting threshold alone moves clear in proportion (90%/85% -> 80%/75.6%).
    Raises ValueError naming every bad override in one message.
    """
    by_name = {rule.name: rule for rule in rules}
    problems = []
    for raw in overrides:
        text = raw.strip()
        if not text:
            continue
        match = _OVERRIDE.match(text)
        if match is None:
            problems.append(f"{text!r} is not NAME.FIELD=VALUE")
            continue
        name, field, value = match.groups()
        rule = by_name.get(name)
        if rule is None:
            problems.append(f"unknown alert {name!r} (known: {', '.join(by_name)})")
            continue
        if field not in _FIELDS:
            problems.append(f"unknown field {name}.{field} (known: {', '.join(_FIELDS)})")
            continue
        try:
            by_name[name] = _override(rule, field, value.strip())
        except ValueError as exc:
            problems.append(f"{name}.{field}: {exc}")
    if not problems:  # a value that did not parse would be reported twice
        for rule in by_name.values():
            problems.extend(rule.problems())
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(by_name.values())


def _override(rule: AlertRule, field: str, value: str) -> AlertRule:
    if field == "enabled":
        if value.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"must be true or false, got {value!r}")
        return dataclasses.replace(rule, enabled=value.lower() in ("true", "1", "yes", "on"))
    if field == "severity":
        return dataclasses.replace(rule, severity=value.lower())
    if field in ("for", "clear_for"):
        seconds = _duration(value)
        if field == "for":
            return dataclasses.replace(rule, for_=seconds)
        return dataclasses.replace(rule, clear_for=seconds)
    number = _fraction(value) if rule.unit == FRACTION else _duration(value)
    if field == "clear":
        return dataclasses.replace(rule, clear=number)
    # The clear level moves in proportion: the hysteresis band keeps its shape (10s/5s -> 2s/1s).
    ratio = rule.clear / rule.threshold if rule.threshold else 1.0
    return dataclasses.replace(rule, threshold=number, clear=number * ratio)


def _fraction(text: str) -> float:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"must be a fraction (0.8) or a percentage (80%), got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"must be 0 to 1 (0% to 100%), got {text!r}")
    return value


def _duration(text: str) -> float:
    match = _DURATION.match(text.lower())
    if match is None:
        raise ValueError(f"must be seconds (30, 30s, 500ms, 2m), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Alert:
    """One raised alert; resolve_time (wall clock) is set on its resolution."""

    id: str
    name: str
    severity: str
    message: str
    raise_time: float
    resolve_time: float | None = None


@dataclass(slots=True)
class _State:
    alert: Alert | None = None
    # Monotonic time the value crossed (up while inactive, down while active); None when it has not.
    since: float | None = None


class AlertEvaluator:
    """Applies the enabled rules to measured values; holds which alerts are active.

    `wall_clock` stamps raise and resolve times (time.time by default); durations are measured
    on the `now` each evaluate() is given, so tests drive time themselves.
    """

    def __init__(self, rules: Iterable[AlertRule], wall_clock: Callable[[], float] = time.time) -> None:
        self.rules = {rule.name: rule for rule in rules if rule.enabled}
        self._wall = wall_clock
        self._states = {name: _State() for name in self.rules}

    @property
    def active(self) -> list[Alert]:
        return [s.alert for s in self._states.values() if s.alert is not None]

    def evaluate(
        self, values: Mapping[str, float | None], now: float, detail: Mapping[str, str] | None = None
    ) -> list[Alert]:
        """The alerts raised or resolved by these values at monotonic time `now` (resolved ones have resolve_time).

        `values` maps rule names to measurements; a rule missing or None keeps its state and its
        pending timer restarts. `detail` adds a rule's context to its raise message (which attempt).
        """
        changes = []
        for name, rule in self.rules.items():
            value = values.get(name)
            state = self._states[name]
            if value is None or not math.isfinite(value):
                state.since = None
                continue
            if state.alert is None:
                crossed, wait = value >= rule.threshold, rule.for_
            else:
                crossed, wait = value < rule.clear, rule.clear_for
            if not crossed:
                state.since = None
                continue
            if state.since is None:
                state.since = now
            if now - state.since < wait:
                continue
            state.since = None
            if state.alert is None:
                extra = f": {detail[name]}" if detail and detail.get(name) else ""
                message = (
                    f"{rule.measures} is {rule.show(value)}, at or above {rule.show(rule.threshold)}"
                    + (f" for {rule.for_:g}s" if rule.for_ else "")
                    + extra
                )
                state.alert = Alert(f"{name}-{uuid.uuid4().hex[:12]}", name, rule.severity, message, self._wall())
                changes.append(state.alert)
            else:
                changes.append(dataclasses.replace(state.alert, resolve_time=self._wall()))
                state.alert = None
        return changes


def to_proto(alert: Alert) -> supervisor_pb2.Alert:
    message = supervisor_pb2.Alert(
        id=alert.id, name=alert.name, severity=_SEVERITY[alert.severity], message=alert.message[:MAX_MESSAGE_CHARS]
    )
    message.raise_time.FromNanoseconds(int(alert.raise_time * 1e9))
    if alert.resolve_time is not None:
        message.resolve_time.FromNanoseconds(int(alert.resolve_time * 1e9))
    return message


def validate(alert: supervisor_pb2.Alert) -> str:
    """Why an active alert from a heartbeat is unacceptable ("" when it is fine); bounds, not an exact check."""
    if not 1 <= len(alert.id) <= MAX_ID_CHARS:
        return f"alert id must be 1 to {MAX_ID_CHARS} characters"
    if not 1 <= len(alert.name) <= MAX_NAME_CHARS:
        return f"alert {alert.id}: name must be 1 to {MAX_NAME_CHARS} characters"
    if len(alert.message) > MAX_MESSAGE_CHARS:
        return f"alert {alert.id}: message is longer than {MAX_MESSAGE_CHARS} characters"
    if alert.severity not in _SEVERITY.values():
        return f"alert {alert.id}: severity {alert.severity} is not info, warning or critical"
    if not alert.HasField("raise_time"):
        return f"alert {alert.id}: raise_time is not set"
    if alert.HasField("resolve_time"):
        return f"alert {alert.id}: a resolved alert is not active"
    return ""


__all__ = [
    "ATTEMPT_PAST_TIMEOUT",
    "CPU_SATURATION",
    "DEFAULT_RULES",
    "DISK_ALMOST_FULL",
    "HANDLER_UNREACHABLE",
    "HEARTBEAT_LAG",
    "MAX_HEARTBEAT_ALERTS",
    "MEMORY_PRESSURE",
    "SEVERITIES",
    "Alert",
    "AlertEvaluator",
    "AlertRule",
    "parse_alert_overrides",
    "to_proto",
    "validate",
]
