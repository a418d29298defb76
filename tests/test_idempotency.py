"""Idempotency keys: one task per key, in batches, across crashes, until the window ends."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
from _cluster import Coordinator
from _scheduling import ECHO, connect, gone, no_keys, stored_keys_mentioning
from _timing import SLACK, eventually

from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(60)


async def test_the_same_idempotency_key_returns_the_existing_task(api) -> None:
    first = await api.client.submit(ECHO, json={"text": "one"}, idempotency_key="order-1")
    again = await api.client.submit(ECHO, json={"text": "two"}, idempotency_key="order-1", priority=9)
    assert (first.created, again.created) == (True, False)
    assert again.id == first.id
    assert again.task.spec.priority == 0
    listed = await api.stub.ListTasks(pb.ListTasksRequest())
    assert [t.id for t in listed.tasks] == [first.id]


async def test_concurrent_submissions_of_one_key_create_one_task(api, kv, namespace) -> None:
    handles = await asyncio.gather(
        *(api.client.submit(ECHO, json={"text": str(n)}, idempotency_key="same") for n in range(25))
    )
    assert len({h.id for h in handles}) == 1, Counter(h.id for h in handles)
    assert sum(h.created for h in handles) == 1
    listed = await api.stub.ListTasks(pb.ListTasksRequest())
    assert len(listed.tasks) == 1
    assert len([k for k in await stored_keys_mentioning(kv, namespace, [handles[0].id]) if b"/tasks/" in k]) == 1


async def test_a_batch_answers_repeated_and_existing_keys_in_spec_order(api) -> None:
    existing = await api.client.submit(ECHO, json={"text": "old"}, idempotency_key="old")

    def spec(text: str, key: str = "") -> task_pb2.TaskSpec:
        return task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": text}), idempotency_key=key)

    specs = [spec("a", "new"), spec("b", "old"), spec("c", "new"), spec("d")]
    reply = await api.stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
    assert [r.code for r in reply.results] == [0, 0, 0, 0]
    texts = [_text(r.task) for r in reply.results]
    assert [(r.created, t) for r, t in zip(reply.results, texts, strict=True)] == [
        (True, "a"),
        (False, "old"),
        (False, "a"),
        (True, "d"),
    ], "results must come one per spec, in order (created, echoed text)"
    ids = [r.task.id for r in reply.results]
    assert ids[1] == existing.id
    assert ids[0] == ids[2] != ids[3]
    assert len((await api.stub.ListTasks(pb.ListTasksRequest())).tasks) == 3


def _text(task: task_pb2.Task) -> str:
    request = examples_pb2.EchoRequest()
    task.spec.payload.Unpack(request)
    return request.text


async def test_an_idempotency_key_survives_a_crash(coordinator) -> None:
    async with connect(coordinator) as api:
        first = await api.client.submit(ECHO, json={"text": "a"}, idempotency_key="crash-proof")
    coordinator.kill()
    coordinator.start()
    async with connect(coordinator) as api:
        again = await api.client.submit(ECHO, json={"text": "b"}, idempotency_key="crash-proof")
        assert (again.id, again.created) == (first.id, False)
        assert len((await api.stub.ListTasks(pb.ListTasksRequest())).tasks) == 1


async def test_an_idempotency_key_is_free_after_its_window_and_its_tasks_deletion(etcd, namespace, kv) -> None:
    flags = ["--retention", "1", "--idempotency-window", "1"]
    with Coordinator(etcd.endpoint, namespace, extra_args=flags) as node:
        async with connect(node) as api:
            first = await api.client.submit(ECHO, json={"text": "a"}, idempotency_key="reusable")
            await api.client.cancel(first.id)
            await eventually(lambda: gone(api, first.id), timeout=1 + SLACK + 5, what="the task deleted")
            await eventually(
                lambda: no_keys(kv, namespace, ["reusable", first.id]), timeout=SLACK + 5, what="etcd keys gone"
            )
            second = await api.client.submit(ECHO, json={"text": "b"}, idempotency_key="reusable")
            assert second.created and second.id != first.id
