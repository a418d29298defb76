"""Crashes and fencing: a killed coordinator loses and repeats nothing; a deposed one cannot write."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import grpc
import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd
from herder.server.committer import Committer, FencedError, Write

S = task_pb2.TaskState
ECHO = "examples.echo"


async def _register(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    task_type = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
    await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))


async def _all_tasks(kv: Etcd, namespace: str) -> list[task_pb2.Task]:
    prefix = keys.tasks_prefix(keys.prefix(namespace))
    return [task_pb2.Task.FromString(item.value) async for item in kv.scan_prefix(prefix)]


@pytest.mark.timeout(120)
async def test_killed_coordinator_loses_and_duplicates_nothing(etcd: EmbeddedEtcd, namespace: str) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    node = Coordinator(etcd.endpoint, namespace, heartbeat_timeout=10.0, ack_timeout=10.0)
    with node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            await _register(stub)
            for batch in range(2):
                specs = [
                    task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": f"{batch}-{i}"})) for i in range(500)
                ]
                reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
                assert all(r.code == 0 for r in reply.results)
        running: list[task_pb2.Task] = []
        async with RawWorker(node.address, "survivor", [ECHO], slots=5) as worker:
            for _ in range(5):
                task = await worker.start_next()
                running.append(task)

            async def all_running() -> bool:
                states = {t.id: t.state for t in await _all_tasks(kv, namespace)}
                return all(states[t.id] == S.TASK_STATE_RUNNING for t in running)

            deadline = time.monotonic() + 10
            while not await all_running():
                assert time.monotonic() < deadline, "attempts never became RUNNING"
                await asyncio.sleep(0.05)
            node.kill()
            await asyncio.wait_for(worker.closed.wait(), 10)

        node.start()  # same port; leads once the dead leader's lease has expired
        refs = [(t.id, t.attempt) for t in running]
        assignments: Counter[str] = Counter(t.id for t in running)
        async with RawWorker(node.address, "survivor", [ECHO], slots=50, running=refs) as worker:
            assert worker.welcome is not None
            assert sorted((r.task_id, r.attempt) for r in worker.welcome.reclaimed) == sorted(refs)
            for task_id, attempt in refs:
                ack = await worker.succeed(task_id, attempt, examples_pb2.EchoResponse(text="reclaimed"))
                assert ack.accepted
            remaining = 995
            accepted = 0
            while accepted < remaining:
                task = await worker.next_assignment(timeout=20)
                assignments[task.id] += 1
                await worker.ack(task)
                value = examples_pb2.EchoResponse(text=task.id)
                ack = await worker.succeed(task.id, task.attempt, value)
                accepted += ack.accepted
    tasks = await _all_tasks(kv, namespace)
    await kv.close()
    assert len(tasks) == 1000
    assert Counter(t.state for t in tasks) == {S.TASK_STATE_SUCCEEDED: 1000}
    assert all(t.attempt == 1 for t in tasks), "a task was run twice"
    assert set(assignments) == {t.id for t in tasks}
    assert set(assignments.values()) == {1}


@pytest.mark.timeout(60)
async def test_a_stale_fence_writes_nothing(etcd: EmbeddedEtcd, namespace: str) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    prefix = keys.prefix(namespace)
    reply = await kv.txn([], [])
    committer = Committer(kv, keys.leader(prefix), fence_revision=reply.header.revision + 1000)
    with pytest.raises(FencedError):
        await committer.commit([Write(prefix + b"tasks/x", b"value")])
    assert committer.failed.is_set()
    with pytest.raises(FencedError):
        await committer.commit([Write(prefix + b"tasks/y", b"value")])
    found, _ = await kv.get(prefix + b"tasks/x")
    assert found is None
    await committer.close()
    await kv.close()


@pytest.mark.timeout(60)
async def test_coordinator_that_loses_its_lease_steps_down_then_leads_again(etcd: EmbeddedEtcd, namespace: str) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    with Coordinator(etcd.endpoint, namespace) as node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            before = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
            leader_kv, _ = await kv.get(keys.leader(keys.prefix(namespace)))
            assert leader_kv is not None
            await kv.revoke(leader_kv.lease)  # as if etcd expired it
            deadline = time.monotonic() + 20
            while True:
                status = await stub.GetClusterStatus(pb.GetClusterStatusRequest())
                if status.leader_revision and status.leader_revision != before.leader_revision and node.is_leader():
                    break
                assert time.monotonic() < deadline, "the coordinator did not campaign again"
                await asyncio.sleep(0.05)
            log = node.log_tail()
            assert "lost leadership" in log
            await _register(stub)  # writes work again under the new fence
    await kv.close()
