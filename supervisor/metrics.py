"""The supervisor's OpenTelemetry metrics: its node's resources, its slots and its active alerts.

Every instrument is an observable gauge read at scrape time from what the supervisor already keeps
(the latest resource sample, the engine's slots, the alerter's active alerts), so nothing is
recorded per task. Callbacks run on the exporter's HTTP thread and only read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics as otel

if TYPE_CHECKING:
    from herder.supervisor.app import Supervisor


class SupervisorMetrics:
    """The supervisor's gauges, registered once on the global MeterProvider."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        meter = otel.get_meter("herder.supervisor")
        gauges = (
            ("herder.node.cpu.utilization", self._cpu, "1", "CPU in use on the node, 0 to 1"),
            ("herder.node.memory.usage", self._memory_used, "By", "Memory in use on the node"),
            ("herder.node.memory.limit", self._memory_total, "By", "Memory of the node"),
            ("herder.node.disk.usage", self._disk_used, "By", "Disk in use on the sampled filesystem"),
            ("herder.node.disk.limit", self._disk_total, "By", "Size of the sampled filesystem"),
            ("herder.handler.cpu.utilization", self._handler_cpu, "1", "CPU the handler process uses, 0 to 1"),
            ("herder.handler.memory.usage", self._handler_rss, "By", "Resident memory of the handler process"),
            ("herder.supervisor.slots.busy", self._busy, "{slot}", "Attempts held (running or unacknowledged)"),
            ("herder.supervisor.slots.limit", self._slots, "{slot}", "Attempts the supervisor runs at once"),
            ("herder.supervisor.alerts.active", self._alerts, "{alert}", "Active alerts, by alert name"),
        )
        for name, callback, unit, description in gauges:
            meter.create_observable_gauge(name, [callback], unit=unit, description=description)

    def _sample(self, field: str, scale: float = 1.0) -> Iterable[otel.Observation]:
        sample = self._supervisor.resources.latest
        if sample is None:
            return []
        return [otel.Observation(getattr(sample, field) * scale)]

    def _cpu(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return self._sample("cpu_percent", 0.01)

    def _memory_used(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return self._sample("memory_used_bytes")

    def _memory_total(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return self._sample("memory_total_bytes")

    def _disk_used(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return self._sample("disk_used_bytes")

    def _disk_total(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return self._sample("disk_total_bytes")

    def _handler_cpu(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        sample = self._supervisor.resources.latest
        # Only once the handler's process is known: a 0 would read as an idle handler.
        return [] if sample is None or not sample.handler_pid else self._sample("handler_cpu_percent", 0.01)

    def _handler_rss(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        sample = self._supervisor.resources.latest
        return [] if sample is None or not sample.handler_pid else self._sample("handler_rss_bytes")

    def _busy(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        try:
            return [otel.Observation(self._supervisor.engine.running)]
        except RuntimeError:  # the attempts changed under this thread's count: the next scrape has it
            return []

    def _slots(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return [otel.Observation(self._supervisor.engine.slots)]

    def _alerts(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        # Every enabled rule has a series (0 when quiet), so an alert's absence is visible too.
        active = Counter(alert.name for alert in list(self._supervisor.alerter.active))
        names = {rule.name for rule in self._supervisor.config.alert_rules if rule.enabled} | set(active)
        return [otel.Observation(active[name], {"alert": name}) for name in sorted(names)]
