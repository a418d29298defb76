"""The SDK's scheduling calls (limits, queues, priorities) against a real etcd and coordinator subprocess."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TypeVar

import pytest
from _cluster import Coordinator
from _timing import eventually

from herder.clients import errors
from herder.clients.client import Client, SyncClient, TaskHandle, parse_scope, scope_name
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.clients.worker import TaskContext, Worker

pytestmark = pytest.mark.timeout(60)


ECHO = "examples.echo"
GLOBAL = coordinator_pb2.LIMIT_SCOPE_GLOBAL
QUEUE = coordinator_pb2.LIMIT_SCOPE_QUEUE
KEY = coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY
T = TypeVar("T")


def summary(limits: list[coordinator_pb2.Limit]) -> dict[tuple[str, str], tuple[int, int, float]]:
    """(scope, name) -> (max_running, weight, retention seconds)."""
    return {
        (scope_name(lim.scope), lim.name): (lim.max_running, lim.weight, lim.retention.ToTimedelta().total_seconds())
        for lim in limits
    }


async def running(handle: TaskHandle) -> bool:
    return (await handle.refresh()).state == task_pb2.TASK_STATE_RUNNING


async def queue_stats(client: Client, name: str) -> coordinator_pb2.QueueStats | None:
    return next((q for q in await client.queues() if q.name == name), None)


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[Client]:
    async with Client(coordinator.address, timeout=5.0) as c:
        await c.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse, "echo")
        yield c


async def test_limits_round_trip(client: Client) -> None:
    assert await client.limits() == []
    stored = await client.set_limit("global", max_running=50)
    assert (stored.scope, stored.name, stored.max_running) == (GLOBAL, "", 50)
    await client.set_limit("queue", "reports", max_running=3, retention=3600)
    await client.set_limit(KEY, "tenant-a", max_running=2, weight=4)
    assert summary(await client.limits()) == {
        ("global", ""): (50, 0, 0.0),
        ("queue", "reports"): (3, 0, 3600.0),
        ("key", "tenant-a"): (2, 4, 0.0),
    }


async def test_set_limit_keeps_the_fields_it_is_not_given(client: Client) -> None:
    await client.set_limit("queue", "reports", max_running=3, retention=timedelta(minutes=10))
    await client.set_limit("queue", "reports", max_running=5)
    await client.set_limit("key", "tenant-a", weight=3)
    await client.set_limit("key", "tenant-a", max_running=7)
    assert summary(await client.limits()) == {("queue", "reports"): (5, 0, 600.0), ("key", "tenant-a"): (7, 3, 0.0)}
    await client.set_limit("queue", "reports", retention=60)
    await client.set_limit("key", "tenant-a", max_running=0)
    assert summary(await client.limits()) == {("queue", "reports"): (5, 0, 60.0), ("key", "tenant-a"): (0, 3, 0.0)}


async def test_limits_survive_a_coordinator_restart(client: Client, coordinator: Coordinator) -> None:
    await client.set_limit("global", max_running=9)
    await client.set_limit("queue", "reports", max_running=2, retention=120)
    await client.set_limit("key", "tenant-a", weight=5)
    before = summary(await client.limits())
    await asyncio.to_thread(coordinator.restart)
    assert summary(await client.limits()) == before


@pytest.mark.parametrize(
    ("scope", "name", "fields", "field"),
    [
        ("queue", "reports", {"max_running": -1}, "limit.max_running"),
        ("global", "", {"max_running": -5}, "limit.max_running"),
        ("queue", "reports", {"weight": 2}, "limit.weight"),
        ("key", "tenant-a", {"retention": 60}, "limit.retention"),
        ("queue", "reports", {"retention": -1}, "limit.retention"),
        ("global", "everything", {"max_running": 1}, "limit.name"),
        ("key", "", {"max_running": 1}, "limit.name"),
        ("key", "tenant-a", {"weight": -1}, "limit.weight"),
        ("key", "tenant-a", {"max_running": 2**64}, "limit.max_running"),
        ("planet", "mars", {"max_running": 1}, "limit.scope"),
        (coordinator_pb2.LIMIT_SCOPE_UNSPECIFIED, "", {"max_running": 1}, "limit.scope"),
        ("queue", "reports", {}, "limit"),
    ],
)
async def test_invalid_limits_name_the_field_and_change_nothing(
    client: Client, scope: str, name: str, fields: dict[str, int], field: str
) -> None:
    await client.set_limit("queue", "reports", max_running=4)
    before = await client.limits()
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.set_limit(scope, name, **fields)
    assert field in {v.field for v in caught.value.violations}, caught.value
    assert await client.limits() == before


def test_scope_names() -> None:
    assert parse_scope("key") == parse_scope("CONCURRENCY_KEY") == parse_scope("concurrency-key") == KEY
    assert parse_scope("LIMIT_SCOPE_GLOBAL") == parse_scope(GLOBAL) == GLOBAL
    assert [scope_name(s) for s in (GLOBAL, QUEUE, KEY)] == ["global", "queue", "key"]
    with pytest.raises(errors.InvalidArgumentError, match=r"limit\.scope"):
        parse_scope("tenant")


async def test_queues_show_submitted_tasks(client: Client) -> None:
    await client.submit(ECHO, json={"text": "a"}, queue="reports")
    await client.submit(ECHO, json={"text": "b"}, queue="reports")
    await client.submit(ECHO, json={"text": "later"}, queue="reports", delay=600)
    await client.set_limit("queue", "reports", max_running=3, retention=900)
    stats = await eventually(lambda: queue_stats(client, "reports"), "the queue listed")
    assert (stats.pending, stats.queued, stats.assigned, stats.running) == (1, 2, 0, 0)
    assert stats.limit == 3 and stats.retention.ToTimedelta() == timedelta(seconds=900)
    assert stats.oldest_queued_time.seconds > 0


async def test_a_task_held_by_a_queue_limit_says_why(client: Client, coordinator: Coordinator) -> None:
    release = asyncio.Event()

    async def hold(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        await release.wait()
        return examples_pb2.EchoResponse(text=request.text)

    await client.set_limit("queue", "narrow", max_running=1)
    worker = Worker(coordinator.address, slots=4)
    worker.add_task(ECHO, hold)
    async with worker:
        await worker.wait_connected(15)
        first = await client.submit(ECHO, json={"text": "1"}, queue="narrow")
        second = await client.submit(ECHO, json={"text": "2"}, queue="narrow")
        await eventually(lambda: running(first), "the first task running")
        held = await second.refresh()
        assert held.state == task_pb2.TASK_STATE_QUEUED and held.waiting_reason, held
        stats = await eventually(lambda: queue_stats(client, "narrow"), "the queue listed")
        assert (stats.queued, stats.held, stats.assigned + stats.running, stats.limit) == (1, 1, 1, 1), stats
        await client.set_limit("queue", "narrow", max_running=0)  # lifting the limit lets the second one run
        await eventually(lambda: running(second), "the second task running")
        release.set()
        await first.wait(15)
        await second.wait(15)
    stats = await eventually(lambda: queue_stats(client, "narrow"), "the queue listed")
    assert stats.succeeded == 2 and stats.failed == 0


async def test_update_priority_changes_a_queued_task(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "x"}, priority=1)
    updated = await client.update_priority(handle.id, 9)
    assert updated.spec.priority == 9 and updated.state == task_pb2.TASK_STATE_QUEUED
    assert (await client.get(handle.id)).spec.priority == 9
    pending = await client.submit(ECHO, json={"text": "later"}, delay=600)
    assert (await client.update_priority(pending.id, -3)).spec.priority == -3


async def test_update_priority_of_a_finished_or_unknown_task_fails(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "x"})
    await handle.cancel()
    with pytest.raises(errors.FailedPreconditionError):
        await client.update_priority(handle.id, 5)
    with pytest.raises(errors.NotFoundError):
        await client.update_priority("no-such-task", 5)


def test_sync_client_limits_and_queues(coordinator: Coordinator) -> None:
    with SyncClient(coordinator.address) as client:
        client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        limit = client.set_limit("key", "tenant-b", max_running=2, weight=3)
        assert (limit.scope, limit.name, limit.max_running, limit.weight) == (KEY, "tenant-b", 2, 3)
        assert summary(client.limits()) == {("key", "tenant-b"): (2, 3, 0.0)}
        handle = client.submit(ECHO, json={"text": "x"}, queue="sync-q")
        assert client.update_priority(handle.id, 4).spec.priority == 4
        assert [q.queued for q in client.queues() if q.name == "sync-q"] == [1]
