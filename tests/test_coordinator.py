"""The coordinator end to end against a real etcd, driven over gRPC by raw protocol workers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker
from _timing import eventually

from herder.clients import errors
from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server._etcd import Etcd

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
ECHO = "examples.echo"


@pytest.fixture
async def stub(coordinator: Coordinator) -> AsyncIterator[coordinator_pb2_grpc.CoordinatorServiceStub]:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.RegisterTaskType(
            pb.RegisterTaskTypeRequest(
                task_type=task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
            )
        )
        yield stub


async def submit(stub: coordinator_pb2_grpc.CoordinatorServiceStub, text: str = "hi", **spec: object) -> task_pb2.Task:
    request = pb.SubmitTaskRequest(
        spec=task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": text}), **spec)  # type: ignore[arg-type]
    )
    reply = await stub.SubmitTask(request)
    return reply.task


async def state_of(stub: coordinator_pb2_grpc.CoordinatorServiceStub, task_id: str) -> task_pb2.Task:
    return (await stub.GetTask(pb.GetTaskRequest(id=task_id, include_result_json=True))).task


async def stored_keys(kv: Etcd, namespace: str) -> list[bytes]:
    return [item.key async for item in kv.scan_prefix(f"/herder/{namespace}/".encode())]


async def test_json_task_runs_to_success_with_a_readable_result(stub, coordinator) -> None:
    task = await submit(stub, "hello")
    assert task.state == S.TASK_STATE_QUEUED
    assert task.spec.payload.type_url.endswith("herder.examples.v1.EchoRequest")
    async with RawWorker(coordinator.address, "w1", [ECHO]) as worker:
        assigned = await worker.next_assignment()
        assert (assigned.id, assigned.attempt, assigned.state) == (task.id, 1, S.TASK_STATE_ASSIGNED)
        request = examples_pb2.EchoRequest()
        assigned.spec.payload.Unpack(request)
        assert request.text == "hello"
        await worker.ack(assigned)
        await eventually(lambda: _is(stub, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
        ack = await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="hello"))
        assert ack.accepted
    done = await state_of(stub, task.id)
    assert done.state == S.TASK_STATE_SUCCEEDED
    assert json.loads(done.result_json) == {"text": "hello"}
    assert done.worker_id == "w1"


async def _is(stub: coordinator_pb2_grpc.CoordinatorServiceStub, task_id: str, state: int) -> bool:
    return (await state_of(stub, task_id)).state == state


async def test_dispatch_is_by_priority_then_fifo(stub, coordinator) -> None:
    low1 = await submit(stub, "low1", priority=1)
    high = await submit(stub, "high", priority=5)
    low2 = await submit(stub, "low2", priority=1)
    async with RawWorker(coordinator.address, "w1", [ECHO], slots=1) as worker:
        order = []
        for _ in range(3):
            task = await worker.next_assignment()
            order.append(task.id)
            await worker.ack(task)
            assert (await worker.succeed(task.id, task.attempt, examples_pb2.EchoResponse())).accepted
    assert order == [high.id, low1.id, low2.id]


async def test_a_worker_gets_only_its_types_and_at_most_its_slots(stub, coordinator) -> None:
    tasks = [await submit(stub, str(i)) for i in range(3)]
    async with (
        RawWorker(coordinator.address, "other", ["examples.sleep"], slots=4) as other,
        RawWorker(coordinator.address, "w1", [ECHO], slots=2) as worker,
    ):
        got = [await worker.next_assignment(), await worker.next_assignment()]
        with pytest.raises(TimeoutError):
            await worker.next_assignment(timeout=0.5)
        assert other.assignments.empty()
        await worker.ack(got[0])
        await worker.succeed(got[0].id, 1, examples_pb2.EchoResponse())
        third = await worker.next_assignment()
        assert {t.id for t in [*got, third]} == {t.id for t in tasks}


async def test_unacknowledged_assignment_is_requeued_as_a_new_attempt(stub, coordinator) -> None:
    task = await submit(stub)
    async with RawWorker(coordinator.address, "slow", [ECHO]) as slow:
        first = await slow.next_assignment()
        assert first.attempt == 1
        await slow.send(heartbeat=pb.Heartbeat(draining=True))  # take no more work
        cancel = await asyncio.wait_for(slow.cancels.get(), 10)  # the ack window passed
        assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
        async with RawWorker(coordinator.address, "fast", [ECHO]) as fast:
            second = await fast.next_assignment()
            assert (second.id, second.attempt) == (task.id, 2)
            await fast.ack(second)
            assert (await fast.succeed(task.id, 2, examples_pb2.EchoResponse())).accepted
    done = await state_of(stub, task.id)
    assert done.state == S.TASK_STATE_SUCCEEDED
    assert [e.type for e in done.attempt_errors] == ["herder.ack_timeout"]


async def test_result_for_a_superseded_attempt_is_rejected_and_changes_nothing(stub, coordinator) -> None:
    task = await submit(stub)
    async with RawWorker(coordinator.address, "a", [ECHO]) as a:
        await a.next_assignment()  # never acknowledged
        await a.send(heartbeat=pb.Heartbeat(draining=True))
        await asyncio.wait_for(a.cancels.get(), 10)
        async with RawWorker(coordinator.address, "b", [ECHO]) as b:
            await b.start_next()
            await eventually(lambda: _is(stub, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
            stale = await a.succeed(task.id, 1, examples_pb2.EchoResponse(text="stale"))
            assert not stale.accepted
            assert (await state_of(stub, task.id)).state == S.TASK_STATE_RUNNING
            assert (await b.succeed(task.id, 2, examples_pb2.EchoResponse(text="fresh"))).accepted
            again = await b.succeed(task.id, 2, examples_pb2.EchoResponse(text="twice"))
            assert not again.accepted
    done = await state_of(stub, task.id)
    assert json.loads(done.result_json) == {"text": "fresh"}


async def test_retryable_error_runs_again_and_non_retryable_fails(stub, coordinator) -> None:
    retry = task_pb2.RetryPolicy(max_attempts=3)
    retry.initial_backoff.FromMilliseconds(100)
    task = await submit(stub, retry=retry)
    async with RawWorker(coordinator.address, "w", [ECHO]) as worker:
        await worker.start_next()
        started = time.monotonic()
        error = task_pb2.TaskError(type="Boom", message="try again", retryable=True)
        assert (await worker.fail(task.id, 1, error)).accepted
        pending = await state_of(stub, task.id)
        assert pending.state in (S.TASK_STATE_PENDING, S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED)
        second = await worker.next_assignment()
        assert second.attempt == 2
        assert time.monotonic() - started >= 0.09
        await worker.ack(second)
        fatal = task_pb2.TaskError(type="Bad", message="no", retryable=False)
        assert (await worker.fail(task.id, 2, fatal)).accepted
    done = await state_of(stub, task.id)
    assert done.state == S.TASK_STATE_FAILED
    assert done.error.type == "Bad"
    assert [e.type for e in done.attempt_errors] == ["Boom", "Bad"]


async def test_wrong_output_type_fails_the_task(stub, coordinator) -> None:
    task = await submit(stub)
    async with RawWorker(coordinator.address, "w", [ECHO]) as worker:
        await worker.start_next()
        assert (await worker.succeed(task.id, 1, examples_pb2.SleepResponse())).accepted
    done = await state_of(stub, task.id)
    assert done.state == S.TASK_STATE_FAILED
    assert done.error.type == "herder.bad_output"


async def test_closed_session_requeues_after_heartbeat_timeout(stub, coordinator) -> None:
    task = await submit(stub)
    worker = RawWorker(coordinator.address, "gone", [ECHO])
    async with worker:
        await worker.start_next()
        await eventually(lambda: _is(stub, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
    closed_at = time.monotonic()
    async with RawWorker(coordinator.address, "next", [ECHO]) as other:
        again = await other.next_assignment(timeout=15)
        assert time.monotonic() - closed_at >= coordinator.heartbeat_timeout * 0.9
        assert (again.id, again.attempt) == (task.id, 2)
        await other.ack(again)
        assert (await other.succeed(task.id, 2, examples_pb2.EchoResponse())).accepted
    done = await state_of(stub, task.id)
    assert [e.type for e in done.attempt_errors] == ["herder.worker_lost"]


async def test_silent_worker_loses_its_attempt(stub, coordinator) -> None:
    task = await submit(stub)
    async with RawWorker(coordinator.address, "mute", [ECHO]) as mute:
        await mute.start_next()
        mute.stop_heartbeats()
        await asyncio.wait_for(mute.closed.wait(), 15)  # the coordinator ended the session
        # ... saying so, so a worker that was only frozen knows to start a new session.
        assert mute.error is not None and mute.error.code() == grpc.StatusCode.UNAVAILABLE
        assert f"session {mute.welcome.session_id} expired" in (mute.error.details() or "")
        async with RawWorker(coordinator.address, "next", [ECHO]) as other:
            again = await other.next_assignment(timeout=15)
            assert (again.id, again.attempt) == (task.id, 2)
            # Back as a new session, its late result for the lost attempt is stale.
            async with RawWorker(coordinator.address, "mute", [ECHO], running=[(task.id, 1)]) as back:
                assert back.welcome is not None and [r.task_id for r in back.welcome.rejected] == [task.id]
                assert not (await back.succeed(task.id, 1, examples_pb2.EchoResponse())).accepted


async def test_reconnecting_worker_reclaims_its_running_attempt(stub, coordinator) -> None:
    task = await submit(stub)
    async with RawWorker(coordinator.address, "w", [ECHO]) as worker:
        await worker.start_next()
        await eventually(lambda: _is(stub, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
    async with RawWorker(coordinator.address, "w", [ECHO], running=[(task.id, 1), ("nope", 3)]) as back:
        assert back.welcome is not None
        assert [(r.task_id, r.attempt) for r in back.welcome.reclaimed] == [(task.id, 1)]
        assert [(r.task_id, r.attempt) for r in back.welcome.rejected] == [("nope", 3)]
        assert (await back.succeed(task.id, 1, examples_pb2.EchoResponse(text="kept"))).accepted
    done = await state_of(stub, task.id)
    assert (done.state, done.attempt, list(done.attempt_errors)) == (S.TASK_STATE_SUCCEEDED, 1, [])


async def test_cancel_queued_running_finished_and_unknown(stub, coordinator) -> None:
    queued = await submit(stub)
    canceled = (await stub.CancelTask(pb.CancelTaskRequest(id=queued.id, reason="not needed"))).task
    assert canceled.state == S.TASK_STATE_CANCELED
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.CancelTask(pb.CancelTaskRequest(id=queued.id))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.CancelTask(pb.CancelTaskRequest(id="does-not-exist"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    running = await submit(stub)
    async with RawWorker(coordinator.address, "w", [ECHO]) as worker:
        assigned = await worker.next_assignment()
        assert assigned.id == running.id
        await worker.ack(assigned)
        await eventually(lambda: _is(stub, running.id, S.TASK_STATE_RUNNING), what="RUNNING")
        requested = (await stub.CancelTask(pb.CancelTaskRequest(id=running.id))).task
        assert requested.cancel_requested
        pushed = await asyncio.wait_for(worker.cancels.get(), 10)
        assert (pushed.ref.task_id, pushed.ref.attempt) == (running.id, 1)
        await worker.send(results=pb.AttemptResults(results=[pb.AttemptResult(ref=pushed.ref, canceled="stopped")]))
        assert (await asyncio.wait_for(worker.result_acks.get(), 10)).accepted
    assert (await state_of(stub, running.id)).state == S.TASK_STATE_CANCELED


async def _invalid(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, request: pb.SubmitTaskRequest
) -> errors.HerderError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SubmitTask(request)
    return errors.from_rpc_error(caught.value)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (task_pb2.TaskSpec(type=""), "spec.type"),
        (task_pb2.TaskSpec(type="bad type!"), "spec.type"),
        (task_pb2.TaskSpec(type="unknown.type"), "spec.type"),
        (task_pb2.TaskSpec(type=ECHO, payload_json='{"nope": 1}'), "spec.payload_json"),
        (task_pb2.TaskSpec(type=ECHO, payload_json='{"text": 5}'), "spec.payload_json"),
        (task_pb2.TaskSpec(type=ECHO, payload_json="x" * (300 * 1024)), "spec.payload_json"),
        (task_pb2.TaskSpec(type=ECHO, tags=["a"] * 40), "spec.tags"),
        (task_pb2.TaskSpec(type=ECHO, queue="q" * 500), "spec.queue"),
        (task_pb2.TaskSpec(type=ECHO, retry=task_pb2.RetryPolicy(jitter=3)), "spec.retry.jitter"),
    ],
)
async def test_invalid_input_is_rejected_and_writes_nothing(stub, kv, namespace, spec, field) -> None:
    before = await stored_keys(kv, namespace)
    error = await _invalid(stub, pb.SubmitTaskRequest(spec=spec))
    assert isinstance(error, errors.InvalidArgumentError)
    assert any(v.field.startswith(field) for v in error.violations), error.violations
    assert await stored_keys(kv, namespace) == before


async def test_payload_of_the_wrong_type_is_rejected(stub, kv, namespace) -> None:
    before = await stored_keys(kv, namespace)
    spec = task_pb2.TaskSpec(type=ECHO)
    spec.payload.Pack(examples_pb2.SleepRequest())
    error = await _invalid(stub, pb.SubmitTaskRequest(spec=spec))
    assert [v.field for v in error.violations] == ["spec.payload"]
    assert "herder.examples.v1.EchoRequest" in error.violations[0].description
    assert await stored_keys(kv, namespace) == before


async def test_unregistered_types_are_accepted_when_the_namespace_allows(etcd, namespace) -> None:
    with Coordinator(etcd.endpoint, namespace, accept_unregistered_types=True) as open_coordinator:
        async with grpc.aio.insecure_channel(open_coordinator.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            spec = task_pb2.TaskSpec(type="anything.goes")
            spec.payload.Pack(examples_pb2.EchoRequest(text="x"))
            reply = await stub.SubmitTask(pb.SubmitTaskRequest(spec=spec))
            assert reply.task.state == S.TASK_STATE_QUEUED


async def test_batch_stores_valid_items_and_reports_each_invalid_one(stub, kv, namespace) -> None:
    specs = [
        task_pb2.TaskSpec(type=ECHO, payload_json='{"text": "a"}'),
        task_pb2.TaskSpec(type=ECHO, payload_json='{"text": 1}'),
        task_pb2.TaskSpec(type=ECHO, payload_json='{"text": "c"}'),
    ]
    reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
    codes = [r.code for r in reply.results]
    assert codes == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert reply.results[0].task.id and reply.results[2].task.id
    assert not reply.results[1].task.id
    stored = await stored_keys(kv, namespace)
    task_keys = [k for k in stored if b"/tasks/" in k]
    assert len(task_keys) == 2
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await stub.SubmitTasks(pb.SubmitTasksRequest(specs=[]))
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_task_is_not_found(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetTask(pb.GetTaskRequest(id="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_filters_and_pages(stub) -> None:
    tagged = [await submit(stub, str(i), tags=["blue"], queue="paint") for i in range(5)]
    await submit(stub, "plain")
    page = await stub.ListTasks(pb.ListTasksRequest(tags=["blue"], page_size=2))
    seen = [t.id for t in page.tasks]
    while page.next_page_token:
        page = await stub.ListTasks(pb.ListTasksRequest(tags=["blue"], page_size=2, page_token=page.next_page_token))
        seen.extend(t.id for t in page.tasks)
    assert seen == [t.id for t in tagged]
    by_queue = await stub.ListTasks(pb.ListTasksRequest(queue="paint", states=[S.TASK_STATE_QUEUED]))
    assert len(by_queue.tasks) == 5
    assert not (await stub.ListTasks(pb.ListTasksRequest(type="other.type"))).tasks
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListTasks(pb.ListTasksRequest(page_token="!!!"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_late_watcher_sees_current_state_then_every_change(stub, coordinator) -> None:
    task = await submit(stub)
    call = stub.WatchTasks(pb.WatchTasksRequest(ids=[task.id], include_result_json=True))
    events: list[task_pb2.TaskEvent] = []

    async def collect() -> None:
        async for reply in call:
            events.append(reply.event)
            if reply.event.task.state == S.TASK_STATE_SUCCEEDED:
                return

    collector = asyncio.create_task(collect())
    async with RawWorker(coordinator.address, "w", [ECHO]) as worker:
        await worker.start_next()
        # RUNNING is written once the attempt has run --running-write-delay (0.1 s by default).
        await eventually(lambda: _seen(events, S.TASK_STATE_RUNNING), what="the RUNNING change watched")
        await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="done"))
    await asyncio.wait_for(collector, 10)
    call.cancel()
    states = [e.task.state for e in events]
    assert events[0].initial and states[0] == S.TASK_STATE_QUEUED
    assert states[1:] == [S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    revisions = [e.revision for e in events]
    assert revisions == sorted(set(revisions))
    assert json.loads(events[-1].task.result_json) == {"text": "done"}


async def _seen(events: list[task_pb2.TaskEvent], state: int) -> bool:
    return any(e.task.state == state for e in events)


async def test_cluster_status_and_nodes(stub, coordinator) -> None:
    async with RawWorker(coordinator.address, "node-1", [ECHO], slots=3):
        status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
        assert status.leader_address == coordinator.address
        assert status.etcd_version and status.leader_revision > 0
        nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
        assert [(n.worker_id, n.slots, list(n.task_types)) for n in nodes] == [("node-1", 3, [ECHO])]


async def test_connect_must_start_with_hello(coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        async def requests() -> AsyncIterator[pb.ConnectRequest]:
            yield pb.ConnectRequest(heartbeat=pb.Heartbeat())

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Connect(requests()):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_submitters_trace_context_is_stored_with_the_task(stub) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    spec = task_pb2.TaskSpec(type=ECHO, payload_json="{}")
    reply = await stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), metadata=(("traceparent", traceparent),))
    assert dict(reply.task.trace_context) == {"traceparent": traceparent}
    assert dict((await state_of(stub, reply.task.id)).trace_context) == {"traceparent": traceparent}


async def test_filtered_watch_streams_changes_of_matching_tasks_only(stub) -> None:
    marker = await submit(stub, queue="watched")
    call = stub.WatchTasks(pb.WatchTasksRequest(queue="watched"))
    stream = call.__aiter__()
    first = (await asyncio.wait_for(stream.__anext__(), 10)).event
    assert (first.task.id, first.initial) == (marker.id, True)  # the watch is registered
    other = await submit(stub, queue="elsewhere")
    await stub.CancelTask(pb.CancelTaskRequest(id=other.id))
    watched = await submit(stub, queue="watched")
    await stub.CancelTask(pb.CancelTaskRequest(id=watched.id))
    events = []
    while not events or events[-1].task.state != S.TASK_STATE_CANCELED:
        events.append((await asyncio.wait_for(stream.__anext__(), 10)).event)
    call.cancel()
    assert {e.task.id for e in events} == {watched.id}
    assert [e.task.state for e in events] == [S.TASK_STATE_QUEUED, S.TASK_STATE_CANCELED]


async def test_watch_that_skips_the_current_state_starts_with_the_next_change(stub) -> None:
    task = await submit(stub)
    call = stub.WatchTasks(pb.WatchTasksRequest(ids=[task.id], skip_initial=True))
    stream = call.__aiter__()
    # Re-prioritising is a change of a queued task that leaves it queued; keep changing until one is seen.
    first = asyncio.ensure_future(stream.__anext__())
    priority = 0
    while not first.done():
        priority += 1
        await stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=task.id, priority=priority))
        await asyncio.wait([first], timeout=0.2)
    event = first.result().event
    call.cancel()
    assert not event.initial
    assert event.task.spec.priority >= 1


async def test_listing_unfinished_states_pages_through_the_leaders_tasks(stub) -> None:
    queued = [await submit(stub, str(i), queue="listed") for i in range(5)]
    finished = await submit(stub, "done", queue="listed")
    await stub.CancelTask(pb.CancelTaskRequest(id=finished.id))
    request = pb.ListTasksRequest(queue="listed", states=[S.TASK_STATE_QUEUED, S.TASK_STATE_PENDING], page_size=2)
    page = await stub.ListTasks(request)
    seen = [t.id for t in page.tasks]
    while page.next_page_token:
        request.page_token = page.next_page_token
        page = await stub.ListTasks(request)
        seen.extend(t.id for t in page.tasks)
    assert seen == [t.id for t in queued]
    canceled = await stub.ListTasks(pb.ListTasksRequest(queue="listed", states=[S.TASK_STATE_CANCELED]))
    assert [t.id for t in canceled.tasks] == [finished.id]
