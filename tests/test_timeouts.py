"""Per-attempt timeouts: failed, cancelled on the worker, retried; also across a restart."""

from __future__ import annotations

import asyncio

import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker
from _scheduling import ECHO, Api, S, complete, connect, get, has_state, submit
from _timing import SLACK, assert_between, eventually, now, seconds

from herder.clients import Retry
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(60)


async def test_an_attempt_past_its_timeout_is_failed_canceled_and_retried(api, coordinator) -> None:
    task = await submit(api, timeout=1.0, retry=Retry(max_attempts=2, initial_backoff=0.2))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        cancel = await asyncio.wait_for(worker.cancels.get(), 1.0 + SLACK + 5)
        assert_between(now() - seconds(first.assign_time), 1.0, 1.0 + SLACK, "CancelAttempt after assignment")
        assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
        failed = await get(api, task.id)
        assert [e.type for e in failed.attempt_errors] == ["herder.timeout"]
        late = await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="late"))
        assert not late.accepted, "a result for the timed-out attempt was accepted"
        second = await worker.next_assignment()
        assert (second.id, second.attempt) == (task.id, 2)
        await complete(worker, second)
    done = await get(api, task.id)
    assert (done.state, done.attempt) == (S.TASK_STATE_SUCCEEDED, 2)


async def test_a_timeout_with_no_attempts_left_fails_the_task(api, coordinator) -> None:
    task = await submit(api, timeout=0.5, retry=Retry(max_attempts=1))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        assigned = await worker.start_next()
        cancel = await asyncio.wait_for(worker.cancels.get(), 0.5 + SLACK + 5)
        assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
        failed = await eventually(lambda: _failed(api, task.id), what="FAILED after the timeout")
    assert failed.error.type == "herder.timeout"
    assert_between(seconds(failed.finish_time) - seconds(assigned.assign_time), 0.5, 0.5 + SLACK, "timeout")


async def test_a_timeout_survives_a_restart(etcd, namespace) -> None:
    # A long heartbeat timeout: the attempt stays the worker's while the coordinator restarts.
    with Coordinator(etcd.endpoint, namespace, heartbeat_timeout=6.0) as node:
        async with connect(node) as api:
            task = await submit(api, timeout=3.0, retry=Retry(max_attempts=1))
            async with RawWorker(node.address, "w", [ECHO], slots=1) as worker:
                assigned = await worker.start_next()
                await eventually(lambda: has_state(api, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
        node.restart()
        async with connect(node) as api, RawWorker(node.address, "w", [ECHO], running=[(task.id, 1)]) as worker:
            assert worker.welcome is not None and len(worker.welcome.reclaimed) == 1
            cancel = await asyncio.wait_for(worker.cancels.get(), 3.0 + SLACK + 5)
            assert_between(now() - seconds(assigned.assign_time), 3.0, 3.0 + SLACK, "timeout across a restart")
            assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
            failed = await eventually(lambda: _failed(api, task.id), what="FAILED")
            assert failed.error.type == "herder.timeout"


async def _failed(api: Api, task_id: str) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == S.TASK_STATE_FAILED else None
