"""Operator verbs against a real etcd and coordinator: RetryTask, pausing a queue, bulk cancel and retry,
error details from a Python handler, and ListTasks' order and created-time filters."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from _cluster import start_replicas
from _helpers import violations
from _raw_worker import RawWorker
from _scheduling import ECHO, QUEUE, Api, S, complete, connect, get, queue_stats, set_limit, submit, submit_batch
from _timing import eventually, quiet

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.client import Client, Retry
from herder.clients.outcomes import CUT, fit_error
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.clients.worker import TaskContext, Worker, WorkerSettings

pytestmark = pytest.mark.timeout(60)

NEW_ATTEMPT = pb.RETRY_MODE_NEW_ATTEMPT
COPY = pb.RETRY_MODE_COPY


async def fail_for_good(worker: RawWorker, task: task_pb2.Task) -> None:
    await worker.ack(task)
    error = task_pb2.TaskError(type="Boom", message="failed on purpose", retryable=False)
    ack = await worker.fail(task.id, task.attempt, error)
    assert ack.accepted, ack.reason


async def has_state(api: Api, task_id: str, wanted: int) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == wanted else None


async def test_retry_as_a_new_attempt_requeues_a_failed_task_with_its_attempts_again(api, coordinator) -> None:
    task = await submit(api, retry=Retry(max_attempts=1))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.next_assignment()
        await fail_for_good(worker, first)
        await eventually(lambda: has_state(api, task.id, S.TASK_STATE_FAILED), "FAILED")
        retried = (await api.stub.RetryTask(pb.RetryTaskRequest(id=task.id, reason="fixed the bug"))).task
        assert (retried.state, retried.retries, retried.retry_reason) == (S.TASK_STATE_QUEUED, 1, "fixed the bug")
        assert not retried.HasField("error") and not retried.HasField("finish_time")
        second = await worker.next_assignment()
        assert (second.id, second.attempt) == (task.id, 2)
        # max_attempts (1) counts from the retry: this failure ends it again.
        await fail_for_good(worker, second)
        done = await eventually(lambda: has_state(api, task.id, S.TASK_STATE_FAILED), "FAILED again")
    assert [e.type for e in done.attempt_errors] == ["Boom", "Boom"], "the history is kept"


async def test_retry_refuses_a_task_that_has_not_finished_naming_its_state(api) -> None:
    task = await submit(api, queue="idle")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.stub.RetryTask(pb.RetryTaskRequest(id=task.id))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "QUEUED" in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await api.stub.RetryTask(pb.RetryTaskRequest(id="0000nosuchtask"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await api.stub.RetryTask(pb.RetryTaskRequest(id=task.id, mode=7, reason="x" * 2000))  # type: ignore[arg-type]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(bad.value)) == {"mode", "reason"}
    assert (await get(api, task.id)).state == S.TASK_STATE_QUEUED


async def test_retry_as_a_copy_makes_one_new_task_even_when_asked_twice(api) -> None:
    task = await submit(api, queue="idle", idempotency_key="original-key")
    await api.stub.CancelTask(pb.CancelTaskRequest(id=task.id))
    request = pb.RetryTaskRequest(id=task.id, mode=COPY, idempotency_key="click-1")
    copy = (await api.stub.RetryTask(request)).task
    again = (await api.stub.RetryTask(request)).task
    assert copy.id == again.id != task.id
    assert (copy.retry_of, copy.state, copy.spec.idempotency_key) == (task.id, S.TASK_STATE_QUEUED, "click-1")
    assert copy.spec.payload == task.spec.payload
    assert (await get(api, task.id)).state == S.TASK_STATE_CANCELED, "the original is left as it was"


async def test_a_retried_task_outlives_the_retention_of_its_first_finish(api, coordinator) -> None:
    await set_limit(api, QUEUE, "short", retention=1.0)
    task = await submit(api, queue="short")
    await api.stub.CancelTask(pb.CancelTaskRequest(id=task.id))
    await api.stub.RetryTask(pb.RetryTaskRequest(id=task.id))
    await asyncio.sleep(2.5)  # past the first finish's retention, gc running every second
    kept = await get(api, task.id)
    assert kept.state == S.TASK_STATE_QUEUED
    assert [e.type for e in kept.attempt_errors] == ["herder.canceled"]


async def test_a_paused_queue_accepts_tasks_and_dispatches_none_until_resumed(api, coordinator) -> None:
    await api.stub.SetQueuePaused(pb.SetQueuePausedRequest(queue="held", paused=True))
    held = await submit(api, queue="held")
    free = await submit(api, queue="free")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=2) as worker:
        assert (await worker.next_assignment()).id == free.id
        await quiet(worker.assignments, 0.5, what="an assignment from a paused queue")
        waiting = await get(api, held.id)
        assert "paused" in waiting.waiting_reason, waiting.waiting_reason
        stats = await queue_stats(api, "held")
        assert stats is not None and stats.paused and stats.limit == 0 and stats.held == 1
        await api.stub.SetQueuePaused(pb.SetQueuePausedRequest(queue="held", paused=False))
        assert (await worker.next_assignment()).id == held.id
    stats = await queue_stats(api, "held")
    assert stats is not None and not stats.paused


async def test_a_pause_survives_a_restart_of_the_coordinator(api, coordinator) -> None:
    await api.stub.SetQueuePaused(pb.SetQueuePausedRequest(queue="held", paused=True))
    held = await submit(api, queue="held")
    coordinator.restart()
    async with connect(coordinator) as fresh, RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        stats = await queue_stats(fresh, "held")
        assert stats is not None and stats.paused
        await quiet(worker.assignments, 0.5, what="an assignment from a paused queue after a restart")
        await fresh.stub.SetQueuePaused(pb.SetQueuePausedRequest(queue="held", paused=False))
        await complete(worker, await worker.next_assignment())
    async with connect(coordinator) as fresh:
        await eventually(lambda: has_state(fresh, held.id, S.TASK_STATE_SUCCEEDED), "SUCCEEDED")


async def test_bulk_cancel_counts_on_a_dry_run_and_takes_at_most_its_limit_per_call(api) -> None:
    ids = await submit_batch(api, 5, queue="bulk", tags=["nightly"])
    other = await submit_batch(api, 2, queue="bulk")
    task_filter = pb.TaskFilter(queue="bulk", tags=["nightly"])
    dry = await api.stub.CancelTasks(pb.CancelTasksRequest(filter=task_filter, dry_run=True))
    assert (dry.matched, dry.changed, dry.more) == (5, 0, False)
    assert {(await get(api, i)).state for i in ids} == {S.TASK_STATE_QUEUED}
    first = await api.stub.CancelTasks(pb.CancelTasksRequest(filter=task_filter, limit=3))
    assert (first.matched, first.changed, first.more) == (3, 3, True)
    rest = await api.stub.CancelTasks(pb.CancelTasksRequest(filter=task_filter, limit=3))
    assert (rest.matched, rest.changed, rest.more) == (2, 2, False)
    assert {(await get(api, i)).state for i in ids} == {S.TASK_STATE_CANCELED}
    assert {(await get(api, i)).state for i in other} == {S.TASK_STATE_QUEUED}
    # And back: every canceled task of the queue, retried in one call.
    retry_filter = pb.TaskFilter(queue="bulk", states=[S.TASK_STATE_CANCELED])
    dry = await api.stub.RetryTasks(pb.RetryTasksRequest(filter=retry_filter, dry_run=True))
    assert (dry.matched, dry.changed) == (5, 0)
    done = await api.stub.RetryTasks(pb.RetryTasksRequest(filter=retry_filter))
    assert (done.matched, done.changed, done.more) == (5, 5, False)
    assert {(await get(api, i)).state for i in ids} == {S.TASK_STATE_QUEUED}


async def test_bulk_filters_are_validated(api) -> None:
    wrong = pb.TaskFilter(states=[S.TASK_STATE_SUCCEEDED], queue="bad queue!")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.stub.CancelTasks(pb.CancelTasksRequest(filter=wrong, limit=-1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(refused.value)) == {"filter.states[0]", "filter.queue", "limit"}
    late = pb.TaskFilter(states=[S.TASK_STATE_QUEUED])
    late.created_after.FromSeconds(2_000_000_000)
    late.created_before.FromSeconds(1_000_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.stub.RetryTasks(pb.RetryTasksRequest(filter=late))
    assert set(violations(refused.value)) == {"filter.states[0]", "filter.created_before"}


async def test_list_tasks_newest_first_pages_and_filters_by_created_time(api) -> None:
    ids = []
    for n in range(4):
        ids.append((await submit(api, str(n), queue="listed")).id)
        await asyncio.sleep(0.02)
    newest = pb.TASK_ORDER_NEWEST_FIRST
    page = await api.stub.ListTasks(pb.ListTasksRequest(queue="listed", order=newest, page_size=3))
    assert [t.id for t in page.tasks] == ids[::-1][:3] and page.next_page_token
    rest = await api.stub.ListTasks(
        pb.ListTasksRequest(queue="listed", order=newest, page_size=3, page_token=page.next_page_token)
    )
    assert [t.id for t in rest.tasks] == [ids[0]] and not rest.next_page_token
    second = await get(api, ids[1])
    after = pb.ListTasksRequest(queue="listed", created_after=second.create_time)
    assert [t.id for t in (await api.stub.ListTasks(after)).tasks] == ids[1:]
    before = pb.ListTasksRequest(queue="listed", created_before=second.create_time, order=newest)
    assert [t.id for t in (await api.stub.ListTasks(before)).tasks] == [ids[0]]


async def test_a_python_handlers_failure_keeps_its_type_message_and_traceback(api, coordinator) -> None:
    worker = Worker(coordinator.address, settings=WorkerSettings(backoff=Backoff(initial=0.05, max=0.3)))

    @worker.task("test.broken")
    async def broken(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        raise KeyError("x" * 40_000)  # far more than the coordinator stores (16 KiB)

    async with worker, Client(coordinator.address) as client:
        await worker.wait_connected(10)
        handle = await client.submit("test.broken", examples_pb2.EchoRequest(text="x"), retry=Retry(max_attempts=1))
        with pytest.raises(errors.TaskFailedError) as failed:
            await handle.result(20)
    error = failed.value
    assert error.error_type == "KeyError" and error.error_message.startswith("'xxx")
    assert (
        "Traceback" in error.details
        and "in broken" in error.details
        and 'raise KeyError("x" * 40_000)' in (error.details)
    )
    stored = (await get(api, handle.id)).error
    assert stored.ByteSize() <= 16 * 1024 and stored.message.endswith(CUT)


def test_fit_error_keeps_the_tail_of_the_details_and_the_head_of_the_message() -> None:
    error = task_pb2.TaskError(type="E", message="m" * 200, details="head " + "d" * 5000 + " tail")
    assert fit_error(error, 1000)
    assert error.ByteSize() <= 1000
    assert error.details.startswith(CUT) and error.details.endswith(" tail") and error.message == "m" * 200
    small = task_pb2.TaskError(type="E", message="é" * 2000, details="d" * 2000)
    assert fit_error(small, 200) and small.ByteSize() <= 200
    assert small.message.endswith(CUT) and small.details.startswith(CUT)
    huge = task_pb2.TaskError(type="E", message="m" * 50_000, details="trace " * 100 + "last line")
    assert fit_error(huge, 4000) and huge.ByteSize() <= 4000
    assert huge.details.endswith("last line") and len(huge.message) <= 1000


async def test_retry_of_many_tasks_as_copies_keeps_the_originals(api) -> None:
    ids = await submit_batch(api, 3, queue="copies")
    await api.stub.CancelTasks(pb.CancelTasksRequest(filter=pb.TaskFilter(queue="copies")))
    started = time.time()
    done = await api.stub.RetryTasks(pb.RetryTasksRequest(filter=pb.TaskFilter(queue="copies"), mode=COPY))
    assert (done.matched, done.changed) == (3, 3)
    listed = await api.stub.ListTasks(pb.ListTasksRequest(queue="copies", states=[S.TASK_STATE_QUEUED]))
    assert sorted(t.retry_of for t in listed.tasks) == sorted(ids)
    assert all(t.create_time.seconds >= int(started) for t in listed.tasks)


async def test_a_pause_holds_on_the_replica_that_takes_over(etcd, namespace) -> None:
    with contextlib.ExitStack() as stack:
        first, second = start_replicas(etcd.endpoint, namespace, 2, stack)
        # The follower first: the SDK follows the leader for the writes.
        addresses = f"{second.address},{first.address}"
        async with Client(addresses) as client:
            await client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
            await client.pause_queue("held")
            task = (await client.submit(ECHO, examples_pb2.EchoRequest(text="x"), queue="held")).task
            first.kill()
            await asyncio.to_thread(second.wait_leader)
            queues = await client.queues()
            assert [(q.name, q.paused) for q in queues] == [("held", True)]
            async with RawWorker(second.address, "w", [ECHO], slots=1) as worker:
                await quiet(worker.assignments, 0.5, what="an assignment from a paused queue after a failover")
                await client.resume_queue("held")
                assert (await worker.next_assignment()).id == task.id
