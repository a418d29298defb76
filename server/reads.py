"""Reads answered from etcd alone: what a follower serves without the leader.

The one rule: a follower answers only from what is committed to etcd (task records, task
types, limits), never from memory it does not own. What only the leader knows (a queued
task's `waiting_reason`) is left empty here; its live state (queues, worker sessions) is
forwarded to it instead (forwarding.py). The task scan is the leader's too, so a page token
(the last etcd key read) works on every replica.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from herder.clients import errors
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd, EtcdError, prefix_end
from herder.server.contracts import TaskTypeRegistry, render_json
from herder.server.watchers import TaskFilter

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader


async def _scan(
    etcd: Etcd, tasks_prefix: bytes, start: bytes, task_filter: TaskFilter, page_size: int, newest_first: bool = False
) -> tuple[list[task_pb2.Task], bool, bytes]:
    """A page of stored tasks after the key `start` (before it, newest first): (tasks, more, last key read).

    Raises EtcdError.
    """
    found: list[task_pb2.Task] = []
    cursor = start + b"\0" if start else tasks_prefix
    end = prefix_end(tasks_prefix)
    if newest_first:
        cursor, end = tasks_prefix, start or end
    last_key = b""
    more = True
    while len(found) < page_size and more:
        kvs, more, _ = await etcd.range(cursor, end, limit=max(page_size * 2, 100), descending=newest_first)
        for kv in kvs:
            last_key = kv.key
            task = task_pb2.Task.FromString(kv.value)
            if task_filter.matches(task):
                found.append(task)
                if len(found) == page_size:
                    more = more or kv is not kvs[-1]
                    break
        if not kvs:
            break
        if newest_first:
            end = last_key
        else:
            cursor = last_key + b"\0"
    return found, more, last_key


class StoredReads:
    """GetTask, ListTasks, ListLimits and ListTaskTypes from etcd, as a follower serves them (the leader
    scans finished tasks and lists types through it too).

    Every method raises UnavailableError when etcd cannot be read (nothing is cached but
    compiled task types, each checked against its stored revision before use).
    """

    def __init__(self, etcd: Etcd, prefix: bytes) -> None:
        self._etcd = etcd
        self._prefix = prefix
        # Task types compiled for result_json, with the mod_revision they were compiled from.
        self._registry = TaskTypeRegistry()
        self._revisions: dict[str, int] = {}
        # When each type's stored revision was last checked (time.monotonic).
        self._checked: dict[str, float] = {}

    @property
    def registry(self) -> TaskTypeRegistry:
        """The task types compiled so far (`registry_for` brings one up to date)."""
        return self._registry

    def render(self, task: task_pb2.Task, include_json: bool, leader: NamespaceLeader | None) -> task_pb2.Task:
        """What a reader sees of `task`: `result_json` when asked for (with the leader's types, else
        those compiled here), and on the leader a queued task's `waiting_reason` (only it knows)."""
        if include_json and task.HasField("result"):
            registry = leader.registry if leader is not None else self._registry
            task.result_json = render_json(task.result, registry, task.spec.type)
        if leader is not None and task.state == task_pb2.TASK_STATE_QUEUED:
            task.waiting_reason = leader.waiting_reason(task.id)
        return task

    async def registry_for(self, name: str, max_age: float = 0.0) -> TaskTypeRegistry:
        """The compiled types with `name` at its stored revision, unless that was checked less than
        `max_age` seconds ago (a watch renders many changes: it checks once in a while, not each time).
        Raises EtcdError."""
        checked = self._checked.get(name)
        if checked is None or time.monotonic() - checked >= max_age:
            await self._load_type(name)
            self._checked[name] = time.monotonic()
        return self._registry

    async def get(self, task_id: str, include_json: bool) -> task_pb2.Task:
        """The stored task; NotFoundError when there is none. `waiting_reason` stays empty (leader-only)."""
        with _etcd_unavailable():
            kv, _ = await self._etcd.get(keys.task(self._prefix, task_id))
            if kv is None:
                raise errors.NotFoundError(f"task {task_id} not found")
            task = task_pb2.Task.FromString(kv.value)
            if include_json and task.HasField("result"):
                await self.registry_for(task.spec.type)
        return self.render(task, include_json, None)

    async def tasks(
        self, start: bytes, task_filter: TaskFilter, page_size: int, newest_first: bool = False
    ) -> tuple[list[task_pb2.Task], bool, bytes]:
        """A page of stored tasks after the key `start` (before it, newest first): (tasks, more, last key read).

        The leader uses it too.
        """
        with _etcd_unavailable():
            return await _scan(self._etcd, keys.tasks_prefix(self._prefix), start, task_filter, page_size, newest_first)

    async def limits(self) -> list[coordinator_pb2.Limit]:
        """Every stored limit, ordered by (scope, name) as the leader lists them."""
        with _etcd_unavailable():
            stored = [
                coordinator_pb2.Limit.FromString(kv.value)
                async for kv in self._etcd.scan_prefix(keys.limits_prefix(self._prefix))
            ]
        return sorted(stored, key=lambda limit: (limit.scope, limit.name))

    async def types(self) -> list[task_pb2.TaskType]:
        """Every stored task type, by name (the leader answers from etcd too: one snapshot, one order)."""
        with _etcd_unavailable():
            return [
                task_pb2.TaskType.FromString(kv.value)
                async for kv in self._etcd.scan_prefix(keys.types_prefix(self._prefix))
            ]

    async def versions(self, task_type: task_pb2.TaskType) -> list[task_pb2.TaskType]:
        """The kept versions of `task_type`, newest first; a type stored before versions were kept is its
        own only version (1)."""
        with _etcd_unavailable():
            kept = [
                task_pb2.TaskType.FromString(kv.value)
                async for kv in self._etcd.scan_prefix(keys.type_versions_prefix(self._prefix, task_type.name))
            ]
        kept.sort(key=lambda t: t.version, reverse=True)
        # A snapshot newer than the type is left by a registration that did not finish: not a version.
        kept = [t for t in kept if t.version <= (task_type.version or 1)]
        if not kept or kept[0].version != (task_type.version or 1):
            current = task_pb2.TaskType()
            current.CopyFrom(task_type)
            current.version = current.version or 1
            kept.insert(0, current)
        return kept

    async def _load_type(self, name: str) -> None:
        """Bring the compiled type `name` up to its stored revision (a re-registration is picked up)."""
        kv, _ = await self._etcd.get(keys.task_type(self._prefix, name))
        if kv is None:
            self._registry.discard(name)
            self._revisions.pop(name, None)
            return
        if self._revisions.get(name) == kv.mod_revision:
            return
        self._registry.discard(name)
        # A stored contract that does not compile only costs the JSON view, as on the leader.
        with contextlib.suppress(errors.HerderError):
            self._registry.put(task_pb2.TaskType.FromString(kv.value))
        self._revisions[name] = kv.mod_revision


@contextlib.contextmanager
def _etcd_unavailable() -> Iterator[None]:
    """EtcdError as UnavailableError that says what failed and what to do."""
    try:
        yield
    except EtcdError as exc:
        raise errors.UnavailableError(
            f"this coordinator cannot read etcd to answer ({exc}); retry, or ask another replica"
        ) from exc
