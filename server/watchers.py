"""Fan-out of committed task changes to WatchTasks streams.

The leader publishes each change after its commit, with the etcd revision it
landed at. A subscriber registers before it reads the current state, so no
change falls between the snapshot and the stream; revisions drop duplicates.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from herder.clients.proto.v1 import task_pb2


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """Which tasks a watcher or a listing wants; empty fields match everything."""

    ids: frozenset[str] = frozenset()
    queue: str = ""
    states: frozenset[int] = frozenset()
    type: str = ""
    tags: frozenset[str] = frozenset()

    def matches(self, task: task_pb2.Task) -> bool:
        if self.ids and task.id not in self.ids:
            return False
        if self.queue and task.spec.queue != self.queue:
            return False
        if self.states and task.state not in self.states:
            return False
        if self.type and task.spec.type != self.type:
            return False
        return not self.tags or self.tags.issubset(task.spec.tags)


@dataclass(frozen=True, slots=True)
class Change:
    """A committed change: the record as stored, its state before, and the revision it landed at."""

    record: bytes
    previous_state: int
    revision: int


@dataclass(eq=False)
class Subscription:
    filter: TaskFilter
    limit: int
    queue: asyncio.Queue[Change | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False

    def offer(self, change: Change) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= self.limit:
            # A watcher that cannot keep up is ended rather than silently skipped.
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(change)

    def close(self) -> None:
        self.queue.put_nowait(None)


class WatchHub:
    def __init__(self) -> None:
        self._by_id: dict[str, set[Subscription]] = {}
        self._filtered: set[Subscription] = set()

    def subscribe(self, task_filter: TaskFilter, limit: int = 100_000) -> Subscription:
        sub = Subscription(task_filter, limit)
        if task_filter.ids:
            for task_id in task_filter.ids:
                self._by_id.setdefault(task_id, set()).add(sub)
        else:
            self._filtered.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        for task_id in sub.filter.ids:
            subs = self._by_id.get(task_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_id[task_id]
        self._filtered.discard(sub)

    def publish(self, task: task_pb2.Task, change: Change) -> None:
        for sub in self._by_id.get(task.id, ()):
            if sub.filter.matches(task):
                sub.offer(change)
        for sub in self._filtered:
            if sub.filter.matches(task):
                sub.offer(change)

    def close_all(self) -> None:
        for sub in {s for subs in self._by_id.values() for s in subs} | self._filtered:
            sub.close()
        self._by_id.clear()
        self._filtered.clear()

    def wants(self, task_id: str) -> bool:
        return bool(self._filtered) or task_id in self._by_id
