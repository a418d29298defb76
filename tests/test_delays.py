"""Delays (not_before) and ttl expiry, also across a restart."""

from __future__ import annotations

import pytest
from _raw_worker import RawWorker
from _scheduling import ECHO, Api, S, complete, connect, fail_attempt, get, state, submit
from _timing import SLACK, assert_between, eventually, now, quiet, seconds, until

from herder.clients import Retry
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(60)


async def test_a_delayed_task_stays_pending_until_not_before(api, coordinator) -> None:
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        task = await submit(api, delay=1.5)
        not_before = seconds(task.spec.not_before)
        pending = await get(api, task.id)
        assert pending.state == S.TASK_STATE_PENDING
        assert abs(seconds(pending.next_run_time) - not_before) < 0.01, "next_run_time is not_before"
        assigned = await worker.next_assignment(timeout=1.5 + 10)
        assert_between(now() - not_before, 0.0, SLACK, "assignment after not_before")
        assert seconds(assigned.assign_time) >= not_before


async def test_a_delay_survives_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        task = await submit(api, delay=4.0)
    not_before = seconds(task.spec.not_before)
    coordinator.restart()
    async with connect(coordinator) as api:
        assert now() < not_before, "the restart took longer than the delay; nothing was tested"
        pending = await get(api, task.id)
        assert pending.state == S.TASK_STATE_PENDING
        assert abs(seconds(pending.next_run_time) - not_before) < 0.01
        async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
            assigned = await worker.next_assignment(timeout=4.0 + 10)
            assert_between(now() - not_before, 0.0, SLACK, "assignment after not_before, after a restart")
            assert assigned.id == task.id


async def test_a_task_not_started_within_its_ttl_expires(api, coordinator) -> None:
    task = await submit(api, ttl=1.0)
    submitted = seconds(task.create_time)
    expired = await eventually(lambda: _expired(api, task.id), timeout=1.0 + SLACK + 5, what="EXPIRED after its ttl")
    assert_between(now() - submitted, 1.0, 1.0 + SLACK, "EXPIRED observed after submission")
    assert_between(seconds(expired.finish_time) - submitted, 1.0, 1.0 + SLACK, "finish_time - create_time")
    assert expired.error.type == "herder.expired"
    async with RawWorker(coordinator.address, "late", [ECHO], slots=1) as worker:
        await quiet(worker.assignments, 0.5, what="assignment of an expired task")


async def _expired(api: Api, task_id: str) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == S.TASK_STATE_EXPIRED else None


async def test_a_delayed_task_expires_when_its_ttl_ends_before_its_delay(api) -> None:
    task = await submit(api, delay=3.0, ttl=1.0)
    expired = await eventually(lambda: _expired(api, task.id), timeout=1.0 + SLACK + 5, what="EXPIRED")
    assert_between(seconds(expired.finish_time) - seconds(task.create_time), 1.0, 1.0 + SLACK, "expiry while PENDING")


async def test_a_started_task_does_not_expire(api, coordinator) -> None:
    task = await submit(api, ttl=1.0)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        await worker.start_next()
        await until(seconds(task.create_time) + 1.0 + 1.0)  # past the ttl, with room for a late expiry
        assert await state(api, task.id) == S.TASK_STATE_RUNNING
        assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse())).accepted
    assert await state(api, task.id) == S.TASK_STATE_SUCCEEDED


async def test_a_started_task_waiting_for_a_retry_does_not_expire(api, coordinator) -> None:
    task = await submit(api, ttl=1.0, retry=Retry(max_attempts=2, initial_backoff=1.5))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        await fail_attempt(worker, first)
        second = await worker.next_assignment(timeout=1.5 + 10)  # PENDING past the ttl meanwhile
        assert (second.id, second.attempt) == (task.id, 2)
        await complete(worker, second)
    assert await state(api, task.id) == S.TASK_STATE_SUCCEEDED


async def test_a_ttl_survives_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        task = await submit(api, ttl=3.0)
    coordinator.restart()
    async with connect(coordinator) as api:
        expired = await eventually(lambda: _expired(api, task.id), timeout=3.0 + SLACK + 5, what="EXPIRED")
        assert_between(seconds(expired.finish_time) - seconds(task.create_time), 3.0, 3.0 + SLACK, "expiry")
