"""Retention: finished tasks are deleted once their queue's retention has passed.

A task's terminal write carries its gc marker (`marker()`), a key ordered by
its deletion time, so the marker and the task land together and a crash never
loses one without the other. The gc loop deletes due markers with their task
and idempotency key in one request each; a finished task therefore lives at
least its queue's retention, and at least the idempotency window, so its key
keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from herder.clients import errors
from herder.clients.endpoints import AUTO_KEY_PREFIX
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import keys
from herder.server._etcd import EtcdError
from herder.server.committer import Write
from herder.server.horizon import duration_seconds, timestamp_seconds

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

log = logging.getLogger(__name__)


class Retention:
    """Retention of one NamespaceLeader; `run()` is its supervised gc loop."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader

    def period(self, queue: str) -> float:
        """Seconds a finished task of the queue is kept: the queue's own retention, else the default."""
        limit = self._leader.limits.get((coordinator_pb2.LIMIT_SCOPE_QUEUE, queue))
        if limit is not None and limit.HasField("retention") and duration_seconds(limit.retention) > 0:
            return duration_seconds(limit.retention)
        return self._leader.settings.retention

    def marker(self, task: task_pb2.Task) -> Write:
        """The gc marker to write with a task's terminal state."""
        # Deleted after the queue's retention, and not before its idempotency key stops answering
        # (a key the SDK made guards only its retries of one call: it lives as long as the task).
        delete_at = time.time() + self.period(task.spec.queue)
        if task.spec.idempotency_key and not task.spec.idempotency_key.startswith(AUTO_KEY_PREFIX):
            delete_at = max(delete_at, timestamp_seconds(task.create_time) + self._leader.settings.idempotency_window)
        marker = f"{task.state}\n{task.spec.queue}\n{task.spec.idempotency_key}".encode()
        # Recorded on the task, so that RetryTask can delete exactly this marker.
        delete_ms = int(delete_at * 1000)
        task.delete_time.seconds, task.delete_time.nanos = divmod(delete_ms, 1000)
        task.delete_time.nanos *= 1_000_000
        return Write(keys.gc_ms(self._leader.prefix, delete_ms, task.id), marker)

    async def run(self) -> None:
        """Delete finished tasks whose retention has passed, with their idempotency keys."""
        while True:
            await asyncio.sleep(self._leader.settings.gc_interval)
            try:
                await self.collect_garbage()
            except errors.HerderError as exc:
                log.warning("retention: %s", exc)
            except EtcdError as exc:
                # A failed read (an etcd leader change, a member going away) changed nothing: try next round.
                # A failed commit deposes the leader through the committer, not here.
                log.warning("retention: reading due tasks failed: %s; retrying", exc)

    async def collect_garbage(self, page: int = 500) -> int:
        """Delete up to `page` finished tasks that are due; returns how many went."""
        leader = self._leader
        start = keys.gc_prefix(leader.prefix)
        due, _, _ = await leader.etcd.range(start, keys.gc_until(leader.prefix, time.time()), limit=page)
        deletions: list[asyncio.Future[int]] = []
        for kv in due:
            task_id = kv.key.rsplit(b"/", 1)[1].decode()
            state, queue, idempotency_key = kv.value.decode().split("\n", 2)
            if task_id in leader.entries:
                # Retried since it finished (a task finished before delete_time existed): only the marker goes.
                deletions.append(leader.committer.submit([Write(kv.key, None)]))
                continue
            # One task's keys go together: a crash never leaves a marker without its task or the reverse.
            writes = [Write(kv.key, None), Write(keys.task(leader.prefix, task_id), None)]
            if idempotency_key and leader.idempotency.get(idempotency_key) == task_id:
                del leader.idempotency[idempotency_key]
                writes.append(Write(keys.idempotency(leader.prefix, idempotency_key), None))
            leader.book.forget(queue, int(state))
            deletions.append(leader.committer.submit(writes))
        for deletion in deletions:
            await leader.await_commit(deletion)
        return len(due)
