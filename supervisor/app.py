"""The supervisor: a SessionEngine whose attempts run on a handler service, plus its admin API.

Start: Describe the handler (until it answers), then register its task types and serve them
over the same Connect protocol as the Python Worker (clients/engine.py). While the handler does
not answer, new assignments are declined (the coordinator re-queues them after its ack timeout)
and resumed once it answers again. SIGTERM, SIGINT or the admin Drain: stop taking tasks, let
running ones finish within the grace period, cancel the rest, exit. Alerts (supervisor/alerting.py)
judge the resource samples, the handler's and the coordinator's silence and overdue attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass

from herder.clients import alerts
from herder.clients.alerts import DEFAULT_RULES, AlertRule
from herder.clients.endpoints import Endpoints
from herder.clients.engine import SessionEngine, WorkerSettings
from herder.clients.proto.v1 import task_pb2
from herder.clients.resources import ResourceSampler, ResourceSettings
from herder.supervisor.admin import AdminServer, Status
from herder.supervisor.alerting import Alerter
from herder.supervisor.handler import HandlerRunner, HandlerSettings

_log = logging.getLogger("herder.supervisor")


@dataclass(frozen=True, slots=True)
class SupervisorConfig:
    """The supervisor's flags (see `herder supervisor --help`)."""

    coordinator: str
    handler: str
    slots: int
    node_id: str | None = None
    listen: str = ""
    shutdown_grace: float = 30.0
    # The handler's process, whose CPU and RSS are sampled beside the node's; None: the node's only.
    handler_pid: int | None = None
    resource_interval: float = 1.0
    disk_path: str = "."
    # Offered to tasks' resource requests; 0 for what the resource samples say.
    capacity_cpu_millis: int = 0
    capacity_memory_bytes: int = 0
    # The alert rules (herder.clients.alerts.parse_alert_overrides builds them from NAME.FIELD=VALUE).
    alert_rules: tuple[AlertRule, ...] = DEFAULT_RULES
    # HOST:PORT of the Prometheus scrape endpoint; "" for none.
    metrics: str = ""


class Supervisor:
    """One supervisor process: run() until drained. Create it inside the event loop that runs it."""

    def __init__(
        self,
        config: SupervisorConfig,
        settings: WorkerSettings | None = None,
        handler_settings: HandlerSettings | None = None,
    ) -> None:
        self.config = config
        self._settings = settings or WorkerSettings(shutdown_grace=config.shutdown_grace)
        self.handler = HandlerRunner(config.handler, handler_settings, on_change=self._on_handler_change)
        self.resources = ResourceSampler(
            ResourceSettings(
                interval=config.resource_interval, disk_path=config.disk_path, handler_pid=config.handler_pid
            )
        )
        # Ticks no slower than the samples come, and at least every second for the time-based rules.
        self.alerter = Alerter(config.alert_rules, self._measure, interval=min(config.resource_interval, 1.0))
        self.engine = SessionEngine(
            Endpoints(config.coordinator),
            self.handler,
            worker_id=config.node_id,
            slots=config.slots,
            settings=self._settings,
            logger=_log,
            resources=self.resources,
            capacity=task_pb2.Resources(
                cpu_millis=config.capacity_cpu_millis, memory_bytes=config.capacity_memory_bytes
            ),
            alerts=self.alerter.active_protos,
        )
        self.admin: AdminServer | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._describing: asyncio.Task[None] | None = None

    def status(self) -> Status:
        engine = self.engine
        return Status(
            worker_id=engine.worker_id,
            session_id=engine.session_id or "",
            coordinator_address=engine.address or "",
            connected=engine.session_id is not None,
            draining=engine.draining,
            slots=engine.slots,
            running=engine.running,
            task_types=tuple(self.handler.task_types()),
            handler_available=self.handler.available,
            resources=self.resources.latest,
            alerts=tuple(alerts.to_proto(a) for a in self.alerter.active),
            alerts_raised=dict(self.alerter.raised),
            attempts=tuple(engine.held()),
        )

    def _measure(self) -> tuple[dict[str, float | None], dict[str, str]]:
        """What the alert rules judge, now (see herder.clients.alerts for each rule)."""
        values: dict[str, float | None] = {}
        detail: dict[str, str] = {}
        sample = self.resources.latest
        if sample is not None:
            if sample.memory_total_bytes:
                values[alerts.MEMORY_PRESSURE] = sample.memory_used_bytes / sample.memory_total_bytes
            values[alerts.CPU_SATURATION] = sample.cpu_percent / 100.0
            if sample.disk_total_bytes:
                values[alerts.DISK_ALMOST_FULL] = sample.disk_used_bytes / sample.disk_total_bytes
        overdue = self.engine.overdue()
        values[alerts.ATTEMPT_PAST_TIMEOUT] = overdue[0][1] if overdue else 0.0
        if overdue:
            more = f" and {len(overdue) - 1} more" if len(overdue) > 1 else ""
            detail[alerts.ATTEMPT_PAST_TIMEOUT] = f"attempt {overdue[0][0]}{more}"
        since = self.handler.unavailable_since
        values[alerts.HANDLER_UNREACHABLE] = 0.0 if since is None else time.monotonic() - since
        detail[alerts.HANDLER_UNREACHABLE] = f"at {self.config.handler}"
        values[alerts.HEARTBEAT_LAG] = self.engine.coordinator_silence()
        detail[alerts.HEARTBEAT_LAG] = f"at {self.engine.address or self.config.coordinator}"
        return values, detail

    async def drain(self) -> int:
        """Start the staged shutdown (as SIGTERM does); returns the attempts running when it began."""
        running = self.engine.running
        if self._describing is not None:
            self._describing.cancel()  # still waiting for the handler: nothing to drain, just stop
        if self._shutdown is None:
            _log.info("supervisor %s: drain requested", self.engine.worker_id)
            self._shutdown = asyncio.create_task(self.engine.shutdown(), name="herder-supervisor-drain")
        return running

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or Drain has drained the supervisor.

        Raises ValueError for a handler serving no task types, OSError for an admin address that
        cannot be bound, and the HerderError of a coordinator rejection retrying cannot fix.
        """
        # Sampled from the start, before the handler answers: the admin API shows the node meanwhile.
        sampling = asyncio.create_task(self.resources.run(), name="herder-supervisor-resources")
        alerting = asyncio.create_task(self.alerter.run(), name="herder-supervisor-alerts")
        try:
            await self._run()
        finally:
            sampling.cancel()
            alerting.cancel()
            await asyncio.wait({sampling, alerting})

    async def _run(self) -> None:
        if self.config.listen:
            self.admin = AdminServer(
                self.config.listen, self.status, self.drain, sampler=self.resources, alerter=self.alerter
            )
            await self.admin.start()
            _log.info("supervisor admin API on port %d", self.admin.port)
        loop = asyncio.get_running_loop()
        # Until the engine runs (Describe may wait for the handler), a signal simply stops the wait.
        describing = self._describing = asyncio.create_task(self.handler.describe())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, describing.cancel)
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                await describing
            except asyncio.CancelledError:
                if describing.cancelled():
                    _log.info("supervisor stopped before the handler answered")
                    return
                raise
            finally:
                self._describing = None
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            self._follow_handler_pid()
            watcher = asyncio.create_task(self.handler.watch(), name="herder-supervisor-handler-watch")
            _log.info(
                "supervisor %s: %d slots for %s, coordinator %s",
                self.engine.worker_id,
                self.engine.slots,
                ", ".join(self.handler.task_types()),
                self.config.coordinator,
            )
            await self.engine.run(install_signal_handlers=True)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait({watcher})
            if self._shutdown is not None:
                with contextlib.suppress(Exception):
                    await self._shutdown
            if self.admin is not None:
                await self.admin.stop()
            await self.handler.close()

    def _follow_handler_pid(self) -> None:
        # --handler-pid wins; otherwise the pid the handler's Describe gave, which changes when it restarts.
        if self.config.handler_pid is None:
            self.resources.follow_handler(self.handler.pid)

    def _on_handler_change(self, available: bool, why: str) -> None:
        if available:
            self._follow_handler_pid()
            self.engine.resume()
        else:
            self.engine.pause(f"the handler at {self.config.handler} does not answer ({why})")


__all__ = ["Supervisor", "SupervisorConfig"]
