"""The coordinator's OpenTelemetry metrics and its one log line per task state change.

Gauges (backlog and running per queue, sessions, leadership, watch subscribers) are observed at
scrape time from the leader's memory, so they cost nothing per task. Counters (dict increments
observed at scrape time) and histograms (herder.clients.metrics_setup.Histogram, plain lists) are
recorded where things happen, through `task_changed` (called for every task record the leader
writes) and a few direct calls; with no `--metrics` they are not created and each call site costs
one `is None` check. Labels are queue, task type and outcome: never a task id, whose number is
unbounded. Callbacks run on the exporter's HTTP thread: they only read (copies of) leader state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics as otel

from herder.clients import logs
from herder.clients.metrics_setup import histogram
from herder.clients.proto.v1 import task_pb2
from herder.server.entries import ACTIVE, TERMINAL, S
from herder.server.horizon import timestamp_seconds

if TYPE_CHECKING:
    from herder.server.app import Coordinator

# A separate logger, so the state-change lines can be turned down alone (`herder.tasks` at warning).
task_log = logging.getLogger("herder.tasks")

# Seconds: from milliseconds (an idle dispatch) to hours (a long task or a deep backlog).
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
_OPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Plain ints: an attribute of the protobuf enum wrapper costs ~0.4 us a lookup, and these are on the hot path.
_PENDING, _QUEUED, _RUNNING, _EXPIRED = (
    int(S.TASK_STATE_PENDING),
    int(S.TASK_STATE_QUEUED),
    int(S.TASK_STATE_RUNNING),
    int(S.TASK_STATE_EXPIRED),
)
_WAITING = frozenset({_PENDING, _QUEUED})

_NAMES: dict[int, str] = {
    S.TASK_STATE_PENDING: "pending",
    S.TASK_STATE_QUEUED: "queued",
    S.TASK_STATE_ASSIGNED: "assigned",
    S.TASK_STATE_RUNNING: "running",
    S.TASK_STATE_SUCCEEDED: "succeeded",
    S.TASK_STATE_FAILED: "failed",
    S.TASK_STATE_CANCELED: "canceled",
    S.TASK_STATE_EXPIRED: "expired",
}


class CoordinatorMetrics:
    """The instruments, created once from the global MeterProvider (see herder.clients.metrics_setup)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        meter = otel.get_meter("herder.server")
        # Per-task histograms are plain lists served beside the exporter (see herder.clients.metrics_setup).
        self.queue_wait = histogram(
            "herder_task_queue_wait_seconds", "Time a task waited queued before it was assigned", _SECONDS, ("queue",)
        )
        self.start_latency = histogram(
            "herder_task_start_latency_seconds",
            "Time from submission to the start of the attempt",
            _SECONDS,
            ("queue", "type"),
        )
        self.duration = histogram(
            "herder_task_duration_seconds",
            "Time from the last attempt's start (or assignment) to the task's end, by outcome",
            _SECONDS,
            ("queue", "type", "outcome"),
        )
        # Counted in plain dicts and observed at scrape time: an SDK counter's add costs ~5 us (its
        # attribute checks), a dict increment ~0.1 us, and these are on the hot path.
        self.finished = Counts("queue", "type", "outcome")
        self.retries = Counts("queue", "type")
        self.timeouts = Counts("queue", "type")
        self.expirations = Counts("queue", "type")
        self.leader_changes = Counts("namespace")
        for name, counts, unit, description in (
            ("herder.task.finished", self.finished, "{task}", "Tasks that reached a final state, by outcome"),
            ("herder.task.retries", self.retries, "{attempt}", "Failed attempts scheduled to run again"),
            ("herder.task.timeouts", self.timeouts, "{attempt}", "Attempts that ran past their timeout"),
            ("herder.task.expirations", self.expirations, "{task}", "Tasks that did not start within their ttl"),
            ("herder.leader.changes", self.leader_changes, "{change}", "Times this replica took office as leader"),
        ):
            meter.create_observable_counter(name, [counts.observe], unit=unit, description=description)
        self.commit_duration = histogram(
            "herder_etcd_commit_duration_seconds", "Duration of the leader's etcd transactions", _SECONDS
        )
        self.commit_ops = histogram("herder_etcd_commit_ops", "Writes per etcd transaction", _OPS)
        meter.create_observable_gauge(
            "herder.queue.backlog",
            [self._backlog],
            unit="{task}",
            description="Tasks waiting per queue: queued, or pending a delay or retry (leader only)",
        )
        meter.create_observable_gauge(
            "herder.queue.running",
            [self._running],
            unit="{task}",
            description="Tasks assigned or running per queue (leader only)",
        )
        meter.create_observable_gauge(
            "herder.worker.sessions", [self._sessions], unit="{session}", description="Worker sessions (leader only)"
        )
        meter.create_observable_gauge(
            "herder.leader.status", [self._leader_status], description="1 while this replica leads its namespace"
        )
        meter.create_observable_gauge(
            "herder.watch.subscribers", [self._subscribers], unit="{watcher}", description="WatchTasks streams open"
        )
        overload = coordinator.overload
        meter.create_observable_counter(
            "herder.overload.refused",
            [lambda _options: [otel.Observation(overload.refused)]],
            unit="{call}",
            description="Submissions refused with RESOURCE_EXHAUSTED because the coordinator was overloaded",
        )
        meter.create_observable_gauge(
            "herder.grpc.waiting_calls",
            [lambda _options: [otel.Observation(overload.waiting)]],
            unit="{call}",
            description="Calls waiting in gRPC to be picked up, at the last overload probe",
        )
        meter.create_observable_gauge(
            "herder.event_loop.lag",
            [lambda _options: [otel.Observation(overload.lag())]],
            unit="s",
            description="How far behind the coordinator's event loop runs",
        )

    # ----------------------------------------------------------------- observed at scrape time

    def _queues(self) -> dict[str, dict[int, int]]:
        leader = self._coordinator.leader
        return {} if leader is None else leader.book.snapshot()

    def _backlog(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        for queue, counts in self._queues().items():
            waiting = counts.get(S.TASK_STATE_QUEUED, 0) + counts.get(S.TASK_STATE_PENDING, 0)
            yield otel.Observation(waiting, {"queue": queue})

    def _running(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        for queue, counts in self._queues().items():
            active = counts.get(S.TASK_STATE_ASSIGNED, 0) + counts.get(S.TASK_STATE_RUNNING, 0)
            yield otel.Observation(active, {"queue": queue})

    def _sessions(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        leader = self._coordinator.leader
        return [otel.Observation(0 if leader is None else len(leader.workers.sessions))]

    def _leader_status(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        leader = self._coordinator.leader
        leads = leader is not None and not leader.deposed
        return [otel.Observation(int(leads), {"namespace": self._coordinator.config.namespace})]

    def _subscribers(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return [otel.Observation(len(self._coordinator.feed.hub))]

    # ----------------------------------------------------------------- recorded as it happens

    def task_changed(self, task: task_pb2.Task, previous: int, state: int) -> None:
        spec = task.spec
        if state == _RUNNING:
            self.start_latency.record(
                max(time.time() - timestamp_seconds(task.create_time), 0.0), spec.queue, spec.type
            )
        elif state in TERMINAL:
            outcome = _NAMES.get(state, "unknown")
            self.finished.add(spec.queue, spec.type, outcome)
            if previous in ACTIVE:
                began = task.start_time if task.HasField("start_time") else task.assign_time
                self.duration.record(max(time.time() - timestamp_seconds(began), 0.0), spec.queue, spec.type, outcome)
            if state == _EXPIRED:
                self.expirations.add(spec.queue, spec.type)
        elif previous in ACTIVE and state in _WAITING:
            self.retries.add(spec.queue, spec.type)


class Counts:
    """A counter by label values, added to on the event loop and read (copied) on the exporter's thread."""

    def __init__(self, *names: str) -> None:
        self._names = names
        self._values: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str) -> None:
        self._values[labels] = self._values.get(labels, 0) + 1

    def observe(self, _options: otel.CallbackOptions) -> Iterable[otel.Observation]:
        return [
            otel.Observation(n, dict(zip(self._names, labels, strict=True))) for labels, n in list(self._values.items())
        ]


# Set by `install` when the process serves --metrics; None otherwise, and call sites check it.
instruments: CoordinatorMetrics | None = None


def install(coordinator: Coordinator) -> CoordinatorMetrics:
    """Create the instruments (once the global MeterProvider is set) and route the recordings to them."""
    global instruments
    instruments = CoordinatorMetrics(coordinator)
    return instruments


def uninstall() -> None:
    global instruments
    instruments = None


def trace_id(task: task_pb2.Task) -> str:
    """The trace id of the task's W3C traceparent (version-traceid-parentid-flags), or ""."""
    parent = task.trace_context.get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def log_change(task: task_pb2.Task, previous: int, state: int) -> None:
    """One INFO line per state change of a task, its fields also given apart for the JSON format.

    A task assigned before its first write (dispatched at once) is written once, new and assigned:
    it gets both lines, "created" (as queued, attempt 0) and "assigned".
    """
    if not task_log.isEnabledFor(logging.INFO):
        return
    if not previous:
        if state in ACTIVE:
            _line(task, "created", task.attempt - 1, _QUEUED)
            _line(task, "assigned", task.attempt, state)
        else:
            _line(task, "created", task.attempt, state)
    elif previous in ACTIVE and state in _WAITING:
        _line(task, "retry_scheduled", task.attempt, state)
    else:
        _line(task, _NAMES.get(state, "unknown"), task.attempt, state)


def _line(task: task_pb2.Task, event: str, attempt: int, state: int) -> None:
    spec = task.spec
    task_id, kind, queue, trace = task.id, spec.type, spec.queue, trace_id(task)
    message = f"task {task_id} {event} attempt={attempt} type={kind} queue={queue} trace_id={trace or '-'}"
    handler = logs.direct(task_log)
    if handler is not None and not handler.json:
        handler.line(task_log.name, message)  # the text format shows the message only: no fields to build
        return
    fields: dict[str, object] = {
        "event": event,
        "task_id": task_id,
        "attempt": attempt,
        "state": _NAMES.get(state, "unknown"),
        "type": kind,
        "queue": queue,
        "trace_id": trace,
    }
    if event in ("failed", "retry_scheduled") and task.attempt_errors:
        fields["error_type"] = task.attempt_errors[-1].type
    if handler is not None:
        handler.line(task_log.name, message, fields)
    else:
        task_log.info(message, extra={"fields": fields})
