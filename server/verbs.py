"""Operator verbs of the namespace leader: retry a finished task, and cancel or retry many by a filter.

They follow the leader's one rule (leader.py): memory changes synchronously, each task's
change is one committer request (the committer packs them into transactions within its op
limit, so a bulk call of thousands is chunked there), and callers are answered once every
write is committed. A bulk call takes at most `limit` tasks and says whether more match.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from herder.clients import errors
from herder.clients.outcomes import ACK_TIMEOUT, CANCELED, EXPIRED
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys
from herder.server.committer import Write
from herder.server.entries import ACTIVE, TERMINAL, Entry, S
from herder.server.horizon import stamp_now
from herder.server.watchers import TaskFilter

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

RETRYABLE = frozenset({S.TASK_STATE_FAILED, S.TASK_STATE_CANCELED, S.TASK_STATE_EXPIRED})
UNFINISHED = frozenset(S.values()) - TERMINAL - {S.TASK_STATE_UNSPECIFIED}
COPY = coordinator_pb2.RETRY_MODE_COPY
# Most tasks one bulk call takes: its writes and its answer stay bounded.
MAX_BULK = 10_000


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("TASK_STATE_")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class BulkOutcome:
    matched: int
    changed: int
    more: bool


class Verbs:
    """RetryTask, CancelTasks and RetryTasks of one NamespaceLeader."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader

    # ----------------------------------------------------------------- retry one

    async def retry(self, task_id: str, mode: int, reason: str, idempotency_key: str = "") -> task_pb2.Task:
        """Run a FAILED, CANCELED or EXPIRED task again; another state is FailedPreconditionError."""
        leader = self._leader
        leader.check()
        self._refuse_unfinished(task_id)
        task, revision = await leader.get_with_revision(task_id)
        if task.state not in RETRYABLE:
            raise errors.FailedPreconditionError(
                f"task {task_id} is {state_name(task.state)}: only a FAILED, CANCELED or EXPIRED task can be retried"
            )
        if mode == COPY:
            return await self._copy(task, reason, idempotency_key)
        # Read from etcd: a second retry of the same task may have got here first (a double click).
        self._refuse_unfinished(task_id)
        future = self.again(task, revision, reason)
        await leader.await_commit(future)
        entry = leader.entries.get(task_id)
        return task_pb2.Task.FromString(entry.committed) if entry is not None else await leader.get(task_id)

    def _refuse_unfinished(self, task_id: str) -> None:
        entry = self._leader.entries.get(task_id)
        if entry is not None:
            state = entry.task.state
            what = "finishing" if state in TERMINAL else state_name(state)
            raise errors.FailedPreconditionError(
                f"task {task_id} is {what}: only a FAILED, CANCELED or EXPIRED task can be retried"
            )

    async def _copy(self, task: task_pb2.Task, reason: str, idempotency_key: str) -> task_pb2.Task:
        spec = task_pb2.TaskSpec()
        spec.CopyFrom(task.spec)
        # The original's key names the original; the caller's key (if any) guards this copy.
        spec.idempotency_key = idempotency_key
        spec.ClearField("not_before")
        [(copy, _)] = await self._leader.submit([spec], dict(task.trace_context), retry_of=[task.id])
        return copy

    def again(self, task: task_pb2.Task, revision: int, reason: str) -> asyncio.Future[int]:
        """Put a finished task back to QUEUED as a new attempt; returns its write. The task must not be in memory."""
        leader = self._leader
        previous = task.state
        entry = Entry(task, task.SerializeToString(), revision)
        leader.entries[task.id] = entry
        extra: tuple[Write, ...] = ()
        if task.HasField("delete_time"):
            # Its retention marker would delete the task while it runs again.
            seconds, nanos = task.delete_time.seconds, task.delete_time.nanos
            extra = (Write(keys.gc_ms(leader.prefix, seconds * 1000 + nanos // 1_000_000, task.id), None),)
        # A cancel or expiry never reached attempt_errors: kept there, so the history shows why it stopped.
        if task.error.type in (CANCELED, EXPIRED) and (
            not task.attempt_errors or task.attempt_errors[-1] != task.error
        ):
            task.attempt_errors.add().CopyFrom(task.error)
        task.failures_before_retry = sum(1 for e in task.attempt_errors if e.type != ACK_TIMEOUT)
        task.retries += 1
        task.retry_reason = reason
        for name in ("error", "result", "progress", "finish_time", "delete_time", "next_run_time", "result_json"):
            task.ClearField(name)
        task.cancel_requested = False
        task.worker_id = ""
        task.session_id = ""
        # Behind the tasks already waiting at its priority, as if submitted now.
        leader.sequence += 1
        task.sequence = leader.sequence
        task.state = S.TASK_STATE_QUEUED
        stamp_now(task.queue_time)
        leader.push(task)
        return leader.write(entry, previous, extra)

    # ----------------------------------------------------------------- bulk

    async def cancel_many(self, task_filter: TaskFilter, reason: str, limit: int, dry_run: bool) -> BulkOutcome:
        """Cancel the unfinished tasks the filter matches (the leader holds every one), up to `limit`."""
        leader = self._leader
        leader.check()
        matched: list[Entry] = []
        more = False
        for i, entry in enumerate(list(leader.entries.values())):
            if i % 2000 == 1999:
                await asyncio.sleep(0)  # a large backlog does not hold up everything else
            if not entry.committed or entry.fresh:
                continue
            task = entry.task
            if task.state in TERMINAL or task.cancel_requested or not task_filter.matches(task):
                continue
            if len(matched) == limit:
                more = True
                break
            matched.append(entry)
        if dry_run:
            return BulkOutcome(len(matched), 0, more)
        futures = [f for entry in matched if (f := self._cancel(entry, reason)) is not None]
        for future in futures:
            await leader.await_commit(future)
        return BulkOutcome(len(matched), len(futures), more)

    def _cancel(self, entry: Entry, reason: str) -> asyncio.Future[int] | None:
        leader = self._leader
        task = entry.task
        if task.state in TERMINAL or task.cancel_requested:
            return None  # changed while an earlier page yielded
        if task.state in ACTIVE and entry.session is not None and not entry.session.closed:
            task.cancel_requested = True
            future = leader.write(entry, task.state)
            leader.cancel_after(future, entry.session, task.id, task.attempt, reason or "canceled")
            return future
        error = task_pb2.TaskError(type=CANCELED, message=reason or "canceled", retryable=False)
        return leader.finish(entry, S.TASK_STATE_CANCELED, error=error)

    async def retry_many(
        self, task_filter: TaskFilter, mode: int, reason: str, limit: int, dry_run: bool
    ) -> BulkOutcome:
        """Retry the finished tasks the filter matches (read from etcd), up to `limit`."""
        leader = self._leader
        leader.check()
        prefix = keys.tasks_prefix(leader.prefix)
        found: list[tuple[task_pb2.Task, int]] = []
        more = False
        turn = time.monotonic()
        # Closed on the early break: the scan reads its next page ahead.
        async with contextlib.aclosing(leader.etcd.scan_prefix(prefix)) as stored:
            async for kv in stored:
                if time.monotonic() - turn > 0.01:
                    await asyncio.sleep(0)
                    turn = time.monotonic()
                task = task_pb2.Task.FromString(kv.value)
                if task.state not in RETRYABLE or not task_filter.matches(task):
                    continue
                if len(found) == limit:
                    more = True
                    break
                found.append((task, kv.mod_revision))
        if dry_run:
            return BulkOutcome(len(found), 0, more)
        futures: list[asyncio.Future[int]] = []
        copies: list[task_pb2.Task] = []
        for task, revision in found:
            if task.id in leader.entries:
                continue  # retried by someone else since it was read
            if mode == COPY:
                copies.append(task)
            else:
                futures.append(self.again(task, revision, reason))
        for future in futures:
            await leader.await_commit(future)
        for start in range(0, len(copies), 1000):
            batch = copies[start : start + 1000]
            specs = []
            for task in batch:
                spec = task_pb2.TaskSpec()
                spec.CopyFrom(task.spec)
                spec.idempotency_key = ""
                spec.ClearField("not_before")
                specs.append(spec)
            await leader.submit(specs, retry_of=[task.id for task in batch])
        return BulkOutcome(len(found), len(futures) + len(copies), more)
