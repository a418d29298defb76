"""Watchers cannot hurt the leader: the hub's indexes, the backlog bound and the cap on streams.

The hub is tested in process; the bounds against a real coordinator process and etcd, with
watch streams that stop reading (gRPC flow control then holds the coordinator's writes, and
the changes pile up in its queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from _cluster import Coordinator
from _helpers import violations
from _timing import eventually

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server.watchers import Subscription, TaskFilter, WatchHub, WatchSettings

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
ECHO = "examples.echo"
OTHER = "examples.other"
DROPPED = "ended and its backlog released"

# ----------------------------------------------------------------- the hub, in process


@dataclass(frozen=True, slots=True)
class CountingFilter(TaskFilter):
    """A filter that records the id of every task publish tests it with."""

    tested: list[str] = field(default_factory=list, compare=False, hash=False)

    def matches(self, task: task_pb2.Task) -> bool:
        self.tested.append(task.id)
        return TaskFilter.matches(self, task)


def _task(task_id: str, queue: str = "q", type: str = "t", state: int = S.TASK_STATE_QUEUED) -> task_pb2.Task:
    return task_pb2.Task(id=task_id, state=state, spec=task_pb2.TaskSpec(queue=queue, type=type))  # type: ignore[arg-type]


def _publish(hub: WatchHub, task: task_pb2.Task, revision: int) -> None:
    hub.publish(task, task.SerializeToString(), None, revision)


async def _drain(sub: Subscription) -> list[str]:
    ids = []
    while sub.backlog:
        item = await sub.next()
        assert item is not None
        ids.append(item.task_id)
    return ids


def test_publish_tests_only_the_subscriptions_indexed_under_the_change() -> None:
    hub = WatchHub()
    candidates = [
        CountingFilter(ids=frozenset({"a"})),
        CountingFilter(queue="q1"),
        CountingFilter(type="t1"),
        CountingFilter(states=frozenset({S.TASK_STATE_QUEUED})),
    ]
    others = [
        CountingFilter(ids=frozenset({"b", "c"})),
        CountingFilter(queue="q2"),
        CountingFilter(type="t2"),
        # Indexed under its queue: its type matching does not make it a candidate.
        CountingFilter(queue="q2", type="t1"),
    ]
    subs = [hub.subscribe(f) for f in candidates + others]
    _publish(hub, _task("a", queue="q1", type="t1"), 10)
    assert [f.tested for f in candidates] == [["a"]] * 4
    assert [f.tested for f in others] == [[]] * 4
    assert [s.backlog for s in subs] == [1, 1, 1, 1, 0, 0, 0, 0]


async def test_each_watcher_receives_only_its_matches() -> None:
    hub = WatchHub()
    by_id = hub.subscribe(TaskFilter(ids=frozenset({"a", "d"})))
    by_queue = hub.subscribe(TaskFilter(queue="q1", states=frozenset({S.TASK_STATE_SUCCEEDED})))
    by_type = hub.subscribe(TaskFilter(type="t2"))
    everything = hub.subscribe(TaskFilter())
    _publish(hub, _task("a", queue="q1", type="t1"), 1)
    _publish(hub, _task("b", queue="q1", type="t2", state=S.TASK_STATE_SUCCEEDED), 2)
    _publish(hub, _task("c", queue="q2", type="t2"), 3)
    _publish(hub, _task("d", queue="q2", type="t1", state=S.TASK_STATE_SUCCEEDED), 4)
    assert await _drain(by_id) == ["a", "d"]
    assert await _drain(by_queue) == ["b"]
    assert await _drain(by_type) == ["b", "c"]
    assert await _drain(everything) == ["a", "b", "c", "d"]


async def test_a_change_is_one_object_shared_by_every_watcher_it_matches() -> None:
    hub = WatchHub()
    first, second = hub.subscribe(TaskFilter(queue="q")), hub.subscribe(TaskFilter())
    _publish(hub, _task("a"), 1)
    assert await first.next() is await second.next()


def test_wants_only_changes_an_index_names() -> None:
    hub = WatchHub()
    assert not hub.wants("a", "q", "t")
    subs = [
        hub.subscribe(TaskFilter(ids=frozenset({"a"}))),
        hub.subscribe(TaskFilter(queue="q1")),
        hub.subscribe(TaskFilter(type="t1")),
    ]
    assert hub.wants("a", "q", "t") and hub.wants("x", "q1", "t") and hub.wants("x", "q", "t1")
    assert not hub.wants("x", "q", "t")
    everything = hub.subscribe(TaskFilter(tags=frozenset({"blue"})))
    assert hub.wants("x", "q", "t")
    for sub in [*subs, everything]:
        hub.unsubscribe(sub)
    assert not hub.wants("a", "q1", "t1")
    assert len(hub) == 0


async def test_a_watcher_past_its_backlog_is_dropped_and_released_at_once() -> None:
    hub = WatchHub()
    slow_filter = CountingFilter()
    slow = hub.subscribe(slow_filter, WatchSettings(max_backlog=3))
    other = hub.subscribe(TaskFilter())
    for revision in range(1, 5):
        _publish(hub, _task(f"t{revision}"), revision)
    assert slow.dropped is not None and slow.dropped[0] == 4
    assert (slow.backlog, len(hub)) == (0, 1)
    assert await slow.next() is None
    _publish(hub, _task("t5"), 5)
    assert len(slow_filter.tested) == 4  # no longer tested
    assert other.backlog == 5


def test_a_watcher_past_its_backlog_bytes_is_dropped() -> None:
    hub = WatchHub()
    record_size = len(_task("t1").SerializeToString())
    sub = hub.subscribe(TaskFilter(), WatchSettings(max_backlog_bytes=record_size * 2))
    for revision in range(1, 4):
        _publish(hub, _task(f"t{revision}"), revision)
    assert sub.dropped == (3, record_size * 3)
    assert len(hub) == 0


async def test_closing_the_hub_ends_watchers_after_what_is_queued() -> None:
    hub = WatchHub()
    sub = hub.subscribe(TaskFilter())
    waiting = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    _publish(hub, _task("a"), 1)
    _publish(hub, _task("b"), 2)
    hub.close_all()
    first = await waiting
    assert first is not None and first.task_id == "a"
    second = await sub.next()
    assert second is not None and second.task_id == "b"
    assert await sub.next() is None
    assert len(hub) == 0


# ----------------------------------------------------------------- a real coordinator


@contextlib.asynccontextmanager
async def _serving(etcd: EmbeddedEtcd, namespace: str, *flags: str) -> AsyncIterator[_Cluster]:
    with Coordinator(etcd.endpoint, namespace, extra_args=flags) as node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            for name in (ECHO, OTHER):
                task_type = task_type_for(name, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
                await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
            yield _Cluster(node, stub)


@dataclass
class _Cluster:
    node: Coordinator
    stub: coordinator_pb2_grpc.CoordinatorServiceStub


def _spec(queue: str, text: str = "hi", type: str = ECHO) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(type=type, queue=queue, payload_json=json.dumps({"text": text}))


async def _submit(stub: coordinator_pb2_grpc.CoordinatorServiceStub, specs: list[task_pb2.TaskSpec]) -> list[str]:
    reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
    assert all(r.code == 0 for r in reply.results), reply
    return [r.task.id for r in reply.results]


async def _next_event(call: grpc.aio.UnaryStreamCall[pb.WatchTasksRequest, pb.WatchTasksResponse]) -> pb.TaskEvent:
    reply: pb.WatchTasksResponse = await asyncio.wait_for(call.read(), 10)  # type: ignore[assignment]
    return reply.event


async def test_watchers_by_id_queue_and_type_receive_only_their_matches(etcd, namespace) -> None:
    async with _serving(etcd, namespace) as cluster:
        stub = cluster.stub
        [marker] = await _submit(stub, [_spec("marked")])
        [watched] = await _submit(stub, [_spec("other")])
        calls = {
            "id": stub.WatchTasks(pb.WatchTasksRequest(ids=[watched])),
            "queue": stub.WatchTasks(pb.WatchTasksRequest(queue="marked")),
            "type": stub.WatchTasks(pb.WatchTasksRequest(type=OTHER, states=[S.TASK_STATE_QUEUED])),
        }
        # The id and queue watchers have their current state; the type watcher has none, so it is
        # registered once a marker of its type arrives.
        assert (await _next_event(calls["id"])).task.id == watched
        assert (await _next_event(calls["queue"])).task.id == marker
        [typed] = await _submit(stub, [_spec("third", type=OTHER)])
        assert (await _next_event(calls["type"])).task.id == typed
        ids = await _submit(stub, [_spec("marked"), _spec("other"), _spec("third", type=OTHER)])
        for task_id in [watched, *ids]:
            await stub.CancelTask(pb.CancelTaskRequest(id=task_id))
        # Every watcher ends with its last expected event; anything unexpected before it fails.
        expected = {"id": [watched], "queue": [ids[0], ids[0]], "type": [ids[2]]}
        for name, wanted in expected.items():
            got = [(await _next_event(calls[name])).task.id for _ in wanted]
            assert got == wanted, name
            calls[name].cancel()


async def test_a_watcher_that_does_not_read_is_ended_past_its_backlog(etcd, namespace) -> None:
    async with _serving(etcd, namespace, "--watch-backlog", "50", "--max-watchers", "2") as cluster:
        stub = cluster.stub
        [marker] = await _submit(stub, [_spec("flood")])
        stalled = stub.WatchTasks(pb.WatchTasksRequest(queue="flood"))
        assert (await _next_event(stalled)).task.id == marker  # registered; from now on it is not read
        reader = stub.WatchTasks(pb.WatchTasksRequest(queue="flood", skip_initial=True))
        read: list[str] = []

        async def keep_reading() -> None:
            async for reply in reader:
                read.append(reply.event.task.id)

        reading = asyncio.create_task(keep_reading())
        # Large records fill the stream's HTTP/2 window quickly; then the coordinator's queue grows.
        text = "x" * 16_000
        submitted: list[str] = []

        async def read_all() -> bool:
            return set(read) >= set(submitted)

        # Batches of a fifth of the backlog, each read before the next is sent: the reader never falls
        # behind however slow the machine, while the stalled watcher's backlog only grows. The window
        # is a few MB here, and 16 MB leaves ample room.
        for _ in range(100):
            submitted += await _submit(stub, [_spec("flood", text) for _ in range(10)])
            await eventually(read_all, what="the reading watcher keeping up")
            if DROPPED in cluster.node.log_tail():
                break

        async def dropped() -> bool:
            return DROPPED in cluster.node.log_tail()

        await eventually(dropped, what="the coordinator dropping the stalled watcher")
        # The coordinator kept serving: the reading watcher has every change, GetTask answers.
        assert not reading.done(), "the reading watcher was ended too"
        await eventually(read_all, what="the reading watcher receiving every change")
        assert (await stub.GetTask(pb.GetTaskRequest(id=submitted[-1]))).task.id == submitted[-1]
        # Reading now yields what gRPC held for it, then the error naming the last revision sent.
        received: list[pb.TaskEvent] = []
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                received.append(await _next_event(stalled))
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = ended.value.details() or ""
        assert "--watch-backlog" in details and "after_revision" in details
        last = re.search(r"revision (\d+)", details)
        assert last is not None and received and int(last.group(1)) == received[-1].revision
        assert len(received) < len(submitted)
        # Its slot is free again (the limit is two: the reader and one more).
        again = stub.WatchTasks(pb.WatchTasksRequest(ids=[marker]))
        assert (await _next_event(again)).task.id == marker
        again.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reading


async def test_watch_streams_past_the_cap_are_refused_until_one_closes(etcd, namespace) -> None:
    async with _serving(etcd, namespace, "--max-watchers", "3") as cluster:
        stub = cluster.stub
        [marker] = await _submit(stub, [_spec("capped")])
        request = pb.WatchTasksRequest(ids=[marker])
        open_calls = [stub.WatchTasks(request) for _ in range(3)]
        for call in open_calls:
            assert (await _next_event(call)).task.id == marker
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _next_event(stub.WatchTasks(request))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-watchers" in (refused.value.details() or "") and "= 3" in (refused.value.details() or "")
        open_calls.pop().cancel()

        async def accepted() -> bool:
            call = stub.WatchTasks(request)
            try:
                await _next_event(call)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
            open_calls.append(call)
            return True

        await eventually(accepted, what="a watch accepted once one closed")
        for call in open_calls:
            call.cancel()


def test_with_only_id_watchers_other_tasks_need_no_parsing() -> None:
    hub = WatchHub()
    hub.subscribe(TaskFilter(ids=frozenset({"a"})))
    assert hub.may_want("a") and not hub.may_want("b")
    hub.subscribe(TaskFilter(queue="q"))
    assert hub.may_want("b")


async def _events(
    call: grpc.aio.UnaryStreamCall[pb.WatchTasksRequest, pb.WatchTasksResponse], count: int
) -> tuple[list[pb.TaskEvent], int]:
    """The first `count` events of a stream, whichever field carries them, and the responses read."""
    events: list[pb.TaskEvent] = []
    responses = 0
    while len(events) < count:
        reply: pb.WatchTasksResponse = await asyncio.wait_for(call.read(), 10)  # type: ignore[assignment]
        responses += 1
        assert not (reply.events and reply.HasField("event")), reply
        events.extend(reply.events or [reply.event])
    return events, responses


async def test_max_events_gathers_what_is_ready_into_one_response_in_the_same_order(etcd, namespace) -> None:
    async with _serving(etcd, namespace) as cluster:
        stub = cluster.stub
        existing = await _submit(stub, [_spec("batched", str(i)) for i in range(30)])
        single = stub.WatchTasks(pb.WatchTasksRequest(queue="batched"))
        batched = stub.WatchTasks(pb.WatchTasksRequest(queue="batched", max_events=8))
        # The snapshot: 30 initial events, at most 8 a response.
        one, one_responses = await _events(single, 30)
        many, many_responses = await _events(batched, 30)
        assert [e.task.id for e in one] == [e.task.id for e in many]
        assert sorted(e.task.id for e in many) == sorted(existing) and all(e.initial for e in many)
        assert one_responses == 30 and 4 <= many_responses < 30
        # Changes: one transaction's 40 new tasks, then their cancels, reach both streams in the same order.
        created = await _submit(stub, [_spec("batched", f"new {i}") for i in range(40)])
        await stub.CancelTasks(pb.CancelTasksRequest(filter=pb.TaskFilter(queue="batched")))
        one, _ = await _events(single, 110)
        many, responses = await _events(batched, 110)
        assert [(e.task.id, e.task.state, e.revision) for e in one] == [
            (e.task.id, e.task.state, e.revision) for e in many
        ]
        assert {e.task.id for e in many[:40]} == set(created)
        assert responses < 110
        single.cancel()
        batched.cancel()


async def test_max_events_above_1000_is_invalid_argument_naming_the_field(etcd, namespace) -> None:
    async with _serving(etcd, namespace) as cluster:
        call = cluster.stub.WatchTasks(pb.WatchTasksRequest(max_events=1001))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await asyncio.wait_for(call.read(), 10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(raised.value) == ["max_events"]
