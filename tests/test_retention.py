"""Retention: finished tasks deleted after their queue's retention, bounding etcd."""

from __future__ import annotations

import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker
from _scheduling import (
    ECHO,
    QUEUE,
    Api,
    S,
    complete,
    connect,
    dispatch_order,
    get,
    gone,
    has_state,
    no_keys,
    queue_stats,
    set_limit,
    state,
    submit,
    submit_batch,
)
from _timing import SLACK, assert_between, eventually, now, quiet, seconds, until

from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(60)


async def test_finished_tasks_are_deleted_after_their_queues_retention(api, kv, namespace) -> None:
    await set_limit(api, QUEUE, "brief", retention=1.0)
    brief = await submit(api, queue="brief")
    kept = await submit(api, queue="kept")
    stats = await queue_stats(api, "brief")
    assert stats is not None and seconds(stats.retention) == 1.0
    finished = seconds((await api.client.cancel(brief.id)).finish_time)
    await api.client.cancel(kept.id)
    await eventually(lambda: gone(api, brief.id), timeout=1 + SLACK + 5, what="the finished task deleted")
    assert_between(now() - finished, 1.0, 1.0 + SLACK + 1, "deletion after the queue's retention of 1 s")
    await eventually(lambda: no_keys(kv, namespace, [brief.id]), what="its etcd keys gone")
    assert (await get(api, kept.id)).state == S.TASK_STATE_CANCELED


async def test_the_coordinator_retention_bounds_etcd_under_steady_load(etcd, namespace, kv) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--retention", "1"]) as node:
        async with connect(node) as api:
            ids: list[str] = []
            async with RawWorker(node.address, "w", [ECHO], slots=1) as worker:
                for _ in range(3):  # three waves of 10 finished tasks, one second apart
                    wave = await submit_batch(api, 10)
                    for task_id in wave[5:]:  # still queued: the 1-slot worker holds at most wave[0]
                        await api.client.cancel(task_id)
                    for _ in wave[:5]:
                        await complete(worker, await worker.next_assignment())
                    ids += wave
                    await until(now() + 1.0)
            await eventually(
                lambda: no_keys(kv, namespace, ids), timeout=1 + SLACK + 5, what="every finished task's keys gone"
            )
            for task_id in ids[:3]:
                assert await gone(api, task_id)
            left = [item.key async for item in kv.scan_prefix(f"/herder/{namespace}/tasks/".encode())]
            assert left == []


async def test_retention_applies_to_tasks_finished_before_a_restart(etcd, namespace, kv) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--retention", "3"]) as node:
        async with connect(node) as api:
            task = await submit(api)
            finished = seconds((await api.client.cancel(task.id)).finish_time)
        node.restart()
        async with connect(node) as api:
            assert await state(api, task.id) == S.TASK_STATE_CANCELED, "deleted before its retention"
            await eventually(lambda: gone(api, task.id), timeout=3 + SLACK + 5, what="deleted after a restart")
            assert_between(now() - finished, 3.0, 3.0 + SLACK + 1, "deletion 3 s after finishing")
            await eventually(lambda: no_keys(kv, namespace, [task.id]), what="its etcd keys gone")


# ---------------------------------------------------------------------------- visibility


async def test_list_queues_shows_backlog_running_limit_and_held(api, coordinator) -> None:
    await set_limit(api, QUEUE, "vis", max_running=1)
    pending = await submit(api, queue="vis", delay=60)
    queued = [await submit(api, str(n), queue="vis") for n in range(3)]
    async with RawWorker(coordinator.address, "w", [ECHO], slots=2) as worker:
        first = await worker.next_assignment()
        assert first.id == queued[0].id
        await worker.ack(first)
        await eventually(lambda: has_state(api, first.id, S.TASK_STATE_RUNNING), what="RUNNING")
        await quiet(worker.assignments, 0.3, what="assignment over the queue limit")
        stats = await queue_stats(api, "vis")
        assert stats is not None
        seen = (stats.pending, stats.queued, stats.assigned, stats.running, stats.limit, stats.held)
        assert seen == (1, 2, 0, 1, 1, 2), "pending, queued, assigned, running, limit, held"
        oldest = await get(api, queued[1].id)
        assert seconds(stats.oldest_queued_time) == seconds(oldest.queue_time)
        await worker.succeed(first.id, 1, examples_pb2.EchoResponse())
        await dispatch_order(worker, 2)
    await eventually(lambda: _settled(api, "vis"), what="3 SUCCEEDED in ListQueues")
    stats = await queue_stats(api, "vis")
    assert stats is not None
    assert (stats.pending, stats.queued, stats.running, stats.held, stats.succeeded) == (1, 0, 0, 0, 3)
    assert 0 < seconds(stats.wait_p50) <= seconds(stats.wait_p99)
    assert stats.dispatch_rate > 0
    assert await state(api, pending.id) == S.TASK_STATE_PENDING


async def _settled(api: Api, queue: str) -> bool:
    stats = await queue_stats(api, queue)
    return stats is not None and stats.succeeded == 3


async def test_requested_resources_are_stored_and_shown(api) -> None:
    resources = task_pb2.Resources(cpu_millis=1500, memory_bytes=256 << 20)
    task = await submit(api, resources=resources)
    assert (await get(api, task.id)).spec.resources == resources
