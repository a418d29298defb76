"""One request's writes are one transaction: read back from etcd, each task's keys share revisions."""

from __future__ import annotations

from collections import Counter

import pytest
from _cluster import Coordinator
from _helpers import echo_spec, echo_stub
from _timing import eventually

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.examples import build_example_worker
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.server import keys
from herder.server._etcd import Etcd, KeyValue

pytestmark = pytest.mark.timeout(120)

S = task_pb2.TaskState
TASKS = 1500


async def _scan(kv: Etcd, prefix: bytes) -> dict[str, KeyValue]:
    return {item.key[len(prefix) :].decode(): item async for item in kv.scan_prefix(prefix)}


async def test_a_task_its_idempotency_key_and_its_retention_marker_land_together(
    coordinator: Coordinator, etcd: EmbeddedEtcd, namespace: str
) -> None:
    """Defect 5: a task and its idempotency key could land in different transactions, and a
    retention marker before its terminal state."""
    prefix = keys.prefix(namespace)
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    try:
        async with echo_stub(coordinator.address) as stub, build_example_worker(coordinator.address, slots=64):
            # Submitted while a worker finishes tasks: the committer is as busy as it gets.
            for batch in range(0, TASKS, 500):
                specs = [echo_spec(f"{i}", idempotency_key=f"key-{i}") for i in range(batch, batch + 500)]
                reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
                assert all(r.code == 0 for r in reply.results)

            async def all_done() -> bool:
                stored = await _scan(kv, keys.tasks_prefix(prefix))
                return len(stored) == TASKS and all(
                    task_pb2.Task.FromString(item.value).state == S.TASK_STATE_SUCCEEDED for item in stored.values()
                )

            await eventually(all_done, timeout=90, what=f"{TASKS} tasks succeeded")
        tasks = await _scan(kv, keys.tasks_prefix(prefix))
        idempotency = await _scan(kv, keys.idempotency_prefix(prefix))
        markers = await _scan(kv, keys.gc_prefix(prefix))
    finally:
        await kv.close()
    by_key = {task_pb2.Task.FromString(item.value).spec.idempotency_key: item for item in tasks.values()}
    assert len(idempotency) == TASKS
    split = [key for key, item in idempotency.items() if item.create_revision != by_key[key].create_revision]
    assert split == [], f"{len(split)} idempotency keys not written with their task"
    marked = Counter(name.rsplit("/", 1)[1] for name in markers)
    assert set(marked) == set(tasks) and max(marked.values()) == 1
    early = [n for n, item in markers.items() if item.create_revision != tasks[n.rsplit("/", 1)[1]].mod_revision]
    assert early == [], f"{len(early)} retention markers not written with their task's terminal state"
