"""The leader of one namespace: every piece of leader state lives here.

It owns the fence (its Leadership), the committer, the task table and the ready
queues, and the parts that work on them: dispatch
(dispatch.py), timers (timers.py), worker sessions (workers.py), what workers
report (reports.py), retention (retention.py) and the rebuild from etcd
(recovery.py). Changes, here and in every part, follow one rule: update
memory synchronously, hand the record to the committer (which applies writes
in order), and act outside (answer a caller, send an assignment) only once
that write is committed; watchers hear of it from etcd (feed.py). If a commit fails the leader is
deposed and this object is discarded; the next leader rebuilds from etcd, so
memory never needs rolling back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import any_pb2, timestamp_pb2

from herder.clients import errors, tracing
from herder.clients.outcomes import ACK_TIMEOUT, CANCELED, TIMEOUT, WORKER_LOST
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys, metrics, placement, recovery
from herder.server._etcd import Etcd
from herder.server.committer import CommitLimits, Committer, RequestTooLargeError, Write, after_commit
from herder.server.contracts import TaskTypeRegistry
from herder.server.dispatch import Dispatcher
from herder.server.election import Leadership
from herder.server.entries import ACTIVE, TERMINAL, WAITING, Entry, S
from herder.server.horizon import (
    clamp_delay,
    duration_seconds,
    set_duration,
    set_timestamp,
    stamp_now,
    timestamp_seconds,
)
from herder.server.placement import PlacementSettings
from herder.server.reports import Reports
from herder.server.retention import Retention
from herder.server.retry import RetryDefaults, next_backoff
from herder.server.scheduler import Scheduler
from herder.server.sessions import Session, SessionSettings
from herder.server.stats import QueueBook
from herder.server.timers import Timers
from herder.server.validation import Limits
from herder.server.verbs import Verbs
from herder.server.watchers import TaskFilter
from herder.server.workers import Workers

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Versions of a task type kept in etcd (type_versions/<name>/), each with its descriptors.
KEPT_TYPE_VERSIONS = 20


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    """retention: seconds finished tasks are kept (a queue's own retention overrides it).
    idempotency_window: seconds after submission during which an idempotency key returns its task;
    a finished task is kept at least that long, so the key keeps answering.
    gc_interval: how often finished tasks past their retention are deleted.
    running_write_delay: seconds an acknowledged attempt runs before its RUNNING record is written;
    one that ends sooner is written once, with its outcome (0: on the timer loop's next turn).
    commit: how the committer batches writes into etcd transactions.
    """

    sessions: SessionSettings = field(default_factory=SessionSettings)
    retry: RetryDefaults = field(default_factory=RetryDefaults)
    accept_unregistered_types: bool = False
    retention: float = 24 * 3600.0
    idempotency_window: float = 24 * 3600.0
    gc_interval: float = 1.0
    running_write_delay: float = 0.1
    # A worker that lets an assignment's ack window pass gets no assignments for this long.
    quarantine: float = 60.0
    placement: PlacementSettings = field(default_factory=PlacementSettings)
    commit: CommitLimits = field(default_factory=CommitLimits)


def new_task_id() -> str:
    """Time-ordered ids, so keys list in submission order."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    stamp_now(ts)
    return ts


class NamespaceLeader:
    """Leader state for one namespace. Create with `start()`; `stop()` tears it down (safe twice)."""

    def __init__(
        self,
        etcd: Etcd,
        namespace: str,
        leadership: Leadership,
        settings: LeaderSettings,
        registry: TaskTypeRegistry,
        limits: Limits | None = None,
    ) -> None:
        self.etcd = etcd
        self.namespace = namespace
        self.prefix = keys.prefix(namespace)
        self.leadership = leadership
        self.settings = settings
        self.registry = registry
        self.input_limits = limits or Limits()
        self.committer = Committer(
            etcd, keys.leader(self.prefix), leadership.fence, limits=settings.commit, expired=leadership.expired
        )
        # The highest revision whose commit callbacks have run: memory holds every task change up to it.
        self.applied_revision = 0
        self.entries: dict[str, Entry] = {}
        self.idempotency: dict[str, str] = {}
        self.scheduler = Scheduler()
        self.book = QueueBook()
        # Scheduling settings by (scope, name), as stored.
        self.limits: dict[tuple[int, str], coordinator_pb2.Limit] = {}
        # Paused queues, as stored (SetQueuePaused).
        self.paused: set[str] = set()
        self.sequence = 0
        self.dispatcher = Dispatcher(self)
        self.timers = Timers(self)
        self.workers = Workers(self)
        self.unplaced = placement.Reasons(self.workers.sessions.values, self.scheduler.request, settings.placement)
        self.reports = Reports(self)
        self.retention = Retention(self)
        self.verbs = Verbs(self)
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()
        # Set when a loop or callback of this leader failed: the replica steps down and campaigns again.
        self.failed = asyncio.Event()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Rebuild queues and types from etcd, then start the background loops."""
        await recovery.rebuild(self)
        self._tasks = [
            self._supervise(self.timers.run(), "timers"),
            self._supervise(self.workers.run(), "liveness"),
            self._supervise(self.retention.run(), "retention"),
        ]
        self.dispatcher.schedule()

    def _supervise(self, loop: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background loop; if it ever ends other than by stop(), this leader fails."""
        task = asyncio.create_task(loop, name=f"herder-{name}")

        def ended(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self.stopped.is_set():
                return
            exc = t.exception()
            self.fail(f"the {name} loop", exc or RuntimeError("it returned"))

        task.add_done_callback(ended)
        return task

    def guarded(self, where: str, callback: Callable[..., None], *args: Any) -> None:
        """Run a loop callback; an error in it fails the leader instead of being lost in the event loop's log."""
        try:
            callback(*args)
        except Exception as exc:
            self.fail(where, exc)

    def fail(self, where: str, exc: BaseException) -> None:
        """A loop or callback failed: log it once with its traceback and step down, never half-work on."""
        if self.failed.is_set() or self.stopped.is_set():
            return
        log.error("namespace %s: %s failed; stepping down", self.namespace, where, exc_info=exc)
        self.failed.set()

    async def stop(self) -> None:
        """Stop dispatching and end every session and watcher. Uncommitted writes fail."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        for task in self._tasks:
            task.cancel()
        # A loop that failed was logged when it did; stopping must not raise it again.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.workers.end_all()
        await self.committer.close()

    @property
    def deposed(self) -> bool:
        return (
            self.leadership.expired() or self.committer.failed.is_set() or self.failed.is_set() or self.stopped.is_set()
        )

    def check(self) -> None:
        if self.deposed:
            raise errors.UnavailableError("this coordinator is stepping down; retry on the new leader")

    # ----------------------------------------------------------------- writes

    def write(self, entry: Entry, previous_state: int, extra: tuple[Write, ...] = ()) -> asyncio.Future[int]:
        return self._write_record(entry, previous_state, extra)[0]

    def _write_record(
        self, entry: Entry, previous_state: int, extra: tuple[Write, ...] = ()
    ) -> tuple[asyncio.Future[int], bytes]:
        """Commit the entry's current state; returns the commit future and the record written."""
        task = entry.task
        data = task.SerializeToString()
        state = task.state
        # This record carries any RUNNING state an acknowledgement left for later (attempt_started).
        entry.start_unwritten = False
        self._changed(task, previous_state, state)
        try:
            future = self.committer.submit([Write(keys.task(self.prefix, task.id), data), *extra])
        except RequestTooLargeError as exc:
            # Every size is checked before memory changes, so this is a bug: memory now differs from
            # etcd, and only a rebuild from etcd (by the next leader) can be trusted.
            self.fail(f"writing task {task.id}", exc)
            future = asyncio.get_running_loop().create_future()
            future.set_exception(errors.UnavailableError("this coordinator is stepping down; retry on the new leader"))
            return future, data
        entry.writes_pending += 1

        def committed(f: asyncio.Future[int]) -> None:
            self.guarded("a commit callback", applied, f)

        def applied(f: asyncio.Future[int]) -> None:
            entry.writes_pending -= 1
            if f.cancelled() or f.exception() is not None:
                return
            revision = f.result()
            entry.committed, entry.revision = data, revision
            entry.first_write = None
            entry.rest()
            self.applied_revision = max(self.applied_revision, revision)
            if state in TERMINAL and self.entries.get(task.id) is entry:
                del self.entries[task.id]

        future.add_done_callback(committed)
        return future, data

    def _changed(self, task: task_pb2.Task, previous_state: int, state: int) -> None:
        """Counts, logs and metrics of a state change, made when memory changes (before it is written)."""
        self.book.transition(task.spec.queue, previous_state, state)
        if previous_state != state:
            metrics.log_change(task, previous_state, state)
            if metrics.instruments is not None:
                metrics.instruments.task_changed(task, previous_state, state)

    def attempt_started(self, entry: Entry) -> None:
        """The worker acknowledged the entry's assignment: it is RUNNING from now.

        The RUNNING record is written `running_write_delay` later, and only if nothing else was
        written for the task by then: an attempt that ends sooner goes from ASSIGNED to its outcome
        in one write. Nothing leans on RUNNING being stored: a new leader treats an ASSIGNED
        attempt exactly as a RUNNING one (its worker re-claims it, or it fails as worker lost), and
        readers and watchers are told only of what is written.
        """
        task = entry.task
        task.state = S.TASK_STATE_RUNNING
        stamp_now(task.start_time)
        self._changed(task, S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING)
        entry.start_unwritten = True
        self.timers.write_start(entry, time.time() + self.settings.running_write_delay)

    async def await_commit(self, future: asyncio.Future[_T]) -> _T:
        try:
            return await asyncio.shield(future)
        except errors.HerderError:
            raise
        except Exception as exc:
            raise errors.UnavailableError(f"the write was not committed: {exc}") from exc

    # ----------------------------------------------------------------- submit

    async def submit(
        self,
        specs: list[task_pb2.TaskSpec],
        trace_context: dict[str, str] | None = None,
        retry_of: Sequence[str] = (),
        type_versions: list[int] | None = None,
    ) -> list[tuple[task_pb2.Task, bool]]:
        """Store validated specs; answers after every one is committed. Specs must be validated already.

        retry_of: for copies made by RetryTask, the id each spec copies (in order).
        type_versions, one per spec, is the version of its task type it was checked against (recorded
        as `Task.type_version`); by default the version registered now.

        trace_context (W3C traceparent/tracestate of the submitter) parents each task's PRODUCER
        span (see herder.clients.tracing), whose context is stored with the task, so its attempts
        join the submitter's trace; without an SDK it is stored as it came.
        """
        self.check()
        now = _now_ts()
        wall = time.time()
        # Per spec, in order: the task it created, or the id an idempotency key already names.
        answers: list[Entry | str] = []
        created: list[Entry] = []
        for index, spec in enumerate(specs):
            key = spec.idempotency_key
            if key and key in self.idempotency:
                answers.append(self.idempotency[key])
                continue
            self.sequence += 1
            task = task_pb2.Task(id=new_task_id(), namespace=self.namespace, sequence=self.sequence)
            task.spec.CopyFrom(spec)
            task.type_version = type_versions[index] if type_versions is not None else self.registry.version(spec.type)
            if not task.spec.queue:
                task.spec.queue = "default"
            task.create_time.CopyFrom(now)
            if retry_of:
                task.retry_of = retry_of[index]
            entry = Entry(task, fresh=True)
            self.entries[task.id] = entry
            if spec.HasField("not_before") and timestamp_seconds(spec.not_before) > wall:
                task.state = S.TASK_STATE_PENDING
                task.next_run_time.CopyFrom(spec.not_before)
                self.timers.delay(timestamp_seconds(spec.not_before), task.id)
            else:
                task.state = S.TASK_STATE_QUEUED
                task.queue_time.CopyFrom(now)
                self.push(task)
            if spec.HasField("ttl"):
                self.timers.expire(wall + clamp_delay(duration_seconds(spec.ttl)), task.id)
            if key:
                self.idempotency[key] = task.id
            created.append(entry)
            answers.append(entry)
        # Before any is dispatched: an assignment carries the task's trace context (its create span's).
        tracing.create_spans([entry.task for entry in created], trace_context or {})
        # Idle workers get the new tasks at once: each task's first write already assigns it.
        self.dispatcher.dispatch()
        writes: dict[Entry, tuple[asyncio.Future[int], bytes]] = {}
        for entry in created:
            entry.fresh = False
            task = entry.task
            key = task.spec.idempotency_key
            extra = (Write(keys.idempotency(self.prefix, key), task.id.encode()),) if key else ()
            written, record = self._write_record(entry, S.TASK_STATE_UNSPECIFIED, extra)
            entry.first_write = written
            if entry.session is not None:
                self.dispatcher.send_assignment_after(written, entry, entry.session)
            writes[entry] = (written, record)
        results: list[tuple[task_pb2.Task, bool]] = []
        for answer in answers:
            if isinstance(answer, Entry):
                # By the entry itself: touching answer.task would parse a record just set to rest.
                future, record = writes[answer]
                await self.await_commit(future)
                results.append((task_pb2.Task.FromString(record), True))
            else:
                results.append((await self.get(answer), False))
        return results

    # ----------------------------------------------------------------- reads

    async def get(self, task_id: str) -> task_pb2.Task:
        return (await self.get_with_revision(task_id))[0]

    async def get_with_revision(self, task_id: str) -> tuple[task_pb2.Task, int]:
        """The task as last committed, and the revision it was committed at."""
        entry = self.entries.get(task_id)
        if entry is not None:
            if not entry.committed and entry.first_write is not None:
                # Submitted but not committed yet: answer once its first write lands. A write that
                # has just landed may still have its callbacks queued; they run before this resumes.
                await self.await_commit(entry.first_write)
                await asyncio.sleep(0)
            return task_pb2.Task.FromString(entry.committed), entry.revision
        kv, _ = await self.etcd.get(keys.task(self.prefix, task_id))
        if kv is None:
            raise errors.NotFoundError(f"task {task_id} not found")
        return task_pb2.Task.FromString(kv.value), kv.mod_revision

    async def active_snapshots(self) -> AsyncIterator[tuple[task_pb2.Task, int]]:
        """Committed state of every unfinished task; yields to the loop now and then, a backlog being large."""
        for i, entry in enumerate(list(self.entries.values())):
            if entry.committed:
                yield task_pb2.Task.FromString(entry.committed), entry.revision
            if i % 2000 == 1999:
                await asyncio.sleep(0)

    async def list_unfinished(
        self, task_filter: TaskFilter, after: str, limit: int, newest_first: bool = False
    ) -> tuple[list[task_pb2.Task], bool]:
        """Committed unfinished tasks matching the filter, in id (submission) order after `after`: (page, more).

        newest_first: in reverse order, before `after` (every id when it is empty).
        """
        if newest_first:
            ids = sorted((task_id for task_id in self.entries if not after or task_id < after), reverse=True)
        else:
            ids = sorted(task_id for task_id in self.entries if task_id > after)
        found: list[task_pb2.Task] = []
        for n, task_id in enumerate(ids):
            entry = self.entries.get(task_id)
            if entry is not None and entry.committed:
                task = task_pb2.Task.FromString(entry.committed)
                if task_filter.matches(task):
                    found.append(task)
                    if len(found) == limit:
                        return found, n < len(ids) - 1
            if n % 2000 == 1999:
                await asyncio.sleep(0)  # a large backlog does not hold up everything else
        return found, False

    # ----------------------------------------------------------------- cancel

    async def cancel(self, task_id: str, reason: str) -> task_pb2.Task:
        self.check()
        entry = self.entries.get(task_id)
        if entry is None or not entry.committed:
            task = await self.get(task_id)
            if task.state in TERMINAL:
                raise errors.FailedPreconditionError(
                    f"task {task_id} already finished as {S.Name(task.state).removeprefix('TASK_STATE_')}"
                )
            entry = self.entries.get(task_id)
            if entry is None:
                raise errors.FailedPreconditionError(f"task {task_id} already finished")
        task = entry.task
        if task.state in TERMINAL:
            raise errors.FailedPreconditionError(f"task {task_id} is already finishing")
        if task.state in ACTIVE and entry.session is not None and not entry.session.closed:
            if not task.cancel_requested:
                task.cancel_requested = True
                future = self.write(entry, task.state)
                self.cancel_after(future, entry.session, task_id, task.attempt, reason or "canceled")
                await self.await_commit(future)
            return task_pb2.Task.FromString(entry.committed)
        error = task_pb2.TaskError(type=CANCELED, message=reason or "canceled", retryable=False)
        await self.await_commit(self.finish(entry, S.TASK_STATE_CANCELED, error=error))
        return task_pb2.Task.FromString(entry.committed)

    def finish(
        self,
        entry: Entry,
        state: int,
        *,
        error: task_pb2.TaskError | None = None,
        result: any_pb2.Any | None = None,
    ) -> asyncio.Future[int]:
        task = entry.task
        previous = task.state
        self._release(entry)
        task.state = state  # type: ignore[assignment]
        stamp_now(task.finish_time)
        task.ClearField("next_run_time")
        if error is not None:
            task.error.CopyFrom(error)
        if result is not None:
            task.result.CopyFrom(result)
        return self.write(entry, previous, (self.retention.marker(task),))

    def _release(self, entry: Entry) -> None:
        """Detach a task from queues, timers and its session."""
        task = entry.task
        self.scheduler.remove(task.id)
        if self.scheduler.finished(task.id):
            self.dispatcher.schedule()
        self.timers.discard(task.id)
        self.timers.acknowledged(entry)
        if entry.session is not None:
            if entry.session.held.get(task.id) == task.attempt:
                del entry.session.held[task.id]
            entry.session = None
            self.dispatcher.schedule()
        self.workers.adopt(entry)

    # ----------------------------------------------------------------- types

    async def register_type(
        self, task_type: task_pb2.TaskType, *, force: bool = False, registered_by: str = ""
    ) -> tuple[task_pb2.TaskType, bool]:
        """Register a validated type, or a new version of it: (the type as registered now, whether a
        version was created). The same messages again change nothing but a non-empty new description.

        Raises FailedPreconditionError, with a violation per breaking change and nothing written, when
        the messages are not wire- and JSON-compatible with the registered version and not `force`.
        """
        self.check()
        candidate = task_pb2.TaskType()
        candidate.CopyFrom(task_type)
        for name in ("version", "registered_by", "forced", "compatible_since", "changes", "versions"):
            candidate.ClearField(name)  # the coordinator's to set
        current = self.registry.get(task_type.name)
        changes = self.registry.changes(candidate)
        if current is None or changes is None:
            candidate.version = candidate.compatible_since = 1
        elif not changes:
            # A type stored before versions were kept is its version 1.
            current.version = current.version or 1
            current.compatible_since = current.compatible_since or 1
            if not candidate.description or candidate.description == current.description:
                return current, False
            # A description is not part of the contract: updated in place, same version.
            current.description = candidate.description
            self.registry.put(current)
            await self._store_type(current)
            return current, False
        else:
            broken = [c for c in changes if c.breaking]
            previous = current.version or 1
            if broken and not force:
                raise errors.FailedPreconditionError(
                    f"task type {task_type.name}: the new messages are not wire- and JSON-compatible with"
                    f" version {previous} ({len(broken)} breaking change{'s' if len(broken) > 1 else ''});"
                    " keep the old fields (reserve removed ones), or register with force",
                    violations=[errors.FieldViolation(f"task_type.{c.path}", c.description) for c in broken],
                )
            candidate.version = previous + 1
            candidate.forced = bool(broken)
            candidate.compatible_since = candidate.version if broken else current.compatible_since or 1
            candidate.changes.extend(("breaking: " if c.breaking else "") + str(c) for c in changes)
            if not candidate.description:
                candidate.description = current.description
            if broken:
                log.warning(
                    "task type %s: version %d forced by %s over %d breaking changes (workers of earlier"
                    " versions are refused): %s",
                    task_type.name,
                    candidate.version,
                    registered_by or "an unnamed caller",
                    len(broken),
                    "; ".join(str(c) for c in broken),
                )
        candidate.registered_by = registered_by
        stamp_now(candidate.register_time)
        self.registry.put(candidate)
        await self._store_type(candidate)
        log.info("task type %s: version %d registered by %s", candidate.name, candidate.version, registered_by)
        return candidate, True

    async def _store_type(self, task_type: task_pb2.TaskType) -> None:
        """Write the type and its version's snapshot, pruning the snapshot that falls out of the history.

        Two requests, in order (the committer keeps it): together they may not fit one transaction.
        A crash between them leaves a snapshot of a version the next registration overwrites.
        """
        name, version = task_type.name, task_type.version
        history = [Write(keys.type_version(self.prefix, name, version), task_type.SerializeToString())]
        if version > KEPT_TYPE_VERSIONS:
            history.append(Write(keys.type_version(self.prefix, name, version - KEPT_TYPE_VERSIONS), None))
        snapshot = self.committer.submit(history)
        stored = self.committer.submit([Write(keys.task_type(self.prefix, name), task_type.SerializeToString())])
        await self.await_commit(asyncio.gather(snapshot, stored))

    # ----------------------------------------------------------------- attempt outcomes

    def requeue(self, entry: Entry) -> asyncio.Future[int]:
        task = entry.task
        previous = task.state
        self._release(entry)
        if task.cancel_requested:
            return self.finish(
                entry, S.TASK_STATE_CANCELED, error=task_pb2.TaskError(type=CANCELED, message="canceled")
            )
        task.state = S.TASK_STATE_QUEUED
        stamp_now(task.queue_time)
        task.ClearField("next_run_time")
        task.worker_id = ""
        task.session_id = ""
        self.push(task)
        return self.write(entry, previous)

    def attempt_failed(
        self, entry: Entry, error: task_pb2.TaskError, retry_after: float | None = None
    ) -> asyncio.Future[int]:
        """Record a failed attempt; retry it (now or after a backoff) or fail the task."""
        task = entry.task
        if error.type in (WORKER_LOST, TIMEOUT):
            error.retryable = True
        # The history keeps each attempt's error short; the last one is kept whole in task.error.
        limit = self.input_limits.max_history_message_length
        task.attempt_errors.add(type=error.type, message=error.message[:limit], retryable=error.retryable)
        policy = task.spec.retry
        # Counted from the latest RetryTask on: an operator's retry gives the task its attempts again.
        failures = sum(1 for e in task.attempt_errors if e.type != ACK_TIMEOUT) - task.failures_before_retry
        max_attempts = policy.max_attempts or self.settings.retry.max_attempts
        if (
            task.cancel_requested
            or not error.retryable
            or error.type in policy.non_retryable_error_types
            or failures >= max_attempts
        ):
            state = S.TASK_STATE_CANCELED if task.cancel_requested else S.TASK_STATE_FAILED
            return self.finish(entry, state, error=error)
        delay = retry_after if retry_after is not None else next_backoff(policy, failures, self.settings.retry)
        if error.type == WORKER_LOST and retry_after is None:
            delay = 0.0
        # Bounded, so the run time below stays a valid Timestamp whatever a policy or worker asked for.
        delay = clamp_delay(delay)
        if delay <= 0:
            return self.requeue(entry)
        previous = task.state
        self._release(entry)
        task.state = S.TASK_STATE_PENDING
        task.worker_id = ""
        task.session_id = ""
        due = time.time() + delay
        set_timestamp(task.next_run_time, due)
        self.timers.delay(due, task.id)
        return self.write(entry, previous)

    def push(self, task: task_pb2.Task) -> None:
        spec = task.spec
        request = placement.requested(spec)
        self.scheduler.push(task.id, spec.type, spec.queue, spec.priority, spec.concurrency_key, task.sequence, request)
        self.dispatcher.schedule()

    @staticmethod
    def cancel_after(written: asyncio.Future[int], session: Session, task_id: str, attempt: int, reason: str) -> None:
        """Tell the worker to stop an attempt once its failure is committed."""
        ref = coordinator_pb2.AttemptRef(task_id=task_id, attempt=attempt)
        message = coordinator_pb2.ConnectResponse(cancel=coordinator_pb2.CancelAttempt(ref=ref, reason=reason))
        after_commit(written, lambda: session.send(message))

    # ----------------------------------------------------------------- scheduling settings

    async def set_limit(self, limit: coordinator_pb2.Limit) -> coordinator_pb2.Limit:
        """Store a validated limit; it applies to the next dispatch."""
        self.check()
        stored = coordinator_pb2.Limit()
        stored.CopyFrom(limit)
        await self.await_commit(
            self.committer.submit([Write(keys.limit(self.prefix, limit.scope, limit.name), stored.SerializeToString())])
        )
        self.apply_limit(stored)
        return stored

    def apply_limit(self, limit: coordinator_pb2.Limit) -> None:
        self.limits[(limit.scope, limit.name)] = limit
        if limit.scope == coordinator_pb2.LIMIT_SCOPE_GLOBAL:
            self.scheduler.set_global_limit(limit.max_running)
        elif limit.scope == coordinator_pb2.LIMIT_SCOPE_QUEUE:
            self.scheduler.set_queue_limit(limit.name, limit.max_running)
        elif limit.scope == coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY:
            self.scheduler.set_key_limit(limit.name, limit.max_running)
            self.scheduler.set_key_weight(limit.name, limit.weight or 1)
        self.dispatcher.schedule()

    async def set_paused(self, queue: str, paused: bool) -> None:
        """Pause or resume a queue, durably (beside the limits, so a new leader rebuilds it)."""
        self.check()
        key = keys.paused(self.prefix, queue)
        await self.await_commit(self.committer.submit([Write(key, b"1" if paused else None)]))
        self.apply_paused(queue, paused)

    def apply_paused(self, queue: str, paused: bool) -> None:
        if paused:
            self.paused.add(queue)
        else:
            self.paused.discard(queue)
        self.scheduler.set_queue_paused(queue, paused)
        self.dispatcher.schedule()

    async def update_priority(self, task_id: str, priority: int) -> task_pb2.Task:
        """Change a PENDING or QUEUED task's priority, durably; the next dispatch uses it."""
        self.check()
        entry = self.entries.get(task_id)
        task = entry.task if entry is not None and entry.committed else await self.get(task_id)
        if entry is None or task.state not in WAITING:
            raise errors.FailedPreconditionError(
                f"task {task_id} is {S.Name(task.state).removeprefix('TASK_STATE_')}: only a task not started"
                " yet can change priority"
            )
        if task.spec.priority != priority:
            task.spec.priority = priority
            if task.state == S.TASK_STATE_QUEUED:
                self.scheduler.update_priority(task_id, priority)
                self.dispatcher.schedule()
            await self.await_commit(self.write(entry, task.state))
        return task_pb2.Task.FromString(entry.committed)

    def waiting_reason(self, task_id: str) -> str:
        """Why a queued task is held back (a limit it is under, no node with room for it), or ""."""
        held = self.scheduler.hold_reason(task_id)
        if held or task_id not in self.scheduler:
            return held
        return self.unplaced.why(self.scheduler.request(task_id), self.scheduler.task_type(task_id))

    # ----------------------------------------------------------------- status

    def counts(self) -> dict[int, int]:
        return dict(self.book.totals())

    def queue_stats(self) -> list[coordinator_pb2.QueueStats]:
        names = set(self.book.queues()) | set(self.scheduler.queues())
        names |= {name for scope, name in self.limits if scope == coordinator_pb2.LIMIT_SCOPE_QUEUE}
        names |= self.paused
        found = []
        held_by_keys = self.scheduler.held_by_key_limits()
        for name in sorted(names):
            figures = self.book.figures(name)
            counts = figures.counts
            stats = coordinator_pb2.QueueStats(
                name=name,
                pending=counts.get(S.TASK_STATE_PENDING, 0),
                queued=counts.get(S.TASK_STATE_QUEUED, 0),
                assigned=counts.get(S.TASK_STATE_ASSIGNED, 0),
                running=counts.get(S.TASK_STATE_RUNNING, 0),
                limit=self.scheduler.queue_limit(name),
                dispatch_rate=round(figures.dispatch_rate, 3),
                succeeded=counts.get(S.TASK_STATE_SUCCEEDED, 0),
                failed=counts.get(S.TASK_STATE_FAILED, 0),
                held=held_by_keys.get(name, 0),
                paused=name in self.paused,
            )
            set_duration(stats.wait_p50, figures.wait_p50)
            set_duration(stats.wait_p99, figures.wait_p99)
            set_duration(stats.retention, self.retention.period(name))
            oldest = self.scheduler.oldest(name)
            if oldest is not None and oldest in self.entries:
                stats.oldest_queued_time.CopyFrom(self.entries[oldest].task.queue_time)
                # A whole queue waits when its own or the global limit is full; a key limit holds only its key's.
                if self.scheduler.hold_reason(oldest).startswith(("queue", "the global")):
                    stats.held = stats.queued
            for want, types, count in self.scheduler.waiting_requests(name):
                reason = next(filter(None, (self.unplaced.why(want, t) for t in sorted(types))), "")
                if reason:
                    stats.waiting_for_resources += count
                    stats.resources_reason = stats.resources_reason or reason
            found.append(stats)
        return found
