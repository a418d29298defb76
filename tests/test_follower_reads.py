"""Followers serve reads: stored records from etcd, the leader's live state forwarded to it; writes redirect."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_spec, echo_stub
from _raw_worker import RawWorker
from _timing import eventually
from google.protobuf.message import Message

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.errors import LEADER_METADATA_KEY
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import Etcd, put
from herder.server.forwarding import FORWARDED_METADATA_KEY

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
Stub = coordinator_pb2_grpc.CoordinatorServiceStub


def _pair(etcd_endpoint: str, namespace: str, stack: ExitStack, lease_ttl: int = 3) -> tuple[Coordinator, Coordinator]:
    """A leader and a follower that knows it; both killed when `stack` closes."""
    leader = stack.enter_context(Coordinator(etcd_endpoint, namespace, lease_ttl=lease_ttl).start())
    follower = stack.enter_context(Coordinator(etcd_endpoint, namespace, lease_ttl=lease_ttl).start(wait_leader=False))
    follower.wait_has_leader()
    assert leader.is_leader() and not follower.is_leader()
    return leader, follower


@pytest.fixture(scope="module")
def pair(etcd: EmbeddedEtcd) -> Iterator[tuple[Coordinator, Coordinator]]:
    """One leader and one follower for the module's tests (each test uses its own queue and names)."""
    with ExitStack() as stack:
        yield _pair(etcd.endpoint, f"t{uuid.uuid4().hex[:12]}", stack)


@pytest.fixture
async def stubs(pair: tuple[Coordinator, Coordinator]) -> AsyncIterator[tuple[Stub, Stub]]:
    """(leader, follower) stubs, with the echo type registered through the leader."""
    leader, follower = pair
    async with echo_stub(leader.address) as to_leader, grpc.aio.insecure_channel(follower.address) as channel:
        yield to_leader, Stub(channel)


def _queue() -> str:
    return f"q{uuid.uuid4().hex[:8]}"


async def _submit(stub: Stub, queue: str, text: str = "hi") -> task_pb2.Task:
    return (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec(text, queue=queue)))).task


async def _get(stub: Stub, task_id: str) -> task_pb2.Task:
    return (await stub.GetTask(pb.GetTaskRequest(id=task_id, include_result_json=True))).task


async def _succeed(leader: Coordinator, task: task_pb2.Task, output: Message) -> None:
    """A worker on the leader runs `task` (the only one of its type queued) to success with `output`."""
    async with RawWorker(leader.address, f"w-{task.id}", [task.spec.type]) as worker:
        assigned = await worker.start_next()
        assert assigned.id == task.id
        assert (await worker.succeed(assigned.id, assigned.attempt, output)).accepted


async def _run(leader: Coordinator, stub: Stub, spec: task_pb2.TaskSpec, output: Message) -> str:
    """Submit `spec` through the leader and run it to success with `output`; the task's id."""
    task = (await stub.SubmitTask(pb.SubmitTaskRequest(spec=spec))).task
    await _succeed(leader, task, output)
    return task.id


async def test_a_follower_gets_a_finished_task_with_its_result_json(
    pair: tuple[Coordinator, Coordinator], stubs: tuple[Stub, Stub]
) -> None:
    leader, _ = pair
    to_leader, to_follower = stubs
    queue = _queue()
    task = await _submit(to_leader, queue, "hello")
    # A QUEUED task on the follower: the stored record, without the leader-only waiting reason.
    queued = await _get(to_follower, task.id)
    assert queued.state == S.TASK_STATE_QUEUED and queued.spec.queue == queue and queued.waiting_reason == ""
    await _succeed(leader, task, examples_pb2.EchoResponse(text="hello"))
    done = await _get(to_follower, task.id)
    assert done.state == S.TASK_STATE_SUCCEEDED
    assert json.loads(done.result_json) == {"text": "hello"}
    assert done == await _get(to_leader, task.id)
    # Without asking for it, no JSON.
    plain = (await to_follower.GetTask(pb.GetTaskRequest(id=task.id))).task
    assert plain.result == done.result and plain.result_json == ""


async def test_a_follower_renders_results_with_a_re_registered_type(
    pair: tuple[Coordinator, Coordinator], stubs: tuple[Stub, Stub]
) -> None:
    leader, _ = pair
    to_leader, to_follower = stubs
    name = f"t.{uuid.uuid4().hex[:8]}"
    queue = _queue()
    await to_leader.RegisterTaskType(
        pb.RegisterTaskTypeRequest(task_type=task_type_for(name, examples_pb2.EchoRequest, examples_pb2.EchoResponse))
    )
    spec = task_pb2.TaskSpec(type=name, payload_json='{"text": "x"}', queue=queue)
    first = await _run(leader, to_leader, spec, examples_pb2.EchoResponse(text="one"))
    # The follower compiles the first contract, whose descriptors know nothing of herder.v1.Resources.
    assert json.loads((await _get(to_follower, first)).result_json) == {"text": "one"}
    # Other messages altogether: an incompatible version, so forced.
    await to_leader.RegisterTaskType(
        pb.RegisterTaskTypeRequest(task_type=task_type_for(name, task_pb2.Resources, task_pb2.Resources), force=True)
    )
    spec = task_pb2.TaskSpec(type=name, payload_json='{"cpu_millis": 1}', queue=queue)
    second = await _run(leader, to_leader, spec, task_pb2.Resources(cpu_millis=250))
    rendered = (await _get(to_follower, second)).result_json
    assert json.loads(rendered) == {"cpu_millis": 250}
    assert rendered == (await _get(to_leader, second)).result_json


async def test_a_follower_answers_not_found_and_invalid_ids_as_the_leader(stubs: tuple[Stub, Stub]) -> None:
    for stub in stubs:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetTask(pb.GetTaskRequest(id="no-such-task"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.GetTask(pb.GetTaskRequest(id=""))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("states", [(), (S.TASK_STATE_QUEUED,)], ids=["scan", "unfinished-only"])
async def test_page_tokens_work_across_replicas(stubs: tuple[Stub, Stub], states: tuple[int, ...]) -> None:
    to_leader, to_follower = stubs
    queue = _queue()
    submitted = [(await _submit(to_leader, queue, str(i))).id for i in range(5)]
    seen: list[str] = []
    token = ""
    # Follower, leader, follower: each page continues where the other replica's token points.
    for stub in (to_follower, to_leader, to_follower):
        page = await stub.ListTasks(pb.ListTasksRequest(queue=queue, states=states, page_size=2, page_token=token))
        seen += [task.id for task in page.tasks]
        token = page.next_page_token
    assert seen == submitted and token == ""
    # And a follower's token on the leader.
    first = await to_follower.ListTasks(pb.ListTasksRequest(queue=queue, states=states, page_size=3))
    rest = await to_leader.ListTasks(
        pb.ListTasksRequest(queue=queue, states=states, page_size=3, page_token=first.next_page_token)
    )
    assert [t.id for t in (*first.tasks, *rest.tasks)] == submitted
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await to_follower.ListTasks(pb.ListTasksRequest(page_token="not-a-token"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_follower_lists_task_types_and_limits_as_the_leader(stubs: tuple[Stub, Stub]) -> None:
    to_leader, to_follower = stubs
    queue = _queue()
    for limit in (
        pb.Limit(scope=pb.LIMIT_SCOPE_QUEUE, name=queue, max_running=3),
        pb.Limit(scope=pb.LIMIT_SCOPE_CONCURRENCY_KEY, name=f"k-{queue}", max_running=1, weight=2),
        pb.Limit(scope=pb.LIMIT_SCOPE_GLOBAL, max_running=100),
    ):
        await to_leader.SetLimit(pb.SetLimitRequest(limit=limit))
    on_follower = await to_follower.ListLimits(pb.ListLimitsRequest())
    assert on_follower == await to_leader.ListLimits(pb.ListLimitsRequest())
    assert {(limit.name, limit.max_running) for limit in on_follower.limits} >= {(queue, 3), (f"k-{queue}", 1)}
    types = await to_follower.ListTaskTypes(pb.ListTaskTypesRequest())
    assert ECHO in [t.name for t in types.task_types]
    assert types == await to_leader.ListTaskTypes(pb.ListTaskTypesRequest())


async def test_a_follower_forwards_list_nodes_and_list_queues_to_the_leader(
    pair: tuple[Coordinator, Coordinator], stubs: tuple[Stub, Stub]
) -> None:
    leader, _ = pair
    to_leader, to_follower = stubs
    queue = _queue()
    await _submit(to_leader, queue)
    queues = (await to_follower.ListQueues(pb.ListQueuesRequest(), timeout=10)).queues
    assert [(q.name, q.queued) for q in queues if q.name == queue] == [(queue, 1)]
    worker_id = f"w-{queue}"
    async with RawWorker(leader.address, worker_id, ["no.such.type"]):

        async def listed() -> bool:
            nodes = (await to_follower.ListNodes(pb.ListNodesRequest())).nodes
            return worker_id in [node.worker_id for node in nodes]

        await eventually(listed, what="the leader's worker in the follower's ListNodes")


async def test_a_followers_cluster_status_carries_the_leaders_sessions_and_task_counts(
    pair: tuple[Coordinator, Coordinator], stubs: tuple[Stub, Stub]
) -> None:
    leader, _ = pair
    to_leader, to_follower = stubs
    queue = _queue()
    await _submit(to_leader, queue)
    async with RawWorker(leader.address, f"w-{queue}", ["no.such.type"]):

        async def same_counts() -> bool:
            mine = await to_follower.GetClusterStatus(pb.GetClusterStatusRequest())
            theirs = await to_leader.GetClusterStatus(pb.GetClusterStatusRequest())
            counts = [(s.sessions, s.tasks_queued, s.tasks_pending, s.tasks_running) for s in (mine, theirs)]
            return counts[0] == counts[1] and mine.sessions >= 1 and mine.tasks_queued >= 1

        await eventually(same_counts, what="the follower's status showing the leader's counts")


async def test_a_forwarded_call_is_not_forwarded_again(pair: tuple[Coordinator, Coordinator]) -> None:
    leader, follower = pair
    forwarded = [(FORWARDED_METADATA_KEY, "1")]
    async with grpc.aio.insecure_channel(follower.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Stub(channel).ListNodes(pb.ListNodesRequest(), metadata=forwarded, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.trailing_metadata() or ()).get(LEADER_METADATA_KEY) == leader.address
    async with grpc.aio.insecure_channel(leader.address) as channel:
        await Stub(channel).ListQueues(pb.ListQueuesRequest(), metadata=forwarded, timeout=5)


async def test_writes_and_worker_sessions_on_a_follower_redirect_to_the_leader(
    pair: tuple[Coordinator, Coordinator], stubs: tuple[Stub, Stub]
) -> None:
    leader, _ = pair
    _, to_follower = stubs
    task_type = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
    writes = [
        to_follower.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec())),
        to_follower.SubmitTasks(pb.SubmitTasksRequest(specs=[echo_spec()])),
        to_follower.CancelTask(pb.CancelTaskRequest(id="some-task")),
        to_follower.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id="some-task", priority=1)),
        to_follower.SetLimit(pb.SetLimitRequest(limit=pb.Limit(scope=pb.LIMIT_SCOPE_GLOBAL, max_running=1))),
        to_follower.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type)),
    ]
    for call in writes:
        with pytest.raises(grpc.aio.AioRpcError) as redirected:
            await call
        assert redirected.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(redirected.value.trailing_metadata() or ()).get(LEADER_METADATA_KEY) == leader.address

    # Refused on opening, before any hello: nothing is written, so no send races the status.
    session = to_follower.Connect()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await session.read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert dict(refused.value.trailing_metadata() or ()).get(LEADER_METADATA_KEY) == leader.address


async def test_forwarded_reads_fail_unavailable_while_the_leader_is_gone(etcd: EmbeddedEtcd, namespace: str) -> None:
    with ExitStack() as stack:
        # A long lease: the follower keeps naming the killed leader, whose key outlives it.
        leader, follower = _pair(etcd.endpoint, namespace, stack, lease_ttl=30)
        async with echo_stub(leader.address) as to_leader, grpc.aio.insecure_channel(follower.address) as channel:
            task = (await to_leader.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec()))).task
            leader.kill()
            to_follower = Stub(channel)
            for call in (to_follower.ListNodes(pb.ListNodesRequest()), to_follower.ListQueues(pb.ListQueuesRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert leader.address in (failed.value.details() or "")
            # Stored records need no leader.
            assert (await _get(to_follower, task.id)).id == task.id


async def test_with_no_known_leader_forwarded_reads_and_writes_are_unavailable(
    etcd: EmbeddedEtcd, namespace: str, kv: Etcd
) -> None:
    # The test holds the leader key, naming no address: the replica can neither lead nor name a leader.
    lease = await kv.grant(30)
    held = json.dumps({"id": "elsewhere", "address": ""}).encode()
    await kv.txn([], [put(keys.leader(keys.prefix(namespace)), held, lease)])
    try:
        follower = Coordinator(etcd.endpoint, namespace)
        with await asyncio.to_thread(follower.start, wait_leader=False):
            async with grpc.aio.insecure_channel(follower.address) as channel:
                stub = Stub(channel)
                for call in (
                    stub.ListNodes(pb.ListNodesRequest()),
                    stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec())),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call
                    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert LEADER_METADATA_KEY not in dict(failed.value.trailing_metadata() or ())
                # Stored reads need no leader.
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.GetTask(pb.GetTaskRequest(id="no-such-task"))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await kv.revoke(lease)


async def test_a_follower_that_cannot_reach_etcd_answers_unavailable(tmp_path: Path, namespace: str) -> None:
    store = EmbeddedEtcd(data_dir=tmp_path, fsync=False).start()
    try:
        with ExitStack() as stack:
            _, follower = _pair(store.endpoint, namespace, stack)
            store.stop()
            async with grpc.aio.insecure_channel(follower.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await Stub(channel).GetTask(pb.GetTaskRequest(id="some-task"), timeout=15)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot read etcd" in (failed.value.details() or "")
    finally:
        store.stop()
