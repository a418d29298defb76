"""The leader of one namespace: every piece of leader state lives here.

It owns the fence (its Leadership), the committer, the task table, the ready
and delay queues, the worker sessions and the watchers. Changes follow one
rule: update memory synchronously, hand the record to the committer (which
applies writes in order), and act outside (answer a caller, send an
assignment, notify watchers) only once that write is committed. If a commit
fails the leader is deposed and this object is discarded; the next leader
rebuilds from etcd, so memory never needs rolling back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, duration_pb2, timestamp_pb2

from herder.clients import errors
from herder.clients.outcomes import (
    ACK_TIMEOUT,
    BAD_OUTPUT,
    CANCELED,
    EXPIRED,
    INVALID_RESULT,
    RESULT_TOO_LARGE,
    TIMEOUT,
    WORKER_LOST,
)
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd
from herder.server.committer import Committer, RequestTooLargeError, Write
from herder.server.contracts import TaskTypeRegistry
from herder.server.deadlines import Deadlines
from herder.server.election import Leadership
from herder.server.horizon import clamp_delay, set_duration, set_timestamp
from herder.server.retry import RetryDefaults, next_backoff
from herder.server.scheduler import Scheduler
from herder.server.sessions import Session, SessionSettings
from herder.server.stats import QueueBook
from herder.server.validation import Limits
from herder.server.watchers import Change, TaskFilter, WatchHub

log = logging.getLogger(__name__)

S = task_pb2.TaskState
TERMINAL = frozenset({S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED, S.TASK_STATE_CANCELED, S.TASK_STATE_EXPIRED})
ACTIVE = frozenset({S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING})
WAITING = frozenset({S.TASK_STATE_PENDING, S.TASK_STATE_QUEUED})


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    """retention: seconds finished tasks are kept (a queue's own retention overrides it).
    idempotency_window: seconds after submission during which an idempotency key returns its task;
    a finished task is kept at least that long, so the key keeps answering.
    gc_interval: how often finished tasks past their retention are deleted.
    """

    sessions: SessionSettings = field(default_factory=SessionSettings)
    retry: RetryDefaults = field(default_factory=RetryDefaults)
    accept_unregistered_types: bool = False
    retention: float = 24 * 3600.0
    idempotency_window: float = 24 * 3600.0
    gc_interval: float = 1.0
    # A worker that lets an assignment's ack window pass gets no assignments for this long.
    quarantine: float = 60.0


@dataclass(eq=False, slots=True)
class Entry:
    """A task the leader tracks: its latest state and the record last committed for it.

    A task that waits (QUEUED or PENDING) with nothing left to write keeps only its committed
    record; the message is parsed again when something touches it. That is most of a backlog's
    memory: a parsed Task costs about four times its record.
    """

    _task: task_pb2.Task | None
    committed: bytes = b""
    revision: int = 0
    session: Session | None = None
    ack_timer: asyncio.TimerHandle | None = None
    # Monotonic time after which an attempt no session holds is re-queued.
    orphan_deadline: float = 0.0
    # The attempt whose timeout is armed.
    timeout_attempt: int = 0
    # A progress write is on its way; later updates wait for it and go in one write.
    progress_writing: bool = False
    progress_dirty: bool = False
    # Created by a submit that has not written it yet: dispatch may assign it in memory,
    # and the submit's one write then stores it already assigned.
    fresh: bool = False
    # Writes submitted and not yet committed.
    writes_pending: int = 0
    # The submit's write, until it lands: readers of a task not yet committed wait for it.
    first_write: asyncio.Future[int] | None = None

    @property
    def task(self) -> task_pb2.Task:
        if self._task is None:
            self._task = task_pb2.Task.FromString(self.committed)
        return self._task

    def rest(self) -> None:
        """Drop the parsed message of a waiting task whose every change is committed."""
        if self.writes_pending == 0 and self._task is not None and self._task.state in WAITING:
            self._task = None


def new_task_id() -> str:
    """Time-ordered ids, so keys list in submission order."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(6)}"


def _stamp(ts: timestamp_pb2.Timestamp) -> None:
    """Set ts to now (five times cheaper than Timestamp.GetCurrentTime, which goes through datetime)."""
    ns = time.time_ns()
    ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    _stamp(ts)
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
        self.limits_ = limits or Limits()
        self.committer = Committer(etcd, keys.leader(self.prefix), leadership.fence)
        self.hub = WatchHub()
        self.sessions: dict[str, Session] = {}
        self._entries: dict[str, Entry] = {}
        # Attempts no session holds, waiting for their worker to re-claim them.
        self._orphans: dict[str, Entry] = {}
        self._idempotency: dict[str, str] = {}
        self.scheduler = Scheduler()
        self.book = QueueBook()
        # Scheduling settings by (scope, name), as stored.
        self.limits: dict[tuple[int, str], coordinator_pb2.Limit] = {}
        # PENDING tasks by run time; unstarted tasks by expiry (ttl); attempts by timeout.
        self._delayed = Deadlines()
        self._expiry = Deadlines()
        self._timeouts = Deadlines()
        self._sequence = 0
        self._dispatch_scheduled = False
        self._timer_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = asyncio.Event()
        # Set when a loop or callback of this leader failed: the replica steps down and campaigns again.
        self.failed = asyncio.Event()
        # Workers that let assignments go unacknowledged: worker id -> (monotonic end, reason).
        self.quarantined: dict[str, tuple[float, str]] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Rebuild queues and types from etcd, then start the background loops."""
        await self._load()
        self._tasks = [
            self._supervise(self._timer_loop(), "timers"),
            self._supervise(self._liveness_loop(), "liveness"),
            self._supervise(self._gc_loop(), "retention"),
        ]
        self._schedule_dispatch()

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

    def _guarded(self, where: str, callback: Callable[..., None], *args: Any) -> None:
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

    async def _load(self) -> None:
        async for kv in self.etcd.scan_prefix(keys.limits_prefix(self.prefix)):
            self._apply_limit(coordinator_pb2.Limit.FromString(kv.value))
        async for kv in self.etcd.scan_prefix(keys.types_prefix(self.prefix)):
            tt = task_pb2.TaskType.FromString(kv.value)
            with contextlib.suppress(errors.HerderError):
                self.registry.put(tt)
        async for kv in self.etcd.scan_prefix(keys.idempotency_prefix(self.prefix)):
            self._idempotency[kv.key[len(keys.idempotency_prefix(self.prefix)) :].decode()] = kv.value.decode()
        grace = time.monotonic() + self.settings.sessions.heartbeat_timeout
        loaded = 0
        async for kv in self.etcd.scan_prefix(keys.tasks_prefix(self.prefix)):
            task = task_pb2.Task.FromString(kv.value)
            self._sequence = max(self._sequence, task.sequence)
            self.book.transition(task.spec.queue, 0, task.state)
            if task.state in TERMINAL:
                continue
            entry = Entry(task, kv.value, kv.mod_revision)
            self._entries[task.id] = entry
            entry.rest()
            loaded += 1
            if task.state == S.TASK_STATE_QUEUED:
                self._push(task)
            elif task.state == S.TASK_STATE_PENDING:
                self._delayed.push(_seconds_ts(task.next_run_time), task.id)
            else:
                spec = task.spec
                self.scheduler.add_running(
                    task.id, spec.type, spec.queue, spec.priority, spec.concurrency_key, task.sequence
                )
                self._arm_timeout(entry, _seconds_ts(task.assign_time))
                # Its worker may still be running it: wait for it to reconnect and re-claim.
                self._orphan(entry, grace)
            if task.attempt == 0 and task.spec.HasField("ttl"):
                self._expiry.push(_seconds_ts(task.create_time) + _seconds(task.spec.ttl), task.id)
        log.info("namespace %s: rebuilt %d unfinished tasks from etcd", self.namespace, loaded)

    async def stop(self) -> None:
        """Stop dispatching and end every session and watcher. Uncommitted writes fail."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        for task in self._tasks:
            task.cancel()
        # A loop that failed was logged when it did; stopping must not raise it again.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for entry in self._entries.values():
            if entry.ack_timer is not None:
                entry.ack_timer.cancel()
        for session in list(self.sessions.values()):
            session.end()
        self.sessions.clear()
        self.hub.close_all()
        await self.committer.close()

    @property
    def deposed(self) -> bool:
        return (
            self.leadership.lost.is_set()
            or self.committer.failed.is_set()
            or self.failed.is_set()
            or self.stopped.is_set()
        )

    def _check(self) -> None:
        if self.deposed:
            raise errors.UnavailableError("this coordinator is stepping down; retry on the new leader")

    # ----------------------------------------------------------------- writes

    def _write(self, entry: Entry, previous_state: int, extra: tuple[Write, ...] = ()) -> asyncio.Future[int]:
        return self._write_record(entry, previous_state, extra)[0]

    def _write_record(
        self, entry: Entry, previous_state: int, extra: tuple[Write, ...] = ()
    ) -> tuple[asyncio.Future[int], bytes]:
        """Commit the entry's current state; returns the commit future and the record written."""
        task = entry.task
        data = task.SerializeToString()
        state = task.state
        self.book.transition(task.spec.queue, previous_state, state)
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
            self._guarded("a commit callback", applied, f)

        def applied(f: asyncio.Future[int]) -> None:
            entry.writes_pending -= 1
            if f.cancelled() or f.exception() is not None:
                return
            revision = f.result()
            entry.committed, entry.revision = data, revision
            entry.first_write = None
            entry.rest()
            if self.hub.wants(task.id, task.spec.queue, task.spec.type):
                self.hub.publish(task_pb2.Task.FromString(data), Change(data, previous_state, revision))
            if state in TERMINAL and self._entries.get(task.id) is entry:
                del self._entries[task.id]

        future.add_done_callback(committed)
        return future, data

    async def _await(self, future: asyncio.Future[int]) -> int:
        try:
            return await asyncio.shield(future)
        except errors.HerderError:
            raise
        except Exception as exc:
            raise errors.UnavailableError(f"the write was not committed: {exc}") from exc

    # ----------------------------------------------------------------- submit

    async def submit(
        self, specs: list[task_pb2.TaskSpec], trace_context: dict[str, str] | None = None
    ) -> list[tuple[task_pb2.Task, bool]]:
        """Store validated specs; answers after every one is committed. Specs must be validated already.

        trace_context (W3C traceparent/tracestate of the submitter) is stored with each task, so
        the handler's span joins the submitter's trace.
        """
        self._check()
        now = _now_ts()
        wall = time.time()
        # Per spec, in order: the task it created, or the id an idempotency key already names.
        answers: list[Entry | str] = []
        created: list[Entry] = []
        for spec in specs:
            key = spec.idempotency_key
            if key and key in self._idempotency:
                answers.append(self._idempotency[key])
                continue
            self._sequence += 1
            task = task_pb2.Task(id=new_task_id(), namespace=self.namespace, sequence=self._sequence)
            task.spec.CopyFrom(spec)
            if not task.spec.queue:
                task.spec.queue = "default"
            task.create_time.CopyFrom(now)
            if trace_context:
                task.trace_context.update(trace_context)
            entry = Entry(task, fresh=True)
            self._entries[task.id] = entry
            if spec.HasField("not_before") and _seconds_ts(spec.not_before) > wall:
                task.state = S.TASK_STATE_PENDING
                task.next_run_time.CopyFrom(spec.not_before)
                self._delayed.push(_seconds_ts(spec.not_before), task.id)
                self._timer_wakeup.set()
            else:
                task.state = S.TASK_STATE_QUEUED
                task.queue_time.CopyFrom(now)
                self._push(task)
            if spec.HasField("ttl"):
                self._expiry.push(wall + clamp_delay(_seconds(spec.ttl)), task.id)
                self._timer_wakeup.set()
            if key:
                self._idempotency[key] = task.id
            created.append(entry)
            answers.append(entry)
        # Idle workers get the new tasks at once: each task's first write already assigns it.
        self._dispatch()
        writes: dict[Entry, tuple[asyncio.Future[int], bytes]] = {}
        for entry in created:
            entry.fresh = False
            task = entry.task
            key = task.spec.idempotency_key
            extra = (Write(keys.idempotency(self.prefix, key), task.id.encode()),) if key else ()
            written, record = self._write_record(entry, S.TASK_STATE_UNSPECIFIED, extra)
            entry.first_write = written
            if entry.session is not None:
                self._send_assignment_after(written, entry, entry.session)
            writes[entry] = (written, record)
        results: list[tuple[task_pb2.Task, bool]] = []
        for answer in answers:
            if isinstance(answer, Entry):
                # By the entry itself: touching answer.task would parse a record just set to rest.
                future, record = writes[answer]
                await self._await(future)
                results.append((task_pb2.Task.FromString(record), True))
            else:
                results.append((await self.get(answer), False))
        return results

    # ----------------------------------------------------------------- reads

    async def get(self, task_id: str) -> task_pb2.Task:
        return (await self.get_with_revision(task_id))[0]

    async def get_with_revision(self, task_id: str) -> tuple[task_pb2.Task, int]:
        """The task as last committed, and the revision it was committed at."""
        entry = self._entries.get(task_id)
        if entry is not None:
            if not entry.committed and entry.first_write is not None:
                # Submitted but not committed yet: answer once its first write lands. A write that
                # has just landed may still have its callbacks queued; they run before this resumes.
                await self._await(entry.first_write)
                await asyncio.sleep(0)
            return task_pb2.Task.FromString(entry.committed), entry.revision
        kv, _ = await self.etcd.get(keys.task(self.prefix, task_id))
        if kv is None:
            raise errors.NotFoundError(f"task {task_id} not found")
        return task_pb2.Task.FromString(kv.value), kv.mod_revision

    async def active_snapshots(self) -> AsyncIterator[tuple[task_pb2.Task, int]]:
        """Committed state of every unfinished task; yields to the loop now and then, a backlog being large."""
        for i, entry in enumerate(list(self._entries.values())):
            if entry.committed:
                yield task_pb2.Task.FromString(entry.committed), entry.revision
            if i % 2000 == 1999:
                await asyncio.sleep(0)

    async def list_unfinished(
        self, task_filter: TaskFilter, after: str, limit: int
    ) -> tuple[list[task_pb2.Task], bool]:
        """Committed unfinished tasks matching the filter, in id (submission) order after `after`: (page, more)."""
        ids = sorted(task_id for task_id in self._entries if task_id > after)
        found: list[task_pb2.Task] = []
        for n, task_id in enumerate(ids):
            entry = self._entries.get(task_id)
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
        self._check()
        entry = self._entries.get(task_id)
        if entry is None or not entry.committed:
            task = await self.get(task_id)
            if task.state in TERMINAL:
                raise errors.FailedPreconditionError(
                    f"task {task_id} already finished as {S.Name(task.state).removeprefix('TASK_STATE_')}"
                )
            entry = self._entries.get(task_id)
            if entry is None:
                raise errors.FailedPreconditionError(f"task {task_id} already finished")
        task = entry.task
        if task.state in TERMINAL:
            raise errors.FailedPreconditionError(f"task {task_id} is already finishing")
        if task.state in ACTIVE and entry.session is not None and not entry.session.closed:
            if not task.cancel_requested:
                task.cancel_requested = True
                future = self._write(entry, task.state)
                self._cancel_after(future, entry.session, task_id, task.attempt, reason or "canceled")
                await self._await(future)
            return task_pb2.Task.FromString(entry.committed)
        error = task_pb2.TaskError(type=CANCELED, message=reason or "canceled", retryable=False)
        await self._await(self._finish(entry, S.TASK_STATE_CANCELED, error=error))
        return task_pb2.Task.FromString(entry.committed)

    def _finish(
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
        _stamp(task.finish_time)
        task.ClearField("next_run_time")
        if error is not None:
            task.error.CopyFrom(error)
        if result is not None:
            task.result.CopyFrom(result)
        # Deleted after the queue's retention, and not before its idempotency key stops answering.
        delete_at = time.time() + self.retention(task.spec.queue)
        if task.spec.idempotency_key:
            delete_at = max(delete_at, _seconds_ts(task.create_time) + self.settings.idempotency_window)
        marker = f"{state}\n{task.spec.queue}\n{task.spec.idempotency_key}".encode()
        return self._write(entry, previous, (Write(keys.gc(self.prefix, delete_at, task.id), marker),))

    def _release(self, entry: Entry) -> None:
        """Detach a task from queues, timers and its session."""
        task = entry.task
        self.scheduler.remove(task.id)
        if self.scheduler.finished(task.id):
            self._schedule_dispatch()
        self._delayed.discard(task.id)
        self._expiry.discard(task.id)
        self._timeouts.discard(task.id)
        if entry.ack_timer is not None:
            entry.ack_timer.cancel()
            entry.ack_timer = None
        if entry.session is not None:
            if entry.session.held.get(task.id) == task.attempt:
                del entry.session.held[task.id]
            entry.session = None
            self._schedule_dispatch()
        self._adopt(entry)

    # ----------------------------------------------------------------- types

    async def register_type(self, task_type: task_pb2.TaskType) -> task_pb2.TaskType:
        self._check()
        _stamp(task_type.register_time)
        self.registry.put(task_type)
        await self._await(
            self.committer.submit([Write(keys.task_type(self.prefix, task_type.name), task_type.SerializeToString())])
        )
        return task_type

    # ----------------------------------------------------------------- dispatch

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_scheduled and not self.stopped.is_set():
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._guarded, "dispatch", self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if self.deposed or not self.scheduler:
            return
        sessions = [s for s in self.sessions.values() if s.free > 0]
        random.shuffle(sessions)
        while sessions and self.scheduler:
            still_free = []
            for session in sessions:
                task_id = self.scheduler.pick(session.task_types)
                if task_id is None:
                    continue
                self._assign(self._entries[task_id], session)
                if session.free > 0:
                    still_free.append(session)
            sessions = still_free

    def _assign(self, entry: Entry, session: Session) -> None:
        task = entry.task
        previous = task.state
        task.state = S.TASK_STATE_ASSIGNED
        task.attempt += 1
        task.worker_id = session.worker_id
        task.session_id = session.id
        _stamp(task.assign_time)
        task.ClearField("progress")
        task.waiting_reason = ""
        entry.session = session
        session.held[task.id] = task.attempt
        now = time.time()
        self.book.dispatched(task.spec.queue, now - _seconds_ts(task.queue_time))
        self._expiry.discard(task.id)
        self._arm_timeout(entry, now)
        if not entry.fresh:
            self._send_assignment_after(self._write(entry, previous), entry, session)

    def _send_assignment_after(self, written: asyncio.Future[int], entry: Entry, session: Session) -> None:
        """Once the assignment is committed, send it and start the acknowledgement window."""
        task_id, attempt = entry.task.id, entry.task.attempt

        def send(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            if session.held.get(task_id) != attempt or session.closed:
                return
            session.send_assignment(entry.committed)
            entry.ack_timer = asyncio.get_running_loop().call_later(
                self.settings.sessions.ack_timeout,
                self._guarded,
                "an ack timer",
                self._ack_expired,
                entry,
                session,
                attempt,
            )

        written.add_done_callback(send)

    def _ack_expired(self, entry: Entry, session: Session, attempt: int) -> None:
        task = entry.task
        entry.ack_timer = None
        if task.attempt != attempt or task.state != S.TASK_STATE_ASSIGNED or entry.session is not session:
            return
        log.info("task %s attempt %d not acknowledged by %s; re-queued", task.id, attempt, session.worker_id)
        self._quarantine(session.worker_id, f"assignment {task.id} attempt {attempt} not acknowledged")
        # The worker never started it: re-queued at once, using up none of the task's attempts. The
        # history shows it (bounded: a worker is quarantined after each, so these come rarely).
        if len(task.attempt_errors) < self.limits_.max_attempts_limit:
            task.attempt_errors.add(
                type=ACK_TIMEOUT, message=f"not acknowledged by {session.worker_id}", retryable=True
            )
        requeued = self._requeue(entry)
        self._cancel_after(requeued, session, task.id, attempt, "not acknowledged")

    def _quarantine(self, worker_id: str, reason: str) -> None:
        """No assignments for this worker (on any session) until the quarantine period has passed."""
        until = time.monotonic() + self.settings.quarantine
        if worker_id not in self.quarantined:
            log.warning("worker %s quarantined for %gs: %s", worker_id, self.settings.quarantine, reason)
        self.quarantined[worker_id] = (until, reason)
        for session in self.sessions.values():
            if session.worker_id == worker_id:
                session.quarantined_until = until

    def _release_quarantines(self, now: float) -> None:
        for worker_id, (until, _) in list(self.quarantined.items()):
            if until <= now:
                del self.quarantined[worker_id]
                log.info("worker %s is out of quarantine", worker_id)
                self._schedule_dispatch()

    # ----------------------------------------------------------------- attempt outcomes

    def _requeue(self, entry: Entry) -> asyncio.Future[int]:
        task = entry.task
        previous = task.state
        self._release(entry)
        if task.cancel_requested:
            return self._finish(
                entry, S.TASK_STATE_CANCELED, error=task_pb2.TaskError(type=CANCELED, message="canceled")
            )
        task.state = S.TASK_STATE_QUEUED
        _stamp(task.queue_time)
        task.ClearField("next_run_time")
        task.worker_id = ""
        task.session_id = ""
        self._push(task)
        return self._write(entry, previous)

    def _attempt_failed(
        self, entry: Entry, error: task_pb2.TaskError, retry_after: float | None = None
    ) -> asyncio.Future[int]:
        """Record a failed attempt; retry it (now or after a backoff) or fail the task."""
        task = entry.task
        if error.type in (WORKER_LOST, TIMEOUT):
            error.retryable = True
        # The history keeps each attempt's error short; the last one is kept whole in task.error.
        limit = self.limits_.max_history_message_length
        task.attempt_errors.add(type=error.type, message=error.message[:limit], retryable=error.retryable)
        policy = task.spec.retry
        failures = sum(1 for e in task.attempt_errors if e.type != ACK_TIMEOUT)
        max_attempts = policy.max_attempts or self.settings.retry.max_attempts
        if (
            task.cancel_requested
            or not error.retryable
            or error.type in policy.non_retryable_error_types
            or failures >= max_attempts
        ):
            state = S.TASK_STATE_CANCELED if task.cancel_requested else S.TASK_STATE_FAILED
            return self._finish(entry, state, error=error)
        delay = retry_after if retry_after is not None else next_backoff(policy, failures, self.settings.retry)
        if error.type == WORKER_LOST and retry_after is None:
            delay = 0.0
        # Bounded, so the run time below stays a valid Timestamp whatever a policy or worker asked for.
        delay = clamp_delay(delay)
        if delay <= 0:
            return self._requeue(entry)
        previous = task.state
        self._release(entry)
        task.state = S.TASK_STATE_PENDING
        task.worker_id = ""
        task.session_id = ""
        due = time.time() + delay
        set_timestamp(task.next_run_time, due)
        self._delayed.push(due, task.id)
        self._timer_wakeup.set()
        return self._write(entry, previous)

    def _held_by(self, session: Session, ref: coordinator_pb2.AttemptRef) -> Entry | None:
        entry = self._entries.get(ref.task_id)
        if (
            entry is None
            or entry.task.attempt != ref.attempt
            or entry.task.state not in ACTIVE
            or entry.session is not session
        ):
            return None
        return entry

    def acknowledge(self, session: Session, ref: coordinator_pb2.AttemptRef) -> None:
        entry = self._held_by(session, ref)
        if entry is None or entry.task.state != S.TASK_STATE_ASSIGNED:
            return
        if entry.ack_timer is not None:
            entry.ack_timer.cancel()
            entry.ack_timer = None
        entry.task.state = S.TASK_STATE_RUNNING
        _stamp(entry.task.start_time)
        self._write(entry, S.TASK_STATE_ASSIGNED)

    def progress(self, session: Session, update: coordinator_pb2.ProgressUpdate) -> None:
        entry = self._held_by(session, update.ref)
        if entry is None:
            return
        size = update.progress.ByteSize()
        if size > self.limits_.max_progress_bytes:
            # Dropped, not stored: the attempt goes on, and the worker hears why.
            session.warn(
                "progress",
                f"a progress update of {size} bytes was dropped: at most {self.limits_.max_progress_bytes} bytes",
            )
            return
        entry.task.progress.CopyFrom(update.progress)
        _stamp(entry.task.progress.update_time)
        if entry.progress_writing:
            entry.progress_dirty = True  # written with the next one: progress only needs its latest value
            return
        self._write_progress(entry)

    def _write_progress(self, entry: Entry) -> None:
        entry.progress_writing = True

        def written(f: asyncio.Future[int]) -> None:
            entry.progress_writing = False
            if entry.progress_dirty and not f.cancelled() and f.exception() is None and entry.task.state in ACTIVE:
                entry.progress_dirty = False
                self._write_progress(entry)

        self._write(entry, entry.task.state).add_done_callback(written)

    def result(self, session: Session, result: coordinator_pb2.AttemptResult) -> None:
        """Apply an attempt's outcome; the worker gets its ResultAck once the outcome is committed."""
        ref = result.ref
        entry = self._held_by(session, ref)
        if entry is None:
            session.send_result_ack(ref, False, "stale attempt: superseded, finished or not this worker's")
            return
        task = entry.task
        outcome = result.WhichOneof("outcome")
        too_large = self._oversized(entry, result, outcome)
        if too_large:
            # Not retryable: the same handler would return the same thing. Acknowledged, so the worker
            # stops re-sending it.
            future = self._finish(
                entry, S.TASK_STATE_FAILED, error=task_pb2.TaskError(type=RESULT_TOO_LARGE, message=too_large)
            )
        elif outcome is None:
            # A worker bug: neither output, error nor canceled. It fails the attempt (counted), so a
            # broken worker cannot re-queue a task forever at no cost.
            session.send_result_ack(ref, False, "invalid result: no outcome set (output, error or canceled)")
            error = task_pb2.TaskError(
                type=INVALID_RESULT, message=f"worker {session.worker_id} sent a result with no outcome", retryable=True
            )
            self._attempt_failed(entry, error)
            return
        elif outcome == "output":
            output_class = self.registry.output_class(task.spec.type)
            expected = output_class.DESCRIPTOR.full_name if output_class is not None else ""
            got = result.output.type_url.rpartition("/")[2]
            if expected and got != expected:
                future = self._finish(
                    entry,
                    S.TASK_STATE_FAILED,
                    error=task_pb2.TaskError(
                        type=BAD_OUTPUT,
                        message=f"handler returned {got or 'nothing'}, expected {expected}",
                    ),
                )
            else:
                future = self._finish(entry, S.TASK_STATE_SUCCEEDED, result=result.output)
        elif outcome == "error":
            retry_after = None
            if result.HasField("retry_after"):
                retry_after = clamp_delay(result.retry_after.seconds + result.retry_after.nanos / 1e9)
            error = task_pb2.TaskError()
            error.CopyFrom(result.error)
            future = self._attempt_failed(entry, error, retry_after)
        elif task.cancel_requested:
            future = self._finish(
                entry,
                S.TASK_STATE_CANCELED,
                error=task_pb2.TaskError(type=CANCELED, message=result.canceled or "canceled"),
            )
        else:
            # Stopped by the worker itself (shutdown): run it again elsewhere, not counted as a failure.
            future = self._requeue(entry)
        _after_commit(future, lambda: session.send_result_ack(ref, True))

    def _oversized(self, entry: Entry, result: coordinator_pb2.AttemptResult, outcome: str | None) -> str:
        """Why this result cannot be stored (too big for its limit or for the task's record), or ""."""
        limits = self.limits_
        if outcome == "output":
            size, limit, what = result.output.ByteSize(), limits.max_result_bytes, "output"
        elif outcome == "error":
            size, limit, what = result.error.ByteSize(), limits.max_error_bytes, "error"
        elif outcome == "canceled":
            size, limit, what = len(result.canceled.encode()), limits.max_error_bytes, "cancel reason"
        else:
            return ""
        if size > limit:
            return f"the attempt's {what} is {size} bytes, at most {limit} allowed"
        # The record holds the result beside everything else (the error once more in the history).
        record = entry.task.ByteSize() + 2 * size + 64
        if record > limits.max_record_bytes:
            return f"the task with this {what} would be {record} bytes, at most {limits.max_record_bytes} allowed"
        return ""

    # ----------------------------------------------------------------- sessions

    def open_session(self, hello: coordinator_pb2.WorkerHello, peer: str) -> tuple[Session, coordinator_pb2.Welcome]:
        self._check()
        settings = self.settings.sessions
        session = Session(
            worker_id=hello.worker_id,
            task_types=frozenset(hello.task_types),
            slots=hello.slots,
            labels=dict(hello.labels),
            address=hello.address or peer,
        )
        welcome = coordinator_pb2.Welcome(session_id=session.id)
        welcome.heartbeat_interval.FromNanoseconds(int(settings.heartbeat_interval * 1e9))
        welcome.heartbeat_timeout.FromNanoseconds(int(settings.heartbeat_timeout * 1e9))
        welcome.ack_timeout.FromNanoseconds(int(settings.ack_timeout * 1e9))
        limits = self.limits_
        welcome.max_result_bytes = limits.max_result_bytes
        welcome.max_error_bytes = limits.max_error_bytes
        welcome.max_progress_bytes = limits.max_progress_bytes
        quarantine = self.quarantined.get(hello.worker_id)
        if quarantine is not None:
            session.quarantined_until = quarantine[0]
        for ref in hello.running:
            entry = self._entries.get(ref.task_id)
            if (
                entry is None
                or entry.task.attempt != ref.attempt
                or entry.task.state not in ACTIVE
                or entry.task.worker_id != hello.worker_id
            ):
                welcome.rejected.append(ref)
                continue
            previous = entry.task.state
            if entry.session is not None and entry.session.held.get(ref.task_id) == ref.attempt:
                del entry.session.held[ref.task_id]
            if entry.ack_timer is not None:
                entry.ack_timer.cancel()
                entry.ack_timer = None
            entry.session = session
            self._adopt(entry)
            session.held[ref.task_id] = ref.attempt
            entry.task.session_id = session.id
            if previous == S.TASK_STATE_ASSIGNED:
                entry.task.state = S.TASK_STATE_RUNNING
                _stamp(entry.task.start_time)
            self._write(entry, previous)
            welcome.reclaimed.append(ref)
        self.sessions[session.id] = session
        log.info(
            "session %s: worker %s, %d slots, types %s, re-claimed %d",
            session.id,
            session.worker_id,
            session.slots,
            sorted(session.task_types),
            len(welcome.reclaimed),
        )
        self._schedule_dispatch()
        return session, welcome

    def heartbeat(self, session: Session, beat: coordinator_pb2.Heartbeat) -> None:
        session.beat()
        if beat.draining and not session.draining:
            session.draining = True
            log.info("session %s is draining", session.id)
        session.ack_heartbeat()

    def close_session(self, session: Session) -> None:
        """The stream ended: its attempts wait heartbeat_timeout for the worker to re-claim them."""
        session.end()
        if self.sessions.pop(session.id, None) is None:
            return
        deadline = time.monotonic() + self.settings.sessions.heartbeat_timeout
        for task_id, attempt in list(session.held.items()):
            entry = self._entries.get(task_id)
            if entry is not None and entry.session is session and entry.task.attempt == attempt:
                if entry.ack_timer is not None:
                    entry.ack_timer.cancel()
                    entry.ack_timer = None
                entry.session = None
                self._orphan(entry, deadline)
        session.held.clear()
        log.info("session %s of worker %s closed", session.id, session.worker_id)

    async def _liveness_loop(self) -> None:
        settings = self.settings.sessions
        while True:
            await asyncio.sleep(min(settings.heartbeat_interval / 2, 0.5))
            now = time.monotonic()
            self._release_quarantines(now)
            for session in list(self.sessions.values()):
                if now - session.last_heartbeat > settings.heartbeat_timeout:
                    log.warning("session %s of worker %s missed its heartbeats", session.id, session.worker_id)
                    self.close_session(session)
                    # Its heartbeats already stopped a timeout ago: no further grace.
                    for entry in self._orphans.values():
                        if entry.task.session_id == session.id:
                            entry.orphan_deadline = now
            for entry in [e for e in self._orphans.values() if e.orphan_deadline <= now]:
                self._adopt(entry)
                if entry.task.state in ACTIVE:
                    log.info("task %s attempt %d lost its worker; re-queued", entry.task.id, entry.task.attempt)
                    self._attempt_failed(
                        entry,
                        task_pb2.TaskError(type=WORKER_LOST, message=f"worker {entry.task.worker_id} went away"),
                    )

    def _orphan(self, entry: Entry, deadline: float) -> None:
        entry.orphan_deadline = deadline
        self._orphans[entry.task.id] = entry

    def _adopt(self, entry: Entry) -> None:
        """The attempt is no longer an orphan: re-claimed, finished or re-queued."""
        if entry.orphan_deadline:
            entry.orphan_deadline = 0.0
            self._orphans.pop(entry.task.id, None)

    def _push(self, task: task_pb2.Task) -> None:
        spec = task.spec
        self.scheduler.push(task.id, spec.type, spec.queue, spec.priority, spec.concurrency_key, task.sequence)
        self._schedule_dispatch()

    def _arm_timeout(self, entry: Entry, started: float) -> None:
        """Fail the current attempt if it is still running `spec.timeout` after it was assigned."""
        task = entry.task
        if task.spec.HasField("timeout") and _seconds(task.spec.timeout) > 0:
            entry.timeout_attempt = task.attempt
            self._timeouts.push(started + clamp_delay(_seconds(task.spec.timeout)), task.id)
            self._timer_wakeup.set()

    async def _timer_loop(self) -> None:
        """Delays and backoffs ending, unstarted tasks expiring, attempts timing out."""
        timers = (self._delayed, self._expiry, self._timeouts)
        while True:
            self._timer_wakeup.clear()
            dues = [due for due in (t.next_due() for t in timers) if due is not None]
            if not dues:
                await self._timer_wakeup.wait()
                continue
            wait = min(dues) - time.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._timer_wakeup.wait(), wait)
                continue
            now = time.time()
            for task_id in self._delayed.pop_due(now):
                entry = self._entries.get(task_id)
                if entry is not None and entry.task.state == S.TASK_STATE_PENDING:
                    self._requeue(entry)
            for task_id in self._expiry.pop_due(now):
                entry = self._entries.get(task_id)
                if entry is not None and entry.task.attempt == 0 and entry.task.state not in TERMINAL | ACTIVE:
                    error = task_pb2.TaskError(type=EXPIRED, message="not started within its ttl")
                    self._finish(entry, S.TASK_STATE_EXPIRED, error=error)
            for task_id in self._timeouts.pop_due(now):
                entry = self._entries.get(task_id)
                if entry is not None and entry.task.state in ACTIVE and entry.task.attempt == entry.timeout_attempt:
                    self._time_out(entry)

    def _time_out(self, entry: Entry) -> None:
        task = entry.task
        limit = _seconds(task.spec.timeout)
        session, attempt = entry.session, task.attempt
        log.info("task %s attempt %d timed out after %.3gs", task.id, attempt, limit)
        error = task_pb2.TaskError(type=TIMEOUT, message=f"attempt {attempt} ran longer than {limit:g}s")
        failed = self._attempt_failed(entry, error)
        if session is not None:
            self._cancel_after(failed, session, task.id, attempt, "timed out")

    @staticmethod
    def _cancel_after(written: asyncio.Future[int], session: Session, task_id: str, attempt: int, reason: str) -> None:
        """Tell the worker to stop an attempt once its failure is committed."""
        ref = coordinator_pb2.AttemptRef(task_id=task_id, attempt=attempt)
        message = coordinator_pb2.ConnectResponse(cancel=coordinator_pb2.CancelAttempt(ref=ref, reason=reason))
        _after_commit(written, lambda: session.send(message))

    # ----------------------------------------------------------------- retention

    async def _gc_loop(self) -> None:
        """Delete finished tasks whose retention has passed, with their idempotency keys."""
        while True:
            await asyncio.sleep(self.settings.gc_interval)
            try:
                await self.collect_garbage()
            except errors.HerderError as exc:
                log.warning("retention: %s", exc)

    async def collect_garbage(self, page: int = 500) -> int:
        """Delete up to `page` finished tasks that are due; returns how many went."""
        start = keys.gc_prefix(self.prefix)
        due, _, _ = await self.etcd.range(start, keys.gc_until(self.prefix, time.time()), limit=page)
        deletions: list[asyncio.Future[int]] = []
        for kv in due:
            task_id = kv.key.rsplit(b"/", 1)[1].decode()
            state, queue, idempotency_key = kv.value.decode().split("\n", 2)
            # One task's keys go together: a crash never leaves a marker without its task or the reverse.
            writes = [Write(kv.key, None), Write(keys.task(self.prefix, task_id), None)]
            if idempotency_key and self._idempotency.get(idempotency_key) == task_id:
                del self._idempotency[idempotency_key]
                writes.append(Write(keys.idempotency(self.prefix, idempotency_key), None))
            self.book.forget(queue, int(state))
            deletions.append(self.committer.submit(writes))
        for deletion in deletions:
            await self._await(deletion)
        return len(due)

    def retention(self, queue: str) -> float:
        limit = self.limits.get((coordinator_pb2.LIMIT_SCOPE_QUEUE, queue))
        if limit is not None and limit.HasField("retention") and _seconds(limit.retention) > 0:
            return _seconds(limit.retention)
        return self.settings.retention

    # ----------------------------------------------------------------- scheduling settings

    async def set_limit(self, limit: coordinator_pb2.Limit) -> coordinator_pb2.Limit:
        """Store a validated limit; it applies to the next dispatch."""
        self._check()
        stored = coordinator_pb2.Limit()
        stored.CopyFrom(limit)
        await self._await(
            self.committer.submit([Write(keys.limit(self.prefix, limit.scope, limit.name), stored.SerializeToString())])
        )
        self._apply_limit(stored)
        return stored

    def _apply_limit(self, limit: coordinator_pb2.Limit) -> None:
        self.limits[(limit.scope, limit.name)] = limit
        if limit.scope == coordinator_pb2.LIMIT_SCOPE_GLOBAL:
            self.scheduler.set_global_limit(limit.max_running)
        elif limit.scope == coordinator_pb2.LIMIT_SCOPE_QUEUE:
            self.scheduler.set_queue_limit(limit.name, limit.max_running)
        elif limit.scope == coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY:
            self.scheduler.set_key_limit(limit.name, limit.max_running)
            self.scheduler.set_key_weight(limit.name, limit.weight or 1)
        self._schedule_dispatch()

    async def update_priority(self, task_id: str, priority: int) -> task_pb2.Task:
        """Change a PENDING or QUEUED task's priority, durably; the next dispatch uses it."""
        self._check()
        entry = self._entries.get(task_id)
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
                self._schedule_dispatch()
            await self._await(self._write(entry, task.state))
        return task_pb2.Task.FromString(entry.committed)

    def waiting_reason(self, task_id: str) -> str:
        """Why a queued task is held back (a limit it is under), or ""."""
        return self.scheduler.hold_reason(task_id)

    # ----------------------------------------------------------------- status

    def counts(self) -> dict[int, int]:
        return dict(self.book.totals())

    def queue_stats(self) -> list[coordinator_pb2.QueueStats]:
        names = set(self.book.queues()) | set(self.scheduler.queues())
        names |= {name for scope, name in self.limits if scope == coordinator_pb2.LIMIT_SCOPE_QUEUE}
        found = []
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
            )
            set_duration(stats.wait_p50, figures.wait_p50)
            set_duration(stats.wait_p99, figures.wait_p99)
            set_duration(stats.retention, self.retention(name))
            oldest = self.scheduler.oldest(name)
            if oldest is not None and oldest in self._entries:
                stats.oldest_queued_time.CopyFrom(self._entries[oldest].task.queue_time)
                # A whole queue waits when its own or the global limit is full; a key limit holds only its key.
                if self.scheduler.hold_reason(oldest).startswith(("queue", "the global")):
                    stats.held = stats.queued
            found.append(stats)
        return found


def _seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def _seconds_ts(value: timestamp_pb2.Timestamp) -> float:
    return value.seconds + value.nanos / 1e9


def _after_commit(future: asyncio.Future[int], action: Callable[[], None]) -> None:
    def run(f: asyncio.Future[int]) -> None:
        if not f.cancelled() and f.exception() is None:
            action()

    future.add_done_callback(run)
