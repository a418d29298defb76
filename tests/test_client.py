"""The client SDK against a real etcd and a real coordinator subprocess."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import grpc
import pytest
from _cluster import Coordinator
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message

from herder.clients import errors
from herder.clients.client import Client, Retry, SyncClient, TaskHandle, is_terminal, parse_state, state_name, task_spec
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2

pytestmark = pytest.mark.timeout(60)


ECHO = "examples.echo"
Outcome = Callable[[task_pb2.Task], coordinator_pb2.AttemptResult]


def echo(task: task_pb2.Task) -> coordinator_pb2.AttemptResult:
    request = examples_pb2.EchoRequest()
    task.spec.payload.Unpack(request)
    result = coordinator_pb2.AttemptResult()
    result.output.Pack(examples_pb2.EchoResponse(text=request.text))
    return result


def fail(task: task_pb2.Task) -> coordinator_pb2.AttemptResult:
    return coordinator_pb2.AttemptResult(
        error=task_pb2.TaskError(type="ValueError", message="bad input", retryable=False)
    )


async def run_one(address: str, outcome: Outcome = echo, task_type: str = ECHO) -> task_pb2.Task:
    """A minimal worker speaking the Connect protocol: take one assignment, answer it, leave."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = coordinator_pb2_grpc.CoordinatorServiceStub(channel).Connect()
        hello = coordinator_pb2.WorkerHello(worker_id="test-worker", task_types=[task_type], slots=1)
        await stream.write(coordinator_pb2.ConnectRequest(hello=hello))
        assert (await stream.read()).WhichOneof("message") == "welcome"
        while True:
            message = await stream.read()
            if message.WhichOneof("message") == "assignments":
                break
        task = message.assignments.tasks[0]
        ref = coordinator_pb2.AttemptRef(task_id=task.id, attempt=task.attempt)
        await stream.write(coordinator_pb2.ConnectRequest(ack=coordinator_pb2.AssignmentAck(refs=[ref])))
        result = outcome(task)
        result.ref.CopyFrom(ref)
        await stream.write(coordinator_pb2.ConnectRequest(results=coordinator_pb2.AttemptResults(results=[result])))
        while (await stream.read()).WhichOneof("message") != "result_acks":
            pass
        stream.cancel()
        return task


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[Client]:
    async with Client(coordinator.address, timeout=5.0) as c:
        await c.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse, "echo")
        yield c


async def test_submit_stores_a_typed_payload(client: Client) -> None:
    handle = await client.submit(ECHO, examples_pb2.EchoRequest(text="hi"), queue="q1", priority=3, tags=["a"])
    assert handle.created and handle.task.state == task_pb2.TASK_STATE_QUEUED
    task = await client.get(handle.id)
    request = examples_pb2.EchoRequest()
    assert task.spec.payload.Unpack(request) and request.text == "hi"
    assert (task.spec.queue, task.spec.priority, list(task.spec.tags)) == ("q1", 3, ["a"])


async def test_submit_json_is_encoded_with_the_registered_type(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "from json"})
    request = examples_pb2.EchoRequest()
    assert handle.task.spec.payload.Unpack(request) and request.text == "from json"


async def test_submit_options_reach_the_spec(client: Client) -> None:
    handle = await client.submit(
        ECHO,
        json='{"text": "x"}',
        delay=30,
        ttl=60,
        timeout=5,
        retry=Retry(max_attempts=3, initial_backoff=0.5),
        metadata={"k": "v"},
        concurrency_key="tenant-1",
    )
    spec = handle.task.spec
    assert handle.task.state == task_pb2.TASK_STATE_PENDING
    assert spec.ttl.seconds == 60 and spec.timeout.seconds == 5
    assert spec.retry.max_attempts == 3 and spec.retry.initial_backoff.nanos == 500_000_000
    assert dict(spec.metadata) == {"k": "v"} and spec.concurrency_key == "tenant-1"


async def test_invalid_submit_names_the_field(client: Client) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.submit(ECHO, json='{"nope": 1}')
    assert any(v.field.startswith("spec.payload_json") for v in caught.value.violations)


async def test_conflicting_arguments_fail_before_sending(client: Client) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await client.submit(ECHO, examples_pb2.EchoRequest(), json={"text": "x"}, delay=1, not_before=None)
    assert [v.field for v in caught.value.violations] == ["payload_json"]


def test_numbers_out_of_their_fields_range_fail_before_sending() -> None:
    # Not an OverflowError from datetime or protobuf: the fields named, as the coordinator would.
    with pytest.raises(errors.InvalidArgumentError) as caught:
        task_spec(ECHO, json={}, priority=2**31, delay=1e12, ttl=-1, timeout=timedelta(days=400))
    assert [v.field for v in caught.value.violations] == ["priority", "delay", "ttl", "timeout"]


async def test_idempotency_key_returns_the_same_task(client: Client) -> None:
    first = await client.submit(ECHO, json={"text": "a"}, idempotency_key="once")
    second = await client.submit(ECHO, json={"text": "a"}, idempotency_key="once")
    assert second.id == first.id and not second.created


async def test_submit_many_reports_each_item(client: Client) -> None:
    results = await client.submit_many(
        [task_spec(ECHO, examples_pb2.EchoRequest(text="ok")), task_spec("no.such.type", json={})]
    )
    assert isinstance(results[0], TaskHandle) and results[0].task.state == task_pb2.TASK_STATE_QUEUED
    assert isinstance(results[1], errors.InvalidArgumentError) and results[1].violations


async def test_get_unknown_task_is_not_found(client: Client) -> None:
    with pytest.raises(errors.NotFoundError):
        await client.get("no-such-task")


async def test_list_filters_and_pages(client: Client) -> None:
    ids = {(await client.submit(ECHO, json={"text": str(i)}, tags=["batch"])).id for i in range(5)}
    await client.submit(ECHO, json={"text": "other"}, queue="elsewhere")
    page, token = await client.list(tags=["batch"], page_size=2)
    assert len(page) == 2 and token
    listed = [t.id async for t in client.iter_tasks(tags=["batch"], page_size=2)]
    assert set(listed) == ids and len(listed) == 5
    queued = [t async for t in client.iter_tasks(queue="elsewhere", states=[task_pb2.TASK_STATE_QUEUED])]
    assert [t.spec.queue for t in queued] == ["elsewhere"]


async def test_result_waits_for_the_worker(client: Client, coordinator: Coordinator) -> None:
    handle = await client.submit(ECHO, examples_pb2.EchoRequest(text="round trip"))
    waiting = asyncio.create_task(handle.result(timeout=20))
    await run_one(coordinator.address)
    result = await waiting
    assert isinstance(result, examples_pb2.EchoResponse) and result.text == "round trip"
    assert handle.task.state == task_pb2.TASK_STATE_SUCCEEDED
    typed = await handle.result(output_type=examples_pb2.EchoResponse)
    assert typed.text == "round trip"
    with pytest.raises(TypeError):
        await handle.result(output_type=examples_pb2.SleepResponse)


async def test_result_of_a_failed_task_raises(client: Client, coordinator: Coordinator) -> None:
    handle = await client.submit(ECHO, json={"text": "x"})
    await run_one(coordinator.address, fail)
    with pytest.raises(errors.TaskFailedError) as caught:
        await handle.result(timeout=20)
    assert (caught.value.task_id, caught.value.state, caught.value.error_type) == (handle.id, "FAILED", "ValueError")


async def test_result_times_out(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "nobody runs this"})
    with pytest.raises(TimeoutError):
        await handle.result(timeout=0.3)


async def test_cancel_ends_the_wait(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "x"})
    waiting = asyncio.create_task(handle.result(timeout=20))
    task = await handle.cancel("changed my mind")
    assert task.state == task_pb2.TASK_STATE_CANCELED
    with pytest.raises(errors.TaskFailedError) as caught:
        await waiting
    assert caught.value.state == "CANCELED"
    with pytest.raises(errors.FailedPreconditionError):
        await client.cancel(handle.id)


async def test_watch_sends_the_current_state_then_changes(client: Client) -> None:
    handle = await client.submit(ECHO, json={"text": "x"})
    events = client.watch([handle.id])
    async with contextlib.aclosing(events):
        first = await anext(events)
        assert first.initial and first.task.state == task_pb2.TASK_STATE_QUEUED
        await client.cancel(handle.id)
        second = await anext(events)
        assert second.task.state == task_pb2.TASK_STATE_CANCELED
        assert second.previous_state == task_pb2.TASK_STATE_QUEUED and second.revision > first.revision


async def test_handle_watch_stops_at_the_terminal_state(client: Client, coordinator: Coordinator) -> None:
    handle = await client.submit(ECHO, json={"text": "x"})
    worker = asyncio.create_task(run_one(coordinator.address))
    states = [event.task.state async for event in handle.watch()]
    await worker
    assert states[0] == task_pb2.TASK_STATE_QUEUED and states[-1] == task_pb2.TASK_STATE_SUCCEEDED
    assert states == sorted(states)


async def test_result_survives_a_coordinator_restart(client: Client, coordinator: Coordinator) -> None:
    handle = await client.submit(ECHO, examples_pb2.EchoRequest(text="still here"))
    waiting = asyncio.create_task(handle.result(timeout=40))
    await asyncio.sleep(0.2)  # let the watch open before the restart breaks it
    await asyncio.to_thread(coordinator.kill)
    await asyncio.to_thread(coordinator.start)
    await run_one(coordinator.address)
    result = await waiting
    assert isinstance(result, examples_pb2.EchoResponse) and result.text == "still here"


async def test_client_follows_the_leader(etcd: EmbeddedEtcd, coordinator: Coordinator) -> None:
    follower = Coordinator(etcd.endpoint, coordinator.namespace)
    with await asyncio.to_thread(follower.start, wait_leader=False):
        await asyncio.to_thread(follower.wait_has_leader)
        async with Client(follower.address) as client:
            await client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
            handle = await client.submit(ECHO, json={"text": "via follower"})
            assert client.address == coordinator.address
            assert (await client.get(handle.id)).id == handle.id


async def test_unreachable_coordinator_is_unavailable() -> None:
    async with Client("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(errors.UnavailableError):
            await client.cluster_status()


async def test_cluster_views(client: Client, coordinator: Coordinator) -> None:
    status = await client.cluster_status()
    assert status.leader_address == coordinator.address
    assert [t.name for t in await client.task_types()] == [ECHO]
    assert await client.nodes() == []


def test_sync_client(coordinator: Coordinator) -> None:
    with SyncClient(coordinator.address) as client:
        client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        handle = client.submit(ECHO, examples_pb2.EchoRequest(text="sync"))
        assert client.get(handle.id).state == task_pb2.TASK_STATE_QUEUED
        assert [t.id for t in client.iter_tasks()] == [handle.id]
        events = client.watch([handle.id])
        assert next(events).initial
        events.close()
        asyncio.run(run_one(coordinator.address))
        result: Message = handle.result(timeout=20)
        assert isinstance(result, examples_pb2.EchoResponse) and result.text == "sync"
        with pytest.raises(errors.NotFoundError):
            client.get("missing")


def test_states_by_name() -> None:
    assert parse_state("running") == task_pb2.TASK_STATE_RUNNING
    assert parse_state("TASK_STATE_FAILED") == task_pb2.TASK_STATE_FAILED
    assert state_name(task_pb2.TASK_STATE_EXPIRED) == "EXPIRED"
    assert is_terminal(task_pb2.TASK_STATE_CANCELED) and not is_terminal(task_pb2.TASK_STATE_QUEUED)
    with pytest.raises(ValueError, match="unknown task state"):
        parse_state("unspecified")


def test_unknown_result_types_stay_packed() -> None:
    from herder.clients.client import unpack

    value = any_pb2.Any(type_url="type.googleapis.com/nobody.Knows", value=b"")
    assert unpack(value) is value


async def test_a_result_whose_class_is_not_imported_comes_typed_from_the_registered_type(
    coordinator: Coordinator,
) -> None:
    # A message this process has no generated class for: only a private pool knows it.
    pool = descriptor_pool.DescriptorPool()
    pool.Add(
        descriptor_pb2.FileDescriptorProto(
            name="elsewhere/v1/report.proto",
            package="elsewhere.v1",
            syntax="proto3",
            message_type=[
                descriptor_pb2.DescriptorProto(
                    name="Report",
                    field=[descriptor_pb2.FieldDescriptorProto(name="pages", number=1, type=5, label=1)],
                )
            ],
        )
    )
    report = message_factory.GetMessageClass(pool.FindMessageTypeByName("elsewhere.v1.Report"))

    def answer(task: task_pb2.Task) -> coordinator_pb2.AttemptResult:
        result = coordinator_pb2.AttemptResult()
        result.output.Pack(report(pages=12))
        return result

    async with Client(coordinator.address) as client:
        await client.register_task_type("reports.count", report, report)
        handle = await client.submit("reports.count", json={"pages": 1})
        await run_one(coordinator.address, answer, "reports.count")
        result = await handle.result(timeout=10)
    assert not isinstance(result, any_pb2.Any)
    assert result.DESCRIPTOR.full_name == "elsewhere.v1.Report" and str(result) == "pages: 12\n"
