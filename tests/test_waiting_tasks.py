"""Waiting tasks are held as committed records only; the parsed message comes back when needed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server.app import Coordinator, CoordinatorConfig
from herder.server.leader import NamespaceLeader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def leading(etcd: EmbeddedEtcd, namespace: str) -> AsyncIterator[tuple[Coordinator, NamespaceLeader]]:
    coordinator = Coordinator(
        CoordinatorConfig(etcd=(etcd.endpoint,), listen=f"127.0.0.1:{free_port()}", namespace=namespace)
    )
    await coordinator.start()
    try:
        async with asyncio.timeout(20):
            while True:
                leader = coordinator.leader
                if leader is not None:
                    break
                await asyncio.sleep(0.02)
        yield coordinator, leader
    finally:
        await coordinator.stop()


async def test_queued_tasks_rest_as_records_and_wake_with_their_state(
    leading: tuple[Coordinator, NamespaceLeader],
) -> None:
    coordinator, leader = leading
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        task_type = task_type_for("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
        specs = [
            task_pb2.TaskSpec(type="examples.echo", payload_json=f'{{"text": "{i}"}}', idempotency_key=f"k{i % 5}")
            for i in range(20)
        ]
        reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
    created = [r.task.id for r in reply.results if r.created]
    assert len(created) == 5
    entries = [leader.entries[task_id] for task_id in created]
    assert all(entry._task is None and entry.writes_pending == 0 for entry in entries)
    # Touching one brings back the committed state.
    assert entries[0].task.state == task_pb2.TASK_STATE_QUEUED
    assert entries[0].task.id == created[0]
