"""Fan-out of committed task changes to WatchTasks streams.

Each replica's task feed (feed.py) publishes every committed change it reads
from etcd, with the revision it landed at. A subscriber registers before it
reads the current state, so no change falls between the snapshot and the
stream; revisions drop duplicates.

Watchers cannot make a replica pay for them beyond what they ask for:
- publishing a change tests only the subscriptions indexed under its task id,
  queue or type, and those that watch everything (no id, queue or type
  filter); `wants` tells the feed in three dict lookups whether anyone could
  want a change at all, so nobody renders one that nobody wants;
- a change is wrapped once and the same object is queued for every watcher it
  matches, so a record is parsed and rendered once per change, not per watcher;
- a watcher whose backlog passes `WatchSettings.max_backlog` changes (or
  `max_backlog_bytes`) is dropped at once: its queue is released, publishing
  no longer sees it, and its stream ends with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from herder.clients.proto.v1 import coordinator_pb2, task_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """What WatchTasks streams may cost one coordinator replica.

    max_watchers: WatchTasks streams served at once; one more is refused with RESOURCE_EXHAUSTED.
    A stream holds its slot until its handler ends: a watcher that was cut off keeps it until its
    client reads the error or goes away (the status cannot overtake the messages gRPC holds).
    max_backlog: changes queued for one watcher and not yet taken by gRPC. A watcher that falls
    further behind is ended with RESOURCE_EXHAUSTED and its queue released. It must exceed the
    largest burst one commit publishes (a few hundred changes), or healthy readers are cut off.
    max_backlog_bytes: the same bound in record bytes, for tasks with large payloads or results.
    A queued change is one object shared by every watcher it matched; each watcher adds one
    pointer per change, so queues cost at most max_watchers x max_backlog pointers (80 MB at the
    defaults) plus the records, which are usually shared.
    """

    max_watchers: int = 1000
    max_backlog: int = 10_000
    max_backlog_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a watcher or a listing wants; empty fields match everything."""

    ids: frozenset[str] = frozenset()
    queue: str = ""
    states: frozenset[int] = frozenset()
    type: str = ""
    tags: frozenset[str] = frozenset()
    # Seconds since the epoch: created at or after / before.
    created_after: float | None = None
    created_before: float | None = None

    def matches(self, task: task_pb2.Task) -> bool:
        if self.ids and task.id not in self.ids:
            return False
        if self.queue and task.spec.queue != self.queue:
            return False
        if self.states and task.state not in self.states:
            return False
        if self.type and task.spec.type != self.type:
            return False
        if self.created_after is not None or self.created_before is not None:
            created = task.create_time.seconds + task.create_time.nanos / 1e9
            if self.created_after is not None and created < self.created_after:
                return False
            if self.created_before is not None and created >= self.created_before:
                return False
        return not self.tags or self.tags.issubset(task.spec.tags)


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change: the record as stored, its state before, and the revision it landed at."""

    record: bytes
    previous_state: int
    revision: int


def state_of(record: bytes | None) -> int:
    """The state a stored task record holds (UNSPECIFIED for none: a change that created the task)."""
    return task_pb2.TASK_STATE_UNSPECIFIED if record is None else task_pb2.Task.FromString(record).state


@dataclass(eq=False, slots=True)
class Published:
    """A change as queued for watchers: one object, shared by every subscription it matched.

    `responses` holds what the gRPC edge rendered from it, by include_result_json, so the
    record is parsed and rendered once per change and option however many watchers send it.
    """

    change: Change
    task_id: str
    task_type: str
    responses: dict[bool, coordinator_pb2.WatchTasksResponse] = field(default_factory=dict)


class Subscription:
    """One watcher's changes, in publish order. Made by `WatchHub.subscribe`."""

    __slots__ = ("_backlog", "_bytes", "_max_backlog", "_max_bytes", "_waiter", "closed", "dropped", "filter", "name")

    def __init__(self, task_filter: TaskFilter, settings: WatchSettings, name: str) -> None:
        self.filter = task_filter
        self.name = name
        self._max_backlog = settings.max_backlog
        self._max_bytes = settings.max_backlog_bytes
        self._backlog: deque[Published] = deque()
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        # When it fell too far behind: the changes and record bytes it was behind by.
        self.dropped: tuple[int, int] | None = None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def offer(self, item: Published) -> bool:
        """Queue a change; False, with the backlog released and the subscription ended, when it
        would pass the bounds."""
        size = len(item.change.record)
        if len(self._backlog) >= self._max_backlog or self._bytes + size > self._max_bytes:
            self.dropped = (len(self._backlog) + 1, self._bytes + size)
            self._backlog.clear()
            self._bytes = 0
            self.close()
            return False
        self._backlog.append(item)
        self._bytes += size
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return True

    def close(self) -> None:
        """End the subscription: `next` returns what is queued, then None."""
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Published | None:
        """The next change, waiting for one; None once the subscription is closed (the feed ended)
        and drained, or dropped. Cancelling the wait loses nothing."""
        while not self._backlog:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._pop()

    def next_ready(self) -> Published | None:
        """The next change if one is queued already, else None (without waiting)."""
        return self._pop() if self._backlog else None

    def _pop(self) -> Published:
        item = self._backlog.popleft()
        self._bytes -= len(item.change.record)
        return item


class WatchHub:
    """A replica's subscriptions, each indexed under one key: its ids, else its queue, else its
    type, else "everything" (only states or tags, or no filter). A change's candidates are the
    subscriptions under its id, its queue, its type and everything; each is in one index, so
    none is tested twice and no other is tested at all."""

    def __init__(self) -> None:
        self._by_id: dict[str, set[Subscription]] = {}
        self._by_queue: dict[str, set[Subscription]] = {}
        self._by_type: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
        self._all: set[Subscription] = set()

    def __len__(self) -> int:
        return len(self._all)

    def subscribe(self, task_filter: TaskFilter, settings: WatchSettings | None = None, name: str = "") -> Subscription:
        """A subscription to changes matching the filter; `name` (the peer) is for the log."""
        sub = Subscription(task_filter, settings or WatchSettings(), name)
        if task_filter.ids:
            for task_id in task_filter.ids:
                self._by_id.setdefault(task_id, set()).add(sub)
        elif task_filter.queue:
            self._by_queue.setdefault(task_filter.queue, set()).add(sub)
        elif task_filter.type:
            self._by_type.setdefault(task_filter.type, set()).add(sub)
        else:
            self._everything.add(sub)
        self._all.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget the subscription (safe twice)."""
        if sub not in self._all:
            return
        self._all.discard(sub)
        task_filter = sub.filter
        if task_filter.ids:
            for task_id in task_filter.ids:
                _discard(self._by_id, task_id, sub)
        elif task_filter.queue:
            _discard(self._by_queue, task_filter.queue, sub)
        elif task_filter.type:
            _discard(self._by_type, task_filter.type, sub)
        else:
            self._everything.discard(sub)

    def may_want(self, task_id: str) -> bool:
        """Whether any subscription could match a change of this task, known from its id alone (then
        its record is worth parsing): with only id watchers, other tasks' records are never read."""
        return bool(self._everything or self._by_queue or self._by_type) or task_id in self._by_id

    def wants(self, task_id: str, queue: str, task_type: str) -> bool:
        """Whether any subscription could match a change of this task (then it is worth parsing)."""
        return bool(self._everything) or task_id in self._by_id or queue in self._by_queue or task_type in self._by_type

    def publish(self, task: task_pb2.Task, record: bytes, previous_record: bytes | None, revision: int) -> None:
        """Queue the change (`task`, stored as `record` over `previous_record`, None for a new task, at
        `revision`) for every subscription it matches; drop those it puts too far behind.

        The previous record is parsed (for its state) only for a change some subscription takes: most
        changes that pass the hub's id, queue and type indexes fail a filter of states."""
        spec = task.spec
        item: Published | None = None
        dropped: list[Subscription] = []
        for subs in (
            self._by_id.get(task.id),
            self._by_queue.get(spec.queue),
            self._by_type.get(spec.type),
            self._everything,
        ):
            if not subs:
                continue
            for sub in subs:
                if sub.filter.matches(task):
                    if item is None:
                        item = Published(Change(record, state_of(previous_record), revision), task.id, spec.type)
                    if not sub.offer(item):
                        dropped.append(sub)
        for sub in dropped:
            self.unsubscribe(sub)
            changes, size = sub.dropped or (0, 0)
            log.warning(
                "watcher %s fell %d changes (%d bytes) behind at revision %d; ended and its backlog released",
                sub.name or "?",
                changes,
                size,
                revision,
            )

    def close_all(self) -> None:
        """End every subscription (the feed ended); each still gets what is queued for it."""
        for sub in self._all:
            sub.close()
        self._by_id.clear()
        self._by_queue.clear()
        self._by_type.clear()
        self._everything.clear()
        self._all.clear()


def _discard(index: dict[str, set[Subscription]], key: str, sub: Subscription) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
