"""Hostile input found by trying the API as an attacker would: each gets a clear, bounded answer,
costs the leader no more than its size, and never deposes it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_spec, echo_stub, fence, get, submit
from _raw_worker import RawWorker, ref

from herder.clients import errors
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState


async def _refused(call: object) -> errors.HerderError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return errors.from_rpc_error(caught.value)


async def test_huge_repeated_fields_are_counted_before_anything_else(coordinator: Coordinator) -> None:
    """A million-element field was checked element by element: seconds of stalled loop, a lost lease."""
    async with echo_stub(coordinator.address) as stub:
        before = await fence(stub)
        spec = echo_spec(tags=[""] * 300_000)
        error = await _refused(stub.SubmitTask(pb.SubmitTaskRequest(spec=spec)))
        assert isinstance(error, errors.InvalidArgumentError)
        assert [(v.field, v.description) for v in error.violations] == [
            ("spec.tags", "has 300000 tags, at most 32 allowed")
        ]
        spec = echo_spec(metadata={str(i): "" for i in range(100_000)})
        error = await _refused(stub.SubmitTask(pb.SubmitTaskRequest(spec=spec)))
        assert [v.field for v in error.violations] == ["spec.metadata"]
        watch = stub.WatchTasks(pb.WatchTasksRequest(ids=[" "] * 300_000))
        error = await _refused(watch.read())
        assert [v.description for v in error.violations] == ["has 300000 ids, at most 1000 allowed"]
        assert await fence(stub) == before


async def test_a_request_with_many_bad_fields_is_still_invalid_argument(coordinator: Coordinator) -> None:
    """Every violation used to go in the status trailer: past 16 KiB the client saw RESOURCE_EXHAUSTED."""
    async with echo_stub(coordinator.address) as stub:
        watch = stub.WatchTasks(pb.WatchTasksRequest(ids=["a b"] * 1000))
        error = await _refused(watch.read())
        assert isinstance(error, errors.InvalidArgumentError)
        assert len(error.violations) == errors.MAX_VIOLATIONS
        assert error.violations[-1].description == "... and 985 more violations like the ones above"
        spec = echo_spec(tags=["x" * 130] * 32)
        error = await _refused(stub.SubmitTask(pb.SubmitTaskRequest(spec=spec)))
        assert isinstance(error, errors.InvalidArgumentError) and len(error.violations) == errors.MAX_VIOLATIONS


async def test_an_integer_longer_than_python_parses_is_invalid_json(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        spec = task_pb2.TaskSpec(type=ECHO, payload_json='{"text": ' + "1" * 5000 + "}")
        error = await _refused(stub.SubmitTask(pb.SubmitTaskRequest(spec=spec)))
        assert isinstance(error, errors.InvalidArgumentError)
        assert error.violations[0].field == "spec.payload_json" and "not valid JSON" in error.violations[0].description
    assert "Traceback" not in coordinator.log_tail(100_000)


async def test_a_forged_page_token_is_invalid_argument(coordinator: Coordinator, namespace: str) -> None:
    token = base64.urlsafe_b64encode(keys.tasks_prefix(keys.prefix(namespace)) + b"\xff").decode()
    async with echo_stub(coordinator.address) as stub:
        request = pb.ListTasksRequest(page_token=token, states=[S.TASK_STATE_QUEUED])
        error = await _refused(stub.ListTasks(request))
        assert [v.field for v in error.violations] == ["page_token"]
    assert "Traceback" not in coordinator.log_tail(100_000)


@pytest.fixture
def two_sessions(etcd: EmbeddedEtcd, namespace: str) -> Iterator[Coordinator]:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--max-sessions", "2"]) as node:
        yield node


async def test_worker_sessions_are_capped(two_sessions: Coordinator) -> None:
    address = two_sessions.address
    async with echo_stub(address), RawWorker(address, "one", [ECHO]), RawWorker(address, "two", [ECHO]):
        third = RawWorker(address, "three", [ECHO])
        with pytest.raises(RuntimeError, match="no welcome"):
            await third.__aenter__()
        await third.close()
        assert third.error is not None and third.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-sessions" in (third.error.details() or "")


async def test_control_characters_in_a_worker_id_are_refused(coordinator: Coordinator) -> None:
    worker = RawWorker(coordinator.address, "w\n\x1b[31mFAKE LOG LINE", [ECHO])
    with pytest.raises(RuntimeError, match="no welcome"):
        await worker.__aenter__()
    await worker.close()
    assert worker.error is not None and worker.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FAKE LOG LINE" not in coordinator.log_tail(100_000)


@pytest.mark.parametrize(
    ("labels", "violation"),
    [
        ({"zone": "eu\x1b[31m"}, ("hello.labels[zone]", "must not contain control characters")),
        ({f"k{i}": "v" for i in range(65)}, ("hello.labels", "has 65 entries, at most 64 allowed")),
        ({"k": "v" * 1025}, ("hello.labels[k]", "value is 1025 characters, at most 1024 allowed")),
    ],
)
async def test_hostile_worker_labels_are_refused(
    coordinator: Coordinator, labels: dict[str, str], violation: tuple[str, str]
) -> None:
    worker = RawWorker(coordinator.address, "labelled", [ECHO])
    worker.hello.labels.update(labels)
    with pytest.raises(RuntimeError, match="no welcome"):
        await worker.__aenter__()
    await worker.close()
    assert worker.error is not None
    error = errors.from_rpc_error(worker.error)
    assert isinstance(error, errors.InvalidArgumentError)
    assert [(v.field, v.description) for v in error.violations] == [violation]


async def test_a_worker_cannot_report_the_coordinators_own_error_types(coordinator: Coordinator) -> None:
    """A worker-made herder.ack_timeout was never counted: the task ran for ever despite max_attempts=1."""
    async with echo_stub(coordinator.address) as stub:
        task = await submit(stub, retry=task_pb2.RetryPolicy(max_attempts=1))
        async with RawWorker(coordinator.address, "liar", [ECHO]) as worker:
            assigned = await worker.start_next()
            ack = await worker.fail(task.id, assigned.attempt, task_pb2.TaskError(type="herder.ack_timeout"))
            assert not ack.accepted and "coordinator's own" in ack.reason
        done = await get(stub, task.id)
        assert (done.state, done.error.type) == (S.TASK_STATE_FAILED, "herder.invalid_result")


async def test_an_output_whose_bytes_do_not_decode_fails_as_bad_output(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        task = await submit(stub)
        async with RawWorker(coordinator.address, "garbler", [ECHO]) as worker:
            assigned = await worker.start_next()
            output = pb.AttemptResult(ref=ref(task.id, assigned.attempt))
            output.output.type_url = "type.googleapis.com/" + examples_pb2.EchoResponse.DESCRIPTOR.full_name
            output.output.value = b"\xff\xff\xff\xff"
            await worker.send_result(output)
            assert (await asyncio.wait_for(worker.result_acks.get(), 10)).accepted
        done = await get(stub, task.id)
        assert (done.state, done.error.type) == (S.TASK_STATE_FAILED, "herder.bad_output")
        assert "do not decode" in done.error.message


async def test_a_flood_of_empty_messages_logs_one_line(coordinator: Coordinator) -> None:
    async with RawWorker(coordinator.address, "babbler", [ECHO]) as worker:
        for _ in range(500):
            await worker.send()
        # Answered after every message before it was handled: the stream is read in order.
        await worker.send_result(pb.AttemptResult(ref=ref("no-such-task", 1), canceled="x"))
        assert not (await asyncio.wait_for(worker.result_acks.get(), 10)).accepted
    assert coordinator.log_tail(1_000_000).count("sent an unexpected empty message") == 1


async def test_repeating_an_id_in_a_watch_reports_its_task_once(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        task = await submit(stub)
        watch = stub.WatchTasks(pb.WatchTasksRequest(ids=[task.id] * 3))
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.event.initial and first.event.task.state == S.TASK_STATE_QUEUED
        await stub.CancelTask(pb.CancelTaskRequest(id=task.id))
        second = await asyncio.wait_for(watch.read(), 10)
        assert not second.event.initial and second.event.task.state == S.TASK_STATE_CANCELED
        watch.cancel()


@pytest.fixture
def short_lease(etcd: EmbeddedEtcd, namespace: str) -> Iterator[Coordinator]:
    with Coordinator(etcd.endpoint, namespace, lease_ttl=2) as node:
        yield node


async def test_a_batch_slow_to_check_does_not_hold_the_loop_past_the_lease(short_lease: Coordinator) -> None:
    """900 payloads of 1,000-entry JSON maps (15 MB) take seconds to check; the lease is kept meanwhile."""
    attributes = {f"k{i}": "v" * 4 for i in range(1000)}
    payload = json.dumps({"text": "x", "attributes": attributes})
    specs = [task_pb2.TaskSpec(type=ECHO, payload_json=payload) for _ in range(900)]
    async with echo_stub(short_lease.address) as stub:
        before = await fence(stub)
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(short_lease.address, options=options) as channel:
            big = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            reply = await big.SubmitTasks(pb.SubmitTasksRequest(specs=specs), timeout=60)
        assert all(result.code == 0 for result in reply.results)
        assert await fence(stub) == before
    assert "stepping down" not in short_lease.log_tail(100_000)
