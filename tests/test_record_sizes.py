"""No record bigger than etcd accepts is ever sent: requests, results, errors and progress are bounded first."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_spec, echo_stub, fence, get
from _raw_worker import RawWorker, ref
from _timing import eventually

from herder.clients import TaskContext, Worker, WorkerSettings
from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.server import keys
from herder.server._etcd import Etcd

pytestmark = pytest.mark.timeout(90)

S = task_pb2.TaskState
MB2 = 2 * 1024 * 1024


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field: how an unknown field rides along in a message's bytes."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _identity(data: bytes) -> bytes:
    return data


async def _raw_call(address: str, method: str, request: bytes, reply_type: type) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/herder.v1.CoordinatorService/{method}",
            request_serializer=_identity,
            response_deserializer=reply_type.FromString,
        )
        return await call(request, timeout=20)


async def _stored_sizes(etcd: EmbeddedEtcd, namespace: str) -> dict[bytes, int]:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    try:
        return {item.key: len(item.value) async for item in kv.scan_prefix(keys.prefix(namespace))}
    finally:
        await kv.close()


async def test_unknown_fields_padding_a_write_are_dropped_not_stored(
    coordinator: Coordinator, etcd: EmbeddedEtcd, namespace: str
) -> None:
    """Defect 3: a 2 MB unknown field passed every size check and deposed the leader."""
    padding = _field(999, b"x" * MB2)
    async with echo_stub(coordinator.address) as stub:
        before = await fence(stub)
        spec = echo_spec("padded").SerializeToString() + padding
        reply = await _raw_call(coordinator.address, "SubmitTask", _field(1, spec), pb.SubmitTaskResponse)
        task_id = reply.task.id  # type: ignore[attr-defined]
        limit = pb.Limit(scope=pb.LIMIT_SCOPE_QUEUE, name="padded", max_running=3).SerializeToString()
        await _raw_call(coordinator.address, "SetLimit", _field(1, limit + padding), pb.SetLimitResponse)
        task_type = task_type_for("examples.padded", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        await _raw_call(
            coordinator.address,
            "RegisterTaskType",
            _field(1, task_type.SerializeToString() + padding),
            pb.RegisterTaskTypeResponse,
        )
        assert (await get(stub, task_id)).state == S.TASK_STATE_QUEUED
        assert await fence(stub) == before
    sizes = await _stored_sizes(etcd, namespace)
    assert sizes and max(sizes.values()) < 64 * 1024, sizes


@pytest.mark.parametrize("kind", ["output", "error", "canceled"])
async def test_a_result_too_large_fails_the_attempt_for_good_and_is_acknowledged(
    coordinator: Coordinator, kind: str
) -> None:
    async with echo_stub(coordinator.address) as stub:
        before = await fence(stub)
        task = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec()))).task
        async with RawWorker(coordinator.address, "big", [ECHO]) as worker:
            assigned = await worker.start_next()
            result = pb.AttemptResult(ref=ref(task.id, assigned.attempt))
            if kind == "output":
                result.output.Pack(examples_pb2.EchoResponse(text="x" * MB2))
            elif kind == "error":
                result.error.CopyFrom(task_pb2.TaskError(type="Boom", message="x" * MB2, retryable=True))
            else:
                await stub.CancelTask(pb.CancelTaskRequest(id=task.id))
                await worker.cancels.get()
                result.canceled = "x" * MB2
            await worker.send_result(result)
            ack = await asyncio.wait_for(worker.result_acks.get(), 20)
            assert ack.accepted, ack
        done = await get(stub, task.id)
        assert (done.state, done.error.type, done.error.retryable) == (
            S.TASK_STATE_FAILED,
            "herder.result_too_large",
            False,
        )
        assert "at most" in done.error.message
        assert await fence(stub) == before


async def test_a_progress_update_too_large_is_dropped_and_the_attempt_goes_on(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        before = await fence(stub)
        task = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec()))).task
        async with RawWorker(coordinator.address, "chatty", [ECHO]) as worker:
            await worker.start_next()
            big = task_pb2.Progress(fraction=0.5, message="x" * MB2)
            await worker.send(progress=pb.ProgressUpdate(ref=ref(task.id, 1), progress=big))
            small = task_pb2.Progress(fraction=0.7, message="fine")
            await worker.send(progress=pb.ProgressUpdate(ref=ref(task.id, 1), progress=small))
            shown = await eventually(lambda: _progress(stub, task.id), what="the small progress update")
            assert shown.message == "fine"
            ack = await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="ok"))
            assert ack.accepted
        assert (await get(stub, task.id)).state == S.TASK_STATE_SUCCEEDED
        assert await fence(stub) == before
    assert "Traceback" not in coordinator.log_tail(100_000)


async def test_the_sdk_refuses_a_result_too_large_before_sending_it(coordinator: Coordinator) -> None:
    worker = Worker(coordinator.address, worker_id="sdk-big", settings=WorkerSettings())

    @worker.task(ECHO, input_type=examples_pb2.EchoRequest, output_type=examples_pb2.EchoResponse)
    async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        if request.text == "progress":
            with pytest.raises(ValueError, match="16384 bytes"):
                await ctx.progress(0.5, "x" * MB2)
            return examples_pb2.EchoResponse(text="refused progress")
        return examples_pb2.EchoResponse(text="x" * MB2)

    async with echo_stub(coordinator.address) as stub:
        big = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec("big")))).task
        chatty = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec("progress")))).task
        async with worker:
            done = await eventually(lambda: _finished(stub, big.id), what="the big result refused")
            assert (done.state, done.error.type) == (S.TASK_STATE_FAILED, "herder.result_too_large")
            assert "524288 bytes" in done.error.message
            other = await eventually(lambda: _finished(stub, chatty.id), what="the task after a refused progress")
            assert other.state == S.TASK_STATE_SUCCEEDED


async def _progress(stub: object, task_id: str) -> task_pb2.Progress | None:
    task = await get(stub, task_id)  # type: ignore[arg-type]
    return task.progress if task.progress.message else None


async def _finished(stub: object, task_id: str) -> task_pb2.Task | None:
    task = await get(stub, task_id)  # type: ignore[arg-type]
    return task if task.state in (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED) else None


@pytest.fixture
def small_limits(etcd: EmbeddedEtcd, namespace: str) -> Iterator[Coordinator]:
    flags = ["--max-result-bytes", "4096", "--max-error-bytes", "2048", "--max-progress-bytes", "1024"]
    with Coordinator(etcd.endpoint, namespace, extra_args=flags) as node:
        yield node


async def test_configured_limits_reach_the_worker_in_its_welcome(small_limits: Coordinator) -> None:
    async with RawWorker(small_limits.address, "raw", [ECHO]) as raw:
        assert raw.welcome is not None
        assert (raw.welcome.max_result_bytes, raw.welcome.max_error_bytes, raw.welcome.max_progress_bytes) == (
            4096,
            2048,
            1024,
        )
    worker = Worker(small_limits.address, worker_id="sdk-small", settings=WorkerSettings())

    @worker.task(ECHO, input_type=examples_pb2.EchoRequest, output_type=examples_pb2.EchoResponse)
    async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        return examples_pb2.EchoResponse(text="x" * 5000)

    async with echo_stub(small_limits.address) as stub, worker:
        task = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec()))).task
        done = await eventually(lambda: _finished(stub, task.id), what="the result refused by the SDK")
        assert (done.state, done.error.type) == (S.TASK_STATE_FAILED, "herder.result_too_large")
        assert "4096 bytes" in done.error.message
