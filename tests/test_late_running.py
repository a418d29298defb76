"""The RUNNING record is written late (--running-write-delay): an attempt that ends sooner is
written once, with its outcome, and a leader that dies before writing it loses nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker
from _timing import eventually

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd

pytestmark = pytest.mark.timeout(90)

S = task_pb2.TaskState
ECHO = "examples.echo"
# Longer than any test here runs: the RUNNING record is never written by the delay.
NEVER = ("--running-write-delay", "60")


async def _stub(channel: grpc.aio.Channel) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    echo = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
    await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=echo))
    return stub


async def _submit(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> task_pb2.Task:
    spec = task_pb2.TaskSpec(type=ECHO, queue="late", payload_json=json.dumps({"text": "hi"}))
    return (await stub.SubmitTask(pb.SubmitTaskRequest(spec=spec))).task


async def _stored(kv: Etcd, namespace: str, task_id: str) -> task_pb2.Task:
    kvs, _, _ = await kv.range(keys.task(keys.prefix(namespace), task_id), b"")
    return task_pb2.Task.FromString(kvs[0].value)


@pytest.fixture
def late(etcd: EmbeddedEtcd, namespace: str) -> AsyncIterator[Coordinator]:
    node = Coordinator(etcd.endpoint, namespace, extra_args=NEVER)
    with node:
        yield node


async def test_an_attempt_ending_within_the_delay_goes_from_assigned_to_its_outcome(late: Coordinator) -> None:
    async with grpc.aio.insecure_channel(late.address) as channel:
        stub = await _stub(channel)
        task = await _submit(stub)
        call = stub.WatchTasks(pb.WatchTasksRequest(ids=[task.id]))
        states: list[int] = []

        async def collect() -> None:
            async for reply in call:
                states.append(reply.event.task.state)
                if reply.event.task.state == S.TASK_STATE_SUCCEEDED:
                    return

        collector = asyncio.create_task(collect())
        async with RawWorker(late.address, "w", [ECHO]) as worker:
            await worker.start_next()

            async def counted_running() -> bool:
                stats = (await stub.ListQueues(pb.ListQueuesRequest())).queues
                return [(q.name, q.assigned, q.running) for q in stats] == [("late", 0, 1)]

            # The leader counts it running at once; what readers are told is what is written: ASSIGNED.
            await eventually(counted_running, what="the queue counting the attempt as running")
            assert (await stub.GetTask(pb.GetTaskRequest(id=task.id))).task.state == S.TASK_STATE_ASSIGNED
            assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="done"))).accepted
        await asyncio.wait_for(collector, 10)
        call.cancel()
        assert states == [S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_SUCCEEDED]
        done = (await stub.GetTask(pb.GetTaskRequest(id=task.id))).task
        # The outcome's one write carries when the attempt started.
        assert done.HasField("start_time")
        assert done.assign_time.ToNanoseconds() <= done.start_time.ToNanoseconds() <= done.finish_time.ToNanoseconds()


async def test_a_longer_attempt_is_written_running_after_the_delay(etcd: EmbeddedEtcd, namespace: str) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=("--running-write-delay", "0.5")) as node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = await _stub(channel)
            task = await _submit(stub)
            async with RawWorker(node.address, "w", [ECHO]) as worker:
                await worker.start_next()

                async def running() -> bool:
                    found = (await stub.GetTask(pb.GetTaskRequest(id=task.id))).task
                    return found.state == S.TASK_STATE_RUNNING and found.HasField("start_time")

                await eventually(running, what="the RUNNING record written")
                assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="done"))).accepted
            done = (await stub.GetTask(pb.GetTaskRequest(id=task.id))).task
            assert (done.state, done.attempt) == (S.TASK_STATE_SUCCEEDED, 1)


async def test_a_leader_dying_before_writing_running_loses_nothing(etcd: EmbeddedEtcd, namespace: str) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    node = Coordinator(etcd.endpoint, namespace, heartbeat_timeout=10.0, ack_timeout=10.0, extra_args=NEVER)
    try:
        with node:
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = await _stub(channel)
                tasks = [await _submit(stub) for _ in range(3)]
            async with RawWorker(node.address, "survivor", [ECHO], slots=3) as worker:
                started = [await worker.start_next() for _ in tasks]

                async def counted_running() -> bool:
                    async with grpc.aio.insecure_channel(node.address) as channel:
                        stats = await coordinator_pb2_grpc.CoordinatorServiceStub(channel).ListQueues(
                            pb.ListQueuesRequest()
                        )
                    return [q.running for q in stats.queues] == [3]

                await eventually(counted_running, what="every acknowledgement taken")
                node.kill()
                await asyncio.wait_for(worker.closed.wait(), 10)
            # Started, and stored ASSIGNED: the new leader must treat them exactly as RUNNING.
            for task in started:
                assert (await _stored(kv, namespace, task.id)).state == S.TASK_STATE_ASSIGNED

            node.start()  # same port; leads once the dead leader's lease has expired
            refs = [(t.id, t.attempt) for t in started]
            async with RawWorker(node.address, "survivor", [ECHO], slots=3, running=refs) as worker:
                assert worker.welcome is not None
                assert sorted((r.task_id, r.attempt) for r in worker.welcome.reclaimed) == sorted(refs)

                # Re-claimed is written RUNNING without waiting for the delay: the worker said it runs them.
                async def stored_running() -> bool:
                    states = [(await _stored(kv, namespace, t.id)).state for t in started]
                    return states == [S.TASK_STATE_RUNNING] * len(started)

                await eventually(stored_running, what="the re-claimed attempts written RUNNING", timeout=10)
                for task_id, attempt in refs:
                    assert (await worker.succeed(task_id, attempt, examples_pb2.EchoResponse(text="kept"))).accepted
                with pytest.raises(asyncio.TimeoutError):
                    await worker.next_assignment(timeout=0.5)
        for task in started:
            stored = await _stored(kv, namespace, task.id)
            assert (stored.state, stored.attempt, list(stored.attempt_errors)) == (S.TASK_STATE_SUCCEEDED, 1, [])
    finally:
        await kv.close()
