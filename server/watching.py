"""WatchTasks on any replica: a snapshot or a resume point, then the replica's task feed.

Every stream subscribes to the feed (feed.py) first, at revision F, and only then reads what
came before F, so nothing falls in between; per-task revisions drop what it sees twice:
- a new watch sends a snapshot (the leader's memory when this replica leads and has applied
  every commit up to F; else an etcd read, which is at F or later), then the feed's changes
  newer than the snapshot's revision of each task;
- a resumed watch (after_revision A) sends the changes in (A, F] from an etcd watch started at
  A + 1, then the feed's changes after F. If etcd has compacted A away it first sends a response
  with only `compacted_revision`, then a fresh snapshot.
Revisions are etcd's, the same on every replica, so a client can resume anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from herder.clients import errors
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys, validation
from herder.server._etcd import CompactedError, EtcdError, prefix_end
from herder.server.entries import TERMINAL
from herder.server.feed import Feed
from herder.server.leader import NamespaceLeader
from herder.server.reads import StoredReads
from herder.server.watchers import Published, TaskFilter, WatchSettings, state_of

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# How often a catch-up watch asks etcd whether it has sent everything up to the feed's revision.
_CATCH_UP_PROGRESS = 0.2
# How stale a follower's copy of the registered task types may be when it renders result_json.
_TYPES_MAX_AGE = 5.0


class Watching:
    """The body of WatchTasks for one replica; it owns the count of open streams."""

    def __init__(
        self, coordinator: Any, settings: WatchSettings, limits: validation.Limits, stored: StoredReads
    ) -> None:
        # herder.server.app.Coordinator; typed loosely to keep the import one-way.
        self._coordinator = coordinator
        self._settings = settings
        self._limits = limits
        # WatchTasks streams open on this replica, against WatchSettings.max_watchers.
        self.watchers = 0
        # A follower renders result_json with the task types it reads from etcd.
        self._stored = stored

    @property
    def _feed(self) -> Feed:
        feed: Feed = self._coordinator.feed
        return feed

    def _leading(self) -> NamespaceLeader | None:
        leader: NamespaceLeader | None = self._coordinator.leader
        return None if leader is None or leader.deposed else leader

    # A coroutine writing with context.write, not a generator: every await is in this method, so the
    # `finally` that gives the stream's slot back runs on every exit (cancel, abort, shutdown).
    async def serve(self, request: coordinator_pb2.WatchTasksRequest, context: Context) -> None:
        settings = self._settings
        try:
            violations = validation.validate_filter(request.ids, request.states, request.tags, self._limits)
            violations += validation.validate_max_events(request.max_events)
            if request.after_revision:
                violations += validation.validate_after_revision(
                    request.after_revision, await self._current_revision(request.after_revision)
                )
            validation.raise_if(violations, "invalid watch request")
            if self.watchers >= settings.max_watchers:
                raise errors.ResourceExhaustedError(
                    f"this coordinator already serves {self.watchers} WatchTasks streams, its limit "
                    f"(--max-watchers / HERDER_MAX_WATCHERS = {settings.max_watchers}); close watches that are "
                    "no longer read or narrow several into one, then retry"
                )
        except errors.HerderError as exc:
            await context.abort_with_status(errors.to_status(exc))
            return
        self.watchers += 1
        try:
            await self._watch(request, context)
        finally:
            self.watchers -= 1

    async def _current_revision(self, wanted: int) -> int:
        """etcd's current revision, or the feed's when that already covers `wanted` (no read then)."""
        if wanted <= self._feed.revision:
            return self._feed.revision
        try:
            return await self._feed.etcd_revision()
        except EtcdError as exc:
            raise errors.UnavailableError(f"cannot reach etcd to check after_revision: {exc}") from None

    async def _watch(self, request: coordinator_pb2.WatchTasksRequest, context: Context) -> None:
        task_filter = TaskFilter(
            ids=frozenset(request.ids),
            queue=request.queue,
            states=frozenset(request.states),
            type=request.type,
            tags=frozenset(request.tags),
        )
        include = request.include_result_json
        try:
            sub, start = await self._feed.subscribe(task_filter, self._settings, context.peer())
        except EtcdError as exc:
            await context.abort_with_status(errors.to_status(errors.UnavailableError(f"cannot watch etcd: {exc}")))
            return
        seen: dict[str, int] = {}
        resume = request.after_revision
        last_sent = resume
        out = _Events(context, request.max_events)
        try:
            try:
                snapshot = not resume and not request.skip_initial
                if resume and resume < start:
                    try:
                        last_sent = await self._catch_up(request, task_filter, resume, start, out)
                    except CompactedError as exc:
                        # Changes were lost to compaction: say so, then start over with the current state.
                        await out.flush()
                        await context.write(coordinator_pb2.WatchTasksResponse(compacted_revision=exc.compact_revision))
                        snapshot, resume = True, 0
                if snapshot:
                    last_sent = max(last_sent, await self._snapshot(request, task_filter, start, seen, out))
                await out.flush()
            except EtcdError as exc:
                error = errors.UnavailableError(
                    f"cannot read etcd: {exc}; {_resume_hint(last_sent)}",
                )
                await context.abort_with_status(errors.to_status(error))
                return
            ready: Published | None
            while (ready := await sub.next()) is not None:
                # With max_events above 1, the changes queued already go out together.
                while ready is not None:
                    revision = ready.change.revision
                    # The resume point and the snapshot already covered these; later changes (several
                    # may share one revision, one transaction) all follow, in order.
                    if revision > resume and revision > seen.get(ready.task_id, 0):
                        if include and include not in ready.responses:
                            await self._load_type(ready.task_type)
                        await out.send(self._change_response(ready, include))
                        last_sent = revision
                    ready = sub.next_ready() if out.batched else None
                await out.flush()
            # A dropped watcher learns it here, once gRPC took what it was sent before: the status could
            # not overtake those messages anyway, so there is nothing to gain by interrupting the write.
            if sub.dropped is not None:
                await context.abort_with_status(self._fell_behind(sub.dropped, last_sent))
            else:
                error = errors.UnavailableError(
                    f"{self._feed.ended_reason or 'the watch ended'}; {_resume_hint(last_sent)}"
                )
                await context.abort_with_status(errors.to_status(error))
        finally:
            self._feed.unsubscribe(sub)

    async def _catch_up(
        self,
        request: coordinator_pb2.WatchTasksRequest,
        task_filter: TaskFilter,
        after: int,
        until: int,
        out: _Events,
    ) -> int:
        """Send the matching changes in (after, until] from etcd's history; the last revision sent.

        Raises CompactedError when `after + 1` is no longer in etcd's history, EtcdError when etcd fails.
        """
        prefix = keys.tasks_prefix(self._coordinator.prefix)
        last = after
        batches = self._coordinator.etcd.watch_batches(
            prefix, prefix_end(prefix), start_revision=after + 1, prev_kv=True, progress_every=_CATCH_UP_PROGRESS
        )
        async with contextlib.aclosing(batches) as history:
            async for batch in history:
                for event in batch.events:
                    revision = event.mod_revision
                    if event.deleted or revision > until:
                        continue
                    task = task_pb2.Task.FromString(event.value)
                    if not task_filter.matches(task):
                        continue
                    response = coordinator_pb2.WatchTasksResponse()
                    if request.include_result_json:
                        await self._load_type(task.spec.type)
                    response.event.task.CopyFrom(self._render(task, request.include_result_json))
                    response.event.previous_state = state_of(event.prev_value)  # type: ignore[assignment]
                    response.event.revision = revision
                    await out.send(response)
                    last = revision
                await out.flush()
                # A progress notice means etcd sent everything up to its revision, which is past `until`.
                if batch.progress or batch.revision >= until:
                    break
        return last

    async def _snapshot(
        self,
        request: coordinator_pb2.WatchTasksRequest,
        task_filter: TaskFilter,
        start: int,
        seen: dict[str, int],
        out: _Events,
    ) -> int:
        """Send the current state of the watched tasks, each at least as new as revision `start`; the
        highest revision sent. `seen` gets each task's revision, so the feed's older changes are dropped."""
        last = 0
        async for task, revision in self._current(request, task_filter, start):
            seen[task.id] = revision
            if task_filter.matches(task):
                if request.include_result_json:
                    await self._load_type(task.spec.type)
                event = task_pb2.TaskEvent(
                    task=self._render(task, request.include_result_json), initial=True, revision=revision
                )
                await out.send(coordinator_pb2.WatchTasksResponse(event=event))
                last = max(last, revision)
        return last

    async def _current(
        self, request: coordinator_pb2.WatchTasksRequest, task_filter: TaskFilter, start: int
    ) -> AsyncIterator[tuple[task_pb2.Task, int]]:
        """The given tasks in any state, else the unfinished ones matching the filter: (task, revision)."""
        leader = self._leading()
        if leader is not None:
            # The feed may hear of a commit before the leader has applied it. Memory holds every change
            # up to `start` when the leader has applied one at or past it, or when no transaction is in
            # flight, once the commit callbacks already due have run (the sleep lets them).
            current = leader.applied_revision >= start or leader.committer.idle
            await asyncio.sleep(0)
            if not current or leader.deposed:
                leader = None
        etcd = self._coordinator.etcd
        ns = self._coordinator.prefix
        if request.ids:
            for task_id in dict.fromkeys(request.ids):
                if leader is not None:
                    try:
                        found = await leader.get_with_revision(task_id)
                    except errors.NotFoundError:
                        continue
                    yield found
                    continue
                kv, _ = await etcd.get(keys.task(ns, task_id))
                if kv is not None:
                    yield task_pb2.Task.FromString(kv.value), kv.mod_revision
        elif leader is not None:
            async for task, revision in leader.active_snapshots():
                if task_filter.matches(task):
                    yield task, revision
        else:
            async for kv in etcd.scan_prefix(keys.tasks_prefix(ns)):
                task = task_pb2.Task.FromString(kv.value)
                if task.state not in TERMINAL and task_filter.matches(task):
                    yield task, kv.mod_revision

    async def _load_type(self, name: str) -> None:
        """On a follower, bring the task type used to render result_json up to date (at most every
        _TYPES_MAX_AGE seconds); when etcd cannot tell, the copy it has is used."""
        if self._leading() is None:
            try:
                await self._stored.registry_for(name, _TYPES_MAX_AGE)
            except EtcdError as exc:
                log.info("task type %s not reloaded: %s", name, exc)

    def _render(self, task: task_pb2.Task, include_json: bool) -> task_pb2.Task:
        return self._stored.render(task, include_json, self._leading())

    def _change_response(self, item: Published, include_json: bool) -> coordinator_pb2.WatchTasksResponse:
        """The response for a published change, rendered by the first watcher that sends it and
        shared by the others (the waiting reason is the one at that moment)."""
        response = item.responses.get(include_json)
        if response is None:
            response = coordinator_pb2.WatchTasksResponse()
            event = response.event
            event.task.ParseFromString(item.change.record)
            self._render(event.task, include_json)
            event.previous_state = item.change.previous_state  # type: ignore[assignment]
            event.revision = item.change.revision
            item.responses[include_json] = response
        return response

    def _fell_behind(self, dropped: tuple[int, int], last_sent: int) -> grpc.Status:
        changes, size = dropped
        settings = self._settings
        sent = f"the last change sent was at revision {last_sent}" if last_sent else "nothing was sent yet"
        error = errors.ResourceExhaustedError(
            f"this watch fell {changes} changes ({size} bytes) behind, past the coordinator's backlog of "
            f"{settings.max_backlog} changes (--watch-backlog) or {settings.max_backlog_bytes} bytes, and was "
            f"ended; {sent}. Read faster or narrow the filter, and watch again with after_revision set to the "
            "last revision received to resume where it ended"
        )
        return errors.to_status(error)


class _Events:
    """A stream's writes: each response as it comes, or with max_events above 1 its event gathered
    into one response of up to max_events, written when full or flushed."""

    __slots__ = ("_context", "_max", "_pending", "batched")

    def __init__(self, context: Context, max_events: int) -> None:
        self._context = context
        self._max = max(max_events, 1)
        self.batched = self._max > 1
        self._pending = coordinator_pb2.WatchTasksResponse()

    async def send(self, response: coordinator_pb2.WatchTasksResponse) -> None:
        if not self.batched:
            await self._context.write(response)
            return
        self._pending.events.append(response.event)
        if len(self._pending.events) >= self._max:
            await self.flush()

    async def flush(self) -> None:
        if self.batched and self._pending.events:
            pending, self._pending = self._pending, coordinator_pb2.WatchTasksResponse()
            await self._context.write(pending)


def _resume_hint(last_sent: int) -> str:
    if last_sent:
        return f"watch again with after_revision={last_sent} to resume where it ended"
    return "watch again"


__all__ = ["Watching"]
