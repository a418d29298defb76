"""The supervisor's alerts: the rules of herder.clients.alerts applied every tick to what it measures.

Each tick reads the latest resource sample, the engine (coordinator silence, overdue attempts)
and the handler runner (how long it has not answered), and evaluates the rules. Each raise is
logged once as a warning and counted, each resolution logged once at info; both go to every
WatchAlerts stream, and the active alerts ride on every heartbeat to the coordinator.

A stream's backlog is bounded (MAX_QUEUED): a reader that falls that far behind is ended, told
why, rather than let its queue grow; watching again starts with the active alerts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from herder.clients import alerts
from herder.clients.alerts import Alert, AlertEvaluator, AlertRule
from herder.clients.proto.v1 import supervisor_pb2

_log = logging.getLogger("herder.supervisor.alerts")

# Six rules raise and resolve at most once a tick each: 256 is minutes of a reader not reading.
MAX_QUEUED = 256


class FellBehind(Exception):
    """A WatchAlerts reader let MAX_QUEUED changes pile up; its stream ends."""


class _Watcher:
    def __init__(self) -> None:
        self.queue: collections.deque[Alert] = collections.deque()
        self.wake = asyncio.Event()
        self.behind = False

    def put(self, alert: Alert) -> None:
        if len(self.queue) >= MAX_QUEUED:
            self.behind = True
            self.queue.clear()  # nothing more is read: free it now
        else:
            self.queue.append(alert)
        self.wake.set()


class Alerter:
    """Evaluates `rules` every `interval` seconds while run() runs, on what `measure()` returns.

    `measure()` gives each rule's current value (None: unknown) and optional detail text.
    """

    def __init__(
        self,
        rules: Iterable[AlertRule],
        measure: Callable[[], tuple[dict[str, float | None], dict[str, str]]],
        interval: float = 1.0,
    ) -> None:
        self._evaluator = AlertEvaluator(rules)
        self._measure = measure
        self.interval = interval
        self.raised: collections.Counter[str] = collections.Counter()
        self.resolved: collections.Counter[str] = collections.Counter()
        self._watchers: set[_Watcher] = set()
        self._active_protos: list[supervisor_pb2.Alert] = []

    @property
    def active(self) -> list[Alert]:
        return sorted(self._evaluator.active, key=lambda a: a.raise_time)

    def active_protos(self) -> list[supervisor_pb2.Alert]:
        """The active alerts as sent with heartbeats (rebuilt only when they change)."""
        return self._active_protos

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def tick(self, now: float | None = None) -> list[Alert]:
        """Evaluate once; log, count and publish what changed."""
        values, detail = self._measure()
        changes = self._evaluator.evaluate(values, time.monotonic() if now is None else now, detail)
        for alert in changes:
            if alert.resolve_time is None:
                self.raised[alert.name] += 1
                _log.warning("alert %s raised (%s, %s): %s", alert.name, alert.severity, alert.id, alert.message)
            else:
                self.resolved[alert.name] += 1
                lasted = alert.resolve_time - alert.raise_time
                _log.info("alert %s resolved (%s) after %.1fs", alert.name, alert.id, lasted)
            for watcher in self._watchers:
                watcher.put(alert)
        if changes:
            self._active_protos = [alerts.to_proto(a) for a in self.active]
        return changes

    async def run(self) -> None:
        """Tick until cancelled; a failing tick is logged and the loop goes on."""
        while True:
            try:
                self.tick()
            except Exception:
                _log.exception("alert evaluation failed")
            await asyncio.sleep(self.interval)

    async def watch(self) -> AsyncIterator[Alert]:
        """The active alerts, then every raise and resolution; raises FellBehind when the reader lags too far."""
        watcher = _Watcher()
        # Registered before the snapshot: no change slips between them (both happen without awaiting).
        self._watchers.add(watcher)
        for alert in self.active:
            watcher.put(alert)
        try:
            while True:
                while watcher.queue:
                    yield watcher.queue.popleft()
                if watcher.behind:
                    raise FellBehind(f"more than {MAX_QUEUED} alert changes were not read; watch again")
                watcher.wake.clear()
                await watcher.wake.wait()
        finally:
            self._watchers.discard(watcher)


__all__ = ["MAX_QUEUED", "Alerter", "FellBehind"]
