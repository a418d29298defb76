"""Priorities and their updates, also across a restart."""

from __future__ import annotations

import grpc
import pytest
from _raw_worker import RawWorker
from _scheduling import ECHO, S, connect, dispatch_order, get, has_state, submit
from _timing import eventually

from herder.clients import errors
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.timeout(60)


async def test_priority_update_reorders_the_next_dispatch(api, coordinator) -> None:
    a, b, c = [await submit(api, n) for n in "abc"]
    raised = (await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=c.id, priority=10))).task
    lowered = (await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=a.id, priority=-5))).task
    assert (raised.spec.priority, raised.state) == (10, S.TASK_STATE_QUEUED)
    assert (lowered.spec.priority, lowered.state) == (-5, S.TASK_STATE_QUEUED)
    assert (await get(api, c.id)).spec.priority == 10
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [c.id, b.id, a.id], "dispatch order after raising c to 10 and lowering a to -5"


async def test_priority_update_of_a_pending_task_applies_when_it_becomes_queued(api, coordinator) -> None:
    delayed = await submit(api, "delayed", delay=1.0)
    updated = await api.client.update_priority(delayed.id, 5)
    assert (updated.state, updated.spec.priority) == (S.TASK_STATE_PENDING, 5)
    others = [await submit(api, str(n), priority=1) for n in range(2)]
    await eventually(lambda: has_state(api, delayed.id, S.TASK_STATE_QUEUED), what="the delayed task QUEUED")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [delayed.id, *(t.id for t in others)]


async def test_priority_updates_survive_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        a, b, c = [await submit(api, n) for n in "abc"]
        await api.client.update_priority(c.id, 7)
        await api.client.update_priority(a.id, -1)
    coordinator.restart()
    async with connect(coordinator) as api:
        assert [(await get(api, t.id)).spec.priority for t in (a, b, c)] == [-1, 0, 7]
        async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
            order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [c.id, b.id, a.id]


async def test_priority_of_an_assigned_running_or_finished_task_cannot_change(api, coordinator) -> None:
    task = await submit(api)

    async def refused() -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=task.id, priority=3))
        return caught.value.code()

    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        assigned = await worker.next_assignment()
        assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNED"
        await worker.ack(assigned)
        await eventually(lambda: has_state(api, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
        assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "RUNNING"
        assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse())).accepted
    assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "SUCCEEDED"
    assert (await get(api, task.id)).spec.priority == 0
    with pytest.raises(errors.NotFoundError):
        await api.client.update_priority("no-such-task", 1)


async def test_an_out_of_range_priority_update_is_rejected_and_changes_nothing(api) -> None:
    task = await submit(api, priority=2)
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await api.client.update_priority(task.id, 2**31 - 1)
    assert [v.field for v in caught.value.violations] == ["priority"]
    assert (await get(api, task.id)).spec.priority == 2
