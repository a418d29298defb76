"""WatchTasks on every replica, resumable by revision: followers serve it from etcd, a stream resumed on
another replica gets exactly the changes it missed, a compacted resume point gets a flagged snapshot,
a follower's stream misses and repeats nothing across a leader change, and the feed runs only while watched.

Each stream is checked against etcd's own history of the tasks prefix, read with a separate watch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_spec, echo_stub
from _timing import eventually

from herder.clients import Client, TaskContext, Worker, errors
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd, prefix_end, put
from herder.server.entries import TERMINAL
from herder.server.feed import Feed, FeedSettings
from herder.server.watchers import TaskFilter, WatchSettings

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
Event = tuple[str, int, int]  # (task id, revision, state)


@pytest.fixture
def pair(etcd: EmbeddedEtcd, namespace: str) -> Iterator[list[Coordinator]]:
    """A leader and a follower of the test's namespace."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(Coordinator(etcd.endpoint, namespace, lease_ttl=2).start(wait_leader=i == 0))
            for i in range(2)
        ]


async def _history(kv: Etcd, namespace: str, after: int, queue: str) -> list[Event]:
    """Every put of a task of `queue` after revision `after`, from etcd, up to its current revision."""
    prefix = keys.tasks_prefix(keys.prefix(namespace))
    found: list[Event] = []
    batches = kv.watch_batches(prefix, prefix_end(prefix), start_revision=after + 1, progress_every=0.1)
    async with contextlib.aclosing(batches) as history:
        async for batch in history:
            for event in batch.events:
                task = task_pb2.Task.FromString(event.kv.value)
                if not event.deleted and task.spec.queue == queue:
                    found.append((task.id, event.kv.mod_revision, task.state))
            if batch.progress:
                return found
    raise AssertionError("the history watch ended")


def _event(event: task_pb2.TaskEvent) -> Event:
    return (event.task.id, event.revision, event.task.state)


async def _read(call: AsyncIterator[pb.WatchTasksResponse], into: list[pb.WatchTasksResponse]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        async for response in call:
            into.append(response)


async def _submit(stub: coordinator_pb2_grpc.CoordinatorServiceStub, queue: str, count: int = 1) -> list[str]:
    reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=[echo_spec(queue=queue) for _ in range(count)]))
    return [r.task.id for r in reply.results]


async def test_a_follower_streams_changes_and_a_resume_on_another_replica_sends_exactly_the_missed_ones(
    pair: list[Coordinator], kv: Etcd
) -> None:
    leader, follower = pair
    async with (
        echo_stub(leader.address) as stub,
        grpc.aio.insecure_channel(follower.address) as channel,
    ):
        [first] = await _submit(stub, "resume")
        call = coordinator_pb2_grpc.CoordinatorServiceStub(channel).WatchTasks(pb.WatchTasksRequest(queue="resume"))
        got: list[pb.WatchTasksResponse] = []
        reading = asyncio.create_task(_read(call, got))
        await eventually(lambda: _async(len(got) == 1), what="the follower's snapshot")
        assert got[0].event.initial and got[0].event.task.id == first
        [second] = await _submit(stub, "resume")
        await stub.CancelTask(pb.CancelTaskRequest(id=first))
        await eventually(lambda: _async(len(got) == 3), what="the follower streaming two changes")
        assert [(r.event.task.id, r.event.task.state) for r in got[1:]] == [
            (second, S.TASK_STATE_QUEUED),
            (first, S.TASK_STATE_CANCELED),
        ]
        assert got[2].event.previous_state == S.TASK_STATE_QUEUED
        seen = got[-1].event.revision
        call.cancel()
        await reading
        # Missed while disconnected: one new task, one cancellation.
        await _submit(stub, "resume", 2)
        await stub.CancelTask(pb.CancelTaskRequest(id=second))
        missed = await _history(kv, leader.namespace, seen, "resume")
        assert len(missed) == 3
    # Resumed on the other replica (the leader, through the SDK): exactly the missed ones, in order.
    async with Client(leader.address) as client:
        resumed: list[Event] = []
        async with contextlib.aclosing(client.watch(queue="resume", after_revision=seen)) as events:
            async for event in events:
                assert not event.initial
                resumed.append(_event(event))
                if len(resumed) == len(missed):
                    break
        assert resumed == missed


def _async(value: bool) -> asyncio.Future[bool]:
    """`value` as an awaitable, for `eventually` on a condition that needs no call."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def test_a_compacted_resume_point_gets_the_flag_then_a_fresh_snapshot(coordinator: Coordinator, kv: Etcd) -> None:
    async with echo_stub(coordinator.address) as stub:
        [old] = await _submit(stub, "compacted")
        [new] = await _submit(stub, "compacted")
        await stub.CancelTask(pb.CancelTaskRequest(id=old))
        _, _, current = await kv.range(b"\0", b"\0", limit=1, keys_only=True)
        await kv.compact(current)
        first = await _history_revision(kv, coordinator.namespace, old)
        call = stub.WatchTasks(pb.WatchTasksRequest(queue="compacted", after_revision=first))
        flag = await asyncio.wait_for(call.read(), 10)
        assert isinstance(flag, pb.WatchTasksResponse)
        assert not flag.HasField("event") and flag.compacted_revision == current
        snapshot = await asyncio.wait_for(call.read(), 10)
        assert isinstance(snapshot, pb.WatchTasksResponse)
        # Only the unfinished task is in the snapshot, at its current revision.
        assert snapshot.event.initial and snapshot.event.task.id == new
        await stub.CancelTask(pb.CancelTaskRequest(id=new))
        after = await asyncio.wait_for(call.read(), 10)
        assert isinstance(after, pb.WatchTasksResponse)
        assert (after.event.task.id, after.event.task.state, after.event.initial) == (new, S.TASK_STATE_CANCELED, False)
        call.cancel()


async def _history_revision(kv: Etcd, namespace: str, task_id: str) -> int:
    """The revision the task was created at."""
    found, _ = await kv.get(keys.task(keys.prefix(namespace), task_id))
    assert found is not None
    return found.create_revision


async def test_an_after_revision_below_zero_or_ahead_of_etcd_is_invalid(coordinator: Coordinator, kv: Etcd) -> None:
    _, _, current = await kv.range(b"\0", b"\0", limit=1, keys_only=True)
    async with Client(coordinator.address) as client:
        for bad in (-1, current + 1000):
            with pytest.raises(errors.InvalidArgumentError) as refused:
                async with contextlib.aclosing(client.watch(after_revision=bad)) as events:
                    async for _ in events:
                        pass
            assert [v.field for v in refused.value.violations] == ["after_revision"], bad


async def test_a_followers_stream_misses_and_repeats_no_event_across_a_leader_change(
    etcd: EmbeddedEtcd, namespace: str, kv: Etcd
) -> None:
    async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        await asyncio.sleep(0.05)
        return examples_pb2.EchoResponse(text=request.text)

    with ExitStack() as stack:
        nodes = [
            stack.enter_context(Coordinator(etcd.endpoint, namespace, lease_ttl=2).start(wait_leader=i == 0))
            for i in range(3)
        ]
        old, follower, other = nodes
        async with (
            echo_stub(old.address) as stub,
            grpc.aio.insecure_channel(follower.address) as channel,
            grpc.aio.insecure_channel(other.address) as other_channel,
            grpc.aio.insecure_channel(old.address) as old_channel,
        ):
            channels = [old_channel, channel, other_channel]
            [marker] = await _submit(stub, "flow")
            call = coordinator_pb2_grpc.CoordinatorServiceStub(channel).WatchTasks(
                pb.WatchTasksRequest(queue="flow", include_result_json=True)
            )
            got: list[pb.WatchTasksResponse] = []
            reading = asyncio.create_task(_read(call, got))
            # The snapshot (the marker) says the stream is subscribed: every later change must follow.
            await eventually(lambda: _async(len(got) == 1), what="the follower's snapshot")
            assert got[0].event.initial and got[0].event.task.id == marker
            worker = Worker([n.address for n in nodes], slots=8)
            worker.add_task(ECHO, echo)
            submitted: list[str] = [marker]

            stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(c) for c in channels]

            async def submit_steadily() -> None:
                # To whichever replica takes it: a follower refuses, the killed leader does not answer.
                turn = 0
                while len(submitted) < 60:
                    turn += 1
                    request = pb.SubmitTaskRequest(spec=echo_spec(queue="flow"))
                    try:
                        reply = await stubs[turn % len(stubs)].SubmitTask(request, timeout=5)
                    except grpc.aio.AioRpcError:
                        await asyncio.sleep(0.05)
                        continue
                    submitted.append(reply.task.id)
                    await asyncio.sleep(0.02)

            def finished() -> set[str]:
                return {r.event.task.id for r in got if r.event.task.state in TERMINAL}

            async with worker:
                submitting = asyncio.create_task(submit_steadily())
                await eventually(lambda: _async(len(submitted) >= 20), what="tasks flowing")
                old.kill()
                await submitting
                await eventually(
                    lambda: _async(finished().issuperset(submitted)), timeout=40, what="every task seen finishing"
                )
            call.cancel()
            await reading
    stream = [_event(r.event) for r in got[1:]]
    history = await _history(kv, namespace, got[0].event.revision, "flow")
    by_task: dict[str, list[int]] = {}
    for task_id, revision, _ in stream:
        by_task.setdefault(task_id, []).append(revision)
    assert all(revisions == sorted(set(revisions)) for revisions in by_task.values()), "an event repeated"
    # A follower renders results with the task types it read from etcd.
    assert {r.event.task.result_json for r in got if r.event.task.state == S.TASK_STATE_SUCCEEDED} == {'{"text":"hi"}'}
    # Nothing missed, nothing repeated: the stream is etcd's history of the queue, event for event.
    assert len(stream) == len(history) and stream == history


async def test_the_feed_runs_only_while_watched_and_restarts_where_etcd_is(kv: Etcd, namespace: str) -> None:
    ns = keys.prefix(namespace)
    feed = Feed(kv, ns, FeedSettings(linger=0.1))
    try:
        sub, start = await feed.subscribe(TaskFilter(), WatchSettings())
        task = task_pb2.Task(id="a", state=S.TASK_STATE_QUEUED)
        reply = await kv.txn([], [put(keys.task(ns, "a"), task.SerializeToString())])
        item = await asyncio.wait_for(sub.next(), 10)
        assert item is not None and item.change.revision == reply.header.revision > start
        assert item.change.previous_state == S.TASK_STATE_UNSPECIFIED
        feed.unsubscribe(sub)
        await eventually(lambda: _async(feed._task is None), what="the feed stopping once unwatched")
        task.state = S.TASK_STATE_CANCELED
        missed = await kv.txn([], [put(keys.task(ns, "a"), task.SerializeToString())])
        sub, again = await feed.subscribe(TaskFilter(), WatchSettings())
        # Restarted at etcd's current revision: what changed while nobody watched is not replayed.
        assert again >= missed.header.revision
        task.state = S.TASK_STATE_QUEUED
        reply = await kv.txn([], [put(keys.task(ns, "a"), task.SerializeToString())])
        item = await asyncio.wait_for(sub.next(), 10)
        assert item is not None and item.change.revision == reply.header.revision
        assert item.change.previous_state == S.TASK_STATE_CANCELED
    finally:
        await feed.close()
    assert await sub.next() is None and "shutting down" in feed.ended_reason
