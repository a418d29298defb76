"""The alert rules (herder.clients.alerts) on a driven clock: each raised once, held, not flapping, cleared once."""

from __future__ import annotations

import dataclasses

import pytest

from herder.clients import alerts
from herder.clients.alerts import DEFAULT_RULES, Alert, AlertEvaluator, AlertRule, parse_alert_overrides
from herder.clients.proto.v1 import supervisor_pb2
from herder.supervisor.alerting import MAX_QUEUED, Alerter, FellBehind

pytestmark = pytest.mark.timeout(10)

RULES = {rule.name: rule for rule in DEFAULT_RULES}


def _drive(rule: AlertRule, values: list[float | None], step: float = 1.0) -> list[tuple[float, Alert]]:
    """Evaluate `rule` on one value per `step` seconds; every change with the time it happened."""
    evaluator = AlertEvaluator([rule], wall_clock=lambda: 1_700_000_000.0)
    changes = []
    for i, value in enumerate(values):
        now = i * step
        changes += [(now, change) for change in evaluator.evaluate({rule.name: value}, now)]
    return changes


def _kinds(changes: list[tuple[float, Alert]]) -> list[str]:
    return ["resolve" if a.resolve_time is not None else "raise" for _, a in changes]


def _high_low(rule: AlertRule) -> tuple[float, float, float, float]:
    """A value above the threshold, one inside the hysteresis band, one below clear, and the longer wait."""
    above = rule.threshold + (0.02 if rule.unit == alerts.FRACTION else 2.0)
    band = (rule.threshold + rule.clear) / 2
    below = rule.clear / 2
    return above, band, below, max(rule.for_, rule.clear_for)


@pytest.mark.parametrize("name", sorted(RULES))
def test_raised_once_held_and_cleared_once(name: str) -> None:
    rule = RULES[name]
    above, _, below, wait = _high_low(rule)
    steps = int(wait) + 5
    changes = _drive(rule, [above] * (steps * 2) + [below] * (steps * 2))
    assert _kinds(changes) == ["raise", "resolve"]
    (raised_at, raised), (cleared_at, cleared) = changes
    assert raised_at == rule.for_  # held for `for`, not sooner
    assert cleared_at == steps * 2 + rule.clear_for
    assert raised.id == cleared.id and raised.name == name and raised.severity == rule.severity
    assert raised.resolve_time is None and cleared.resolve_time is not None


@pytest.mark.parametrize("name", sorted(RULES))
def test_no_flapping_around_the_threshold(name: str) -> None:
    rule = dataclasses.replace(RULES[name], for_=0.0, clear_for=0.0)
    above, band, _, _ = _high_low(rule)
    # Hovering between the clear level and the threshold after raising: never resolved, never raised again.
    changes = _drive(rule, [above, band, above, band, above, band] * 5)
    assert _kinds(changes) == ["raise"]


@pytest.mark.parametrize("name", ["memory_pressure", "cpu_saturation", "disk_almost_full"])
def test_a_short_spike_does_not_raise(name: str) -> None:
    rule = RULES[name]
    above, _, below, _ = _high_low(rule)
    spike = int(rule.for_) - 1
    assert _drive(rule, ([above] * spike + [below]) * 5) == []


def test_a_short_dip_does_not_clear() -> None:
    rule = RULES["handler_unreachable"]
    # Down 10 s: raised. Up for 3 s (less than clear_for), down again, up for good: one raise, one resolve.
    values: list[float | None] = [float(i) for i in range(12)] + [0.0] * 3 + [1.0, 2.0] + [0.0] * 10
    assert _kinds(_drive(rule, values)) == ["raise", "resolve"]


def test_unknown_values_change_nothing() -> None:
    rule = dataclasses.replace(RULES["memory_pressure"], for_=2.0)
    above, _, _, _ = _high_low(rule)
    # A missing sample restarts the wait: two above, none, two above is not three in a row.
    assert _drive(rule, [above, above, None, above, above]) == []
    assert _kinds(_drive(rule, [above, above, above, None, None])) == ["raise"]


def test_disabled_rule_is_not_evaluated() -> None:
    (rule,) = [r for r in parse_alert_overrides(["cpu_saturation.enabled=false"]) if r.name == "cpu_saturation"]
    assert _drive(rule, [1.0] * 200) == []


def test_message_names_the_value_and_threshold() -> None:
    rule = RULES["disk_almost_full"]
    (_, alert), *_ = _drive(rule, [0.97] * 100)
    assert "97%" in alert.message and "90%" in alert.message and "60s" in alert.message


def test_overrides() -> None:
    rules = {
        r.name: r
        for r in parse_alert_overrides(
            [
                "memory_pressure.threshold=80%",
                "cpu_saturation.for=2m",
                "cpu_saturation.clear_for=500ms",
                "disk_almost_full.enabled=false",
                "heartbeat_lag.threshold=2s",
                "handler_unreachable.severity=WARNING",
            ]
        )
    }
    assert rules["memory_pressure"].threshold == 0.8 and 0.75 < rules["memory_pressure"].clear < 0.8
    assert rules["cpu_saturation"].for_ == 120.0 and rules["cpu_saturation"].clear_for == 0.5
    assert not rules["disk_almost_full"].enabled
    assert rules["heartbeat_lag"].threshold == 2.0 and rules["heartbeat_lag"].clear == 1.0  # the band keeps its shape
    assert rules["handler_unreachable"].severity == "warning"
    assert parse_alert_overrides([]) == DEFAULT_RULES


@pytest.mark.parametrize(
    ("override", "complaint"),
    [
        ("nosuch.threshold=1", "unknown alert 'nosuch'"),
        ("memory_pressure.limit=1", "unknown field memory_pressure.limit"),
        ("memory_pressure.threshold=1.5", "must be 0 to 1"),
        ("memory_pressure.threshold=lots", "must be a fraction"),
        ("memory_pressure.clear=0.95", "must not be above its threshold"),
        ("cpu_saturation.for=-1", "must be seconds"),
        ("cpu_saturation.for=soon", "must be seconds"),
        ("cpu_saturation.enabled=maybe", "must be true or false"),
        ("cpu_saturation.severity=page", "severity must be one of"),
        ("cpu_saturation", "is not NAME.FIELD=VALUE"),
    ],
)
def test_bad_overrides_are_named(override: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        parse_alert_overrides([override])


def test_validate_bounds_what_heartbeats_carry() -> None:
    rule = dataclasses.replace(RULES["memory_pressure"], for_=0.0)
    (_, alert), *_ = _drive(rule, [0.99])
    good = alerts.to_proto(alert)
    assert alerts.validate(good) == ""
    assert good.severity == supervisor_pb2.ALERT_SEVERITY_WARNING
    for broken, complaint in [
        (supervisor_pb2.Alert(name="x", severity=2), "id"),
        (supervisor_pb2.Alert(id="a", name="x" * 65, severity=2), "name"),
        (supervisor_pb2.Alert(id="a", name="x", severity=2, message="m" * 1025), "message"),
        (supervisor_pb2.Alert(id="a", name="x"), "severity"),
        (supervisor_pb2.Alert(id="a", name="x", severity=2), "raise_time"),
    ]:
        assert complaint in alerts.validate(broken)
    resolved = alerts.to_proto(dataclasses.replace(alert, resolve_time=alert.raise_time + 1))
    assert "resolved" in alerts.validate(resolved)


async def test_a_reader_that_falls_behind_is_ended_not_buffered() -> None:
    level = {"memory_pressure": 0.0}
    rule = dataclasses.replace(RULES["memory_pressure"], for_=0.0, clear_for=0.0)
    alerter = Alerter([rule], lambda: (dict(level), {}))
    stream = alerter.watch()
    level["memory_pressure"] = 1.0
    alerter.tick(0.0)
    assert (await anext(stream)).resolve_time is None  # registered, reading
    for i in range(MAX_QUEUED + 1):  # raise, resolve, ... while the reader reads nothing
        level["memory_pressure"] = 0.0 if i % 2 == 0 else 1.0
        alerter.tick(float(i + 1))
    with pytest.raises(FellBehind):
        await anext(stream)
    assert alerter.watchers == 0 and alerter.raised["memory_pressure"] == MAX_QUEUED // 2 + 1
