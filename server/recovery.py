"""Recovery: a new leader rebuilds its memory of the namespace from etcd alone, before it serves.

etcd holds every committed change, so this is the whole of failover: limits,
task types, idempotency keys and unfinished tasks are read back, and each task
goes where its stored state says (QUEUED to the scheduler, PENDING to its
delay timer, ASSIGNED or RUNNING counted as running with its timeout armed
again). Nothing is written here; an attempt that was running is left to its
worker, who has heartbeat_timeout to reconnect and re-claim it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

from herder.clients import errors
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.clients.runner import freeze_gc
from herder.server import keys, placement
from herder.server.entries import TERMINAL, Entry, S
from herder.server.horizon import duration_seconds, timestamp_seconds

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

log = logging.getLogger(__name__)

# Plain ints: an enum wrapper's attribute lookup costs a sixth of the rebuild's CPU at 100,000 tasks.
QUEUED = S.TASK_STATE_QUEUED
PENDING = S.TASK_STATE_PENDING


async def rebuild(leader: NamespaceLeader) -> None:
    """Load the namespace's stored state into `leader`, which must not have started yet."""
    etcd, prefix = leader.etcd, leader.prefix
    started = time.monotonic()
    async for kv in etcd.scan_prefix(keys.limits_prefix(prefix)):
        leader.apply_limit(coordinator_pb2.Limit.FromString(kv.value))
    async for kv in etcd.scan_prefix(keys.paused_prefix(prefix)):
        leader.apply_paused(kv.key[len(keys.paused_prefix(prefix)) :].decode(), True)
    async for kv in etcd.scan_prefix(keys.types_prefix(prefix)):
        tt = task_pb2.TaskType.FromString(kv.value)
        with contextlib.suppress(errors.HerderError):
            leader.registry.put(tt)
    async for kv in etcd.scan_prefix(keys.idempotency_prefix(prefix)):
        leader.idempotency[kv.key[len(keys.idempotency_prefix(prefix)) :].decode()] = kv.value.decode()
    grace = time.monotonic() + leader.settings.sessions.heartbeat_timeout
    loaded = 0
    async for kv in etcd.scan_prefix(keys.tasks_prefix(prefix)):
        task = task_pb2.Task.FromString(kv.value)
        leader.sequence = max(leader.sequence, task.sequence)
        leader.book.transition(task.spec.queue, 0, task.state)
        if task.state in TERMINAL:
            continue
        entry = Entry(task, kv.value, kv.mod_revision)
        leader.entries[task.id] = entry
        entry.rest()
        loaded += 1
        if task.state == QUEUED:
            leader.push(task)
        elif task.state == PENDING:
            leader.timers.delay(timestamp_seconds(task.next_run_time), task.id)
        else:
            spec = task.spec
            # With its request: the session that re-claims it has that much reserved.
            leader.scheduler.add_running(
                task.id,
                spec.type,
                spec.queue,
                spec.priority,
                spec.concurrency_key,
                task.sequence,
                placement.requested(spec),
            )
            leader.timers.arm_timeout(entry, timestamp_seconds(task.assign_time))
            # Its worker may still be running it: wait for it to reconnect and re-claim.
            leader.workers.orphan(entry, grace)
        # A retried task's ttl has passed already: RetryTask asked for it to run anyway.
        if task.attempt == 0 and not task.retries and task.spec.HasField("ttl"):
            leader.timers.expire(timestamp_seconds(task.create_time) + duration_seconds(task.spec.ttl), task.id)
    freeze_gc()
    log.info(
        "namespace %s: rebuilt %d unfinished tasks from etcd in %.3fs",
        leader.namespace,
        loaded,
        time.monotonic() - started,
    )
