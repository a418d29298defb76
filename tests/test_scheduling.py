"""The scheduler end to end (issue 4) against a real etcd, real coordinator processes and raw protocol
workers: priorities and their updates, fair sharing between concurrency keys, limits, delays, ttl,
per-attempt timeouts, retries with backoff, idempotency keys, retention and queue visibility, each
also across a coordinator restart where the issue asks for it.

Dispatch order is read from a 1-slot RawWorker: it gets the next task only once it finished the last.
Timings are measured on conditions with deadlines and checked within `_timing.SLACK`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker, ref
from _timing import SLACK, assert_between, duration, eventually, now, quiet, seconds, until
from google.protobuf import any_pb2

from herder.clients import Client, Retry, errors
from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server._etcd import Etcd

pytestmark = pytest.mark.timeout(60)


S = task_pb2.TaskState
GLOBAL = pb.LimitScope.LIMIT_SCOPE_GLOBAL
QUEUE = pb.LimitScope.LIMIT_SCOPE_QUEUE
KEY = pb.LimitScope.LIMIT_SCOPE_CONCURRENCY_KEY
ECHO = "examples.echo"
SLEEP = "examples.sleep"


# ---------------------------------------------------------------------------- fixtures and helpers


@dataclass
class Api:
    """A raw stub (exact status codes, SetLimit) and the SDK client (building specs) of one coordinator."""

    stub: coordinator_pb2_grpc.CoordinatorServiceStub
    client: Client


@contextlib.asynccontextmanager
async def connect(node: Coordinator) -> AsyncIterator[Api]:
    """Fresh channels to this coordinator, with examples.echo and examples.sleep registered.
    Open a new one after a restart."""
    async with grpc.aio.insecure_channel(node.address) as channel, Client(node.address) as client:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        for task_type in (
            task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse),
            task_type_for(SLEEP, examples_pb2.SleepRequest, examples_pb2.SleepResponse),
        ):
            await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
        yield Api(stub, client)


@pytest.fixture
async def api(coordinator: Coordinator) -> AsyncIterator[Api]:
    async with connect(coordinator) as value:
        yield value


async def submit(api: Api, text: str = "x", **options: Any) -> task_pb2.Task:
    """Submit one echo task through the SDK (options as `Client.submit` takes them)."""
    return (await api.client.submit(ECHO, json={"text": text}, **options)).task


async def submit_batch(api: Api, count: int, task_type: str = ECHO, **fields: Any) -> list[str]:
    """Submit `count` tasks of this type (echo or sleep) with these TaskSpec fields, 1000 per SubmitTasks
    call; their ids in order."""
    ids: list[str] = []
    payload = {ECHO: json.dumps({"text": "x"}), SLEEP: json.dumps({"steps": 1})}[task_type]
    for start in range(0, count, 1000):
        specs = [
            task_pb2.TaskSpec(type=task_type, payload_json=payload, **fields)
            for _ in range(start, min(count, start + 1000))
        ]
        reply = await api.stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
        assert all(r.code == 0 for r in reply.results), [r.message for r in reply.results if r.code]
        ids.extend(r.task.id for r in reply.results)
    return ids


async def get(api: Api, task_id: str) -> task_pb2.Task:
    return (await api.stub.GetTask(pb.GetTaskRequest(id=task_id))).task


async def state(api: Api, task_id: str) -> int:
    return (await get(api, task_id)).state


def named(value: int) -> str:
    return S.Name(value)


async def set_limit(
    api: Api,
    scope: int,
    name: str = "",
    *,
    max_running: int = 0,
    weight: int = 0,
    retention: float | None = None,
) -> pb.Limit:
    limit = pb.Limit(scope=scope, name=name, max_running=max_running, weight=weight)
    if retention is not None:
        limit.retention.CopyFrom(duration(retention))
    return (await api.stub.SetLimit(pb.SetLimitRequest(limit=limit))).limit


async def queue_stats(api: Api, name: str) -> pb.QueueStats | None:
    reply = await api.stub.ListQueues(pb.ListQueuesRequest())
    return next((q for q in reply.queues if q.name == name), None)


async def running_in(api: Api, queue: str) -> int:
    """ASSIGNED + RUNNING tasks of a queue, as the coordinator stores them."""
    reply = await api.stub.ListTasks(
        pb.ListTasksRequest(queue=queue, states=[S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING], page_size=1000)
    )
    return len(reply.tasks)


def output_for(task: task_pb2.Task) -> any_pb2.Any:
    """A valid output for an echo or sleep task."""
    value = any_pb2.Any()
    value.Pack(examples_pb2.SleepResponse() if task.spec.type == SLEEP else examples_pb2.EchoResponse(text="done"))
    return value


async def complete(worker: RawWorker, task: task_pb2.Task) -> None:
    """Acknowledge and succeed one assignment; the coordinator must accept the result."""
    await worker.ack(task)
    ack = await worker.succeed(task.id, task.attempt, examples_pb2.EchoResponse(text="done"))
    assert ack.accepted, f"result of {task.id}/{task.attempt} rejected: {ack.reason}"


async def dispatch_order(worker: RawWorker, count: int) -> list[task_pb2.Task]:
    """The next `count` assignments of a 1-slot worker, each completed before the next can come."""
    order = []
    for _ in range(count):
        task = await worker.next_assignment()
        order.append(task)
        await complete(worker, task)
    return order


async def fail_attempt(
    worker: RawWorker,
    task: task_pb2.Task,
    error_type: str = "Boom",
    *,
    retryable: bool = True,
    retry_after: float | None = None,
) -> float:
    """Report the attempt failed and wait for the coordinator to accept it; the wall time just before sending."""
    result = pb.AttemptResult(
        ref=ref(task.id, task.attempt),
        error=task_pb2.TaskError(type=error_type, message="failed on purpose", retryable=retryable),
    )
    if retry_after is not None:
        result.retry_after.CopyFrom(duration(retry_after))
    sent = now()
    await worker.send_result(result)
    ack = await asyncio.wait_for(worker.result_acks.get(), 10)
    assert ack.accepted, f"failure of {task.id}/{task.attempt} rejected: {ack.reason}"
    return sent


async def fail_all(worker: RawWorker, tasks: list[task_pb2.Task]) -> float:
    """Fail every attempt in one AttemptResults message; the wall time just before sending."""
    results = [
        pb.AttemptResult(
            ref=ref(t.id, t.attempt), error=task_pb2.TaskError(type="Boom", message="failed", retryable=True)
        )
        for t in tasks
    ]
    sent = now()
    await worker.send(results=pb.AttemptResults(results=results))
    for _ in tasks:
        ack = await asyncio.wait_for(worker.result_acks.get(), 10)
        assert ack.accepted, ack.reason
    return sent


async def stored_keys_mentioning(kv: Etcd, namespace: str, needles: Iterable[str]) -> list[bytes]:
    """Keys under /herder/<namespace>/ that name any of these task ids or idempotency keys."""
    wanted = [n.encode() for n in needles]
    return [
        item.key
        async for item in kv.scan_prefix(f"/herder/{namespace}/".encode())
        if any(w in item.key for w in wanted)
    ]


class Fleet:
    """Raw workers that acknowledge every assignment at once and hold it until the test finishes it.

    Counts tasks held at once, in all, per queue and per concurrency key, and keeps the peaks. A task
    is counted from its arrival until just before its result is sent, so the counts never exceed what
    the coordinator counts as running: a peak above a limit is an over-dispatch.
    """

    def __init__(self, address: str, *, workers: int, slots: int, task_types: Sequence[str] = (ECHO,)) -> None:
        # Worker i serves task_types[i % len(task_types)].
        self.workers = [
            RawWorker(address, f"fleet-{i}", [task_types[i % len(task_types)]], slots=slots) for i in range(workers)
        ]
        self.held: dict[str, tuple[RawWorker, task_pb2.Task]] = {}
        self.arrivals: asyncio.Queue[task_pb2.Task] = asyncio.Queue()
        self.peak = 0
        self.peak_by_queue: Counter[str] = Counter()
        self.peak_by_key: Counter[str] = Counter()
        self.duplicates: list[str] = []
        self._stack = contextlib.AsyncExitStack()
        self._pumps: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Fleet:
        async with contextlib.AsyncExitStack() as stack:
            for worker in self.workers:
                await stack.enter_async_context(worker)
            self._stack = stack.pop_all()
        self._pumps = [asyncio.create_task(self._pump(w)) for w in self.workers]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        await self._stack.aclose()

    async def _pump(self, worker: RawWorker) -> None:
        while True:
            task = await worker.assignments.get()
            if task.id in self.held:
                self.duplicates.append(task.id)
            self.held[task.id] = (worker, task)
            tasks = [t for _, t in self.held.values()]
            self.peak = max(self.peak, len(tasks))
            for name, count in Counter(t.spec.queue for t in tasks).items():
                self.peak_by_queue[name] = max(self.peak_by_queue[name], count)
            for name, count in Counter(t.spec.concurrency_key for t in tasks).items():
                self.peak_by_key[name] = max(self.peak_by_key[name], count)
            await worker.ack(task)
            await self.arrivals.put(task)

    async def take(self, count: int, timeout: float = 10.0) -> list[task_pb2.Task]:
        """The next `count` assignments to arrive, waiting at most `timeout` for each."""
        return [await asyncio.wait_for(self.arrivals.get(), timeout) for _ in range(count)]

    async def no_more(self, seconds: float = 0.4, what: str = "assignment over a limit") -> None:
        await quiet(self.arrivals, seconds, what=what)

    async def finish(self, task_ids: Iterable[str]) -> None:
        """Succeed these held tasks and wait until the coordinator accepted every result. They are
        uncounted before the results leave, so peaks stay sound."""
        sent: Counter[int] = Counter()
        for task_id in list(task_ids):
            worker, task = self.held.pop(task_id)
            await worker.send_result(pb.AttemptResult(ref=ref(task.id, task.attempt), output=output_for(task)))
            sent[id(worker)] += 1
        for worker in self.workers:
            for _ in range(sent[id(worker)]):
                ack = await asyncio.wait_for(worker.result_acks.get(), 10)
                assert ack.accepted, f"result of {ack.ref.task_id}/{ack.ref.attempt} rejected: {ack.reason}"

    async def finish_all(self) -> None:
        await self.finish(list(self.held))

    async def run(self, total: int) -> None:
        """Finish tasks as fast as they arrive until `total` more have arrived."""
        arrived = 0
        while arrived < total:
            arrived += len(await self.take(1))
            while not self.arrivals.empty():
                self.arrivals.get_nowait()
                arrived += 1
            await self.finish_all()


async def all_succeeded(api: Api, ids: Iterable[str]) -> None:
    ids = list(ids)

    async def check() -> bool:
        return all(await asyncio.gather(*(_is(api, i, S.TASK_STATE_SUCCEEDED) for i in ids)))

    await eventually(check, what=f"all {len(ids)} tasks SUCCEEDED")


async def _is(api: Api, task_id: str, wanted: int) -> bool:
    return await state(api, task_id) == wanted


# ---------------------------------------------------------------------------- priorities


async def test_priority_update_reorders_the_next_dispatch(api, coordinator) -> None:
    a, b, c = [await submit(api, n) for n in "abc"]
    raised = (await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=c.id, priority=10))).task
    lowered = (await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=a.id, priority=-5))).task
    assert (raised.spec.priority, raised.state) == (10, S.TASK_STATE_QUEUED)
    assert (lowered.spec.priority, lowered.state) == (-5, S.TASK_STATE_QUEUED)
    assert (await get(api, c.id)).spec.priority == 10
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [c.id, b.id, a.id], "dispatch order after raising c to 10 and lowering a to -5"


async def test_priority_update_of_a_pending_task_applies_when_it_becomes_queued(api, coordinator) -> None:
    delayed = await submit(api, "delayed", delay=1.0)
    updated = await api.client.update_priority(delayed.id, 5)
    assert (updated.state, updated.spec.priority) == (S.TASK_STATE_PENDING, 5)
    others = [await submit(api, str(n), priority=1) for n in range(2)]
    await eventually(lambda: _is(api, delayed.id, S.TASK_STATE_QUEUED), what="the delayed task QUEUED")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [delayed.id, *(t.id for t in others)]


async def test_priority_updates_survive_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        a, b, c = [await submit(api, n) for n in "abc"]
        await api.client.update_priority(c.id, 7)
        await api.client.update_priority(a.id, -1)
    coordinator.restart()
    async with connect(coordinator) as api:
        assert [(await get(api, t.id)).spec.priority for t in (a, b, c)] == [-1, 0, 7]
        async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
            order = [t.id for t in await dispatch_order(worker, 3)]
    assert order == [c.id, b.id, a.id]


async def test_priority_of_an_assigned_running_or_finished_task_cannot_change(api, coordinator) -> None:
    task = await submit(api)

    async def refused() -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.UpdateTaskPriority(pb.UpdateTaskPriorityRequest(id=task.id, priority=3))
        return caught.value.code()

    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        assigned = await worker.next_assignment()
        assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "ASSIGNED"
        await worker.ack(assigned)
        await eventually(lambda: _is(api, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
        assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "RUNNING"
        assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse())).accepted
    assert await refused() == grpc.StatusCode.FAILED_PRECONDITION, "SUCCEEDED"
    assert (await get(api, task.id)).spec.priority == 0
    with pytest.raises(errors.NotFoundError):
        await api.client.update_priority("no-such-task", 1)


async def test_an_out_of_range_priority_update_is_rejected_and_changes_nothing(api) -> None:
    task = await submit(api, priority=2)
    with pytest.raises(errors.InvalidArgumentError) as caught:
        await api.client.update_priority(task.id, 2**31 - 1)
    assert [v.field for v in caught.value.violations] == ["priority"]
    assert (await get(api, task.id)).spec.priority == 2


# ---------------------------------------------------------------------------- fairness


@pytest.mark.timeout(120)
@pytest.mark.parametrize("weight", [1, 3])
async def test_a_key_with_10000_queued_delays_a_newcomer_by_at_most_its_weight(api, coordinator, weight) -> None:
    if weight != 1:
        await set_limit(api, KEY, "big", weight=weight)
    await submit_batch(api, 10_000, concurrency_key="big")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        await dispatch_order(worker, 2)  # "big" is mid-stream
        running = await worker.next_assignment()
        newcomer = await submit(api, "small", concurrency_key="small")
        await complete(worker, running)
        big_after = 0
        while True:
            task = await worker.next_assignment()
            await complete(worker, task)
            if task.id == newcomer.id:
                break
            assert task.spec.concurrency_key == "big"
            big_after += 1
            assert big_after <= weight, f"{big_after} tasks of 'big' (weight {weight}) dispatched before 'small'"
    stats = await queue_stats(api, "default")
    assert stats is not None
    # Three "big" tasks went before the newcomer arrived; the worker may hold the next one already.
    assert stats.queued + stats.assigned + stats.running == 10_000 - 3 - big_after


async def test_keys_share_a_priority_level_by_their_weights(api, coordinator) -> None:
    await set_limit(api, KEY, "heavy", weight=3)
    await submit_batch(api, 12, concurrency_key="heavy")
    await submit_batch(api, 4, concurrency_key="light")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        keys = [t.spec.concurrency_key for t in await dispatch_order(worker, 16)]
    rounds = [Counter(keys[i : i + 4]) for i in range(0, 16, 4)]
    assert all(r == Counter(heavy=3, light=1) for r in rounds), f"dispatch by key: {keys}"


async def test_fairness_applies_within_a_priority_level_only(api, coordinator) -> None:
    busy = await submit_batch(api, 5, concurrency_key="busy", priority=2)
    other = await submit(api, "other", concurrency_key="other", priority=1)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        order = [t.id for t in await dispatch_order(worker, 6)]
    assert order == [*busy, other.id]


# ---------------------------------------------------------------------------- limits


async def test_queue_limit_holds_with_many_workers_and_slots(api, coordinator) -> None:
    await set_limit(api, QUEUE, "limited", max_running=3)
    ids = await submit_batch(api, 12, queue="limited")
    free = await submit(api, "free", queue="unlimited")
    async with Fleet(coordinator.address, workers=4, slots=4) as fleet:
        first = await fleet.take(4)
        assert Counter(t.spec.queue for t in first) == Counter(limited=3, unlimited=1)
        await fleet.no_more()
        held = next(i for i in ids if i not in fleet.held)
        waiting = await get(api, held)
        assert waiting.state == S.TASK_STATE_QUEUED
        assert "limited" in waiting.waiting_reason, f"waiting_reason: {waiting.waiting_reason!r}"
        assert await running_in(api, "limited") == 3
        await fleet.finish([free.id])
        for remaining in (9, 6, 3):
            await fleet.finish_all()  # the workers free 3 slots at once; 13 slots stay free
            await fleet.take(3)
            await fleet.no_more()
            assert await running_in(api, "limited") == 3, f"{remaining} left to dispatch"
        await fleet.finish_all()
    await all_succeeded(api, ids)
    assert fleet.peak_by_queue["limited"] == 3
    assert not fleet.duplicates


async def test_concurrency_key_limit_holds_across_queues(api, coordinator) -> None:
    await set_limit(api, KEY, "tenant", max_running=2)
    tenant = await submit_batch(api, 3, queue="q1", concurrency_key="tenant")
    tenant += await submit_batch(api, 3, queue="q2", concurrency_key="tenant")
    others = await submit_batch(api, 2, queue="q1", concurrency_key="other")
    async with Fleet(coordinator.address, workers=2, slots=5) as fleet:
        first = await fleet.take(4)
        assert Counter(t.spec.concurrency_key for t in first) == Counter(tenant=2, other=2)
        await fleet.no_more()
        held = next(i for i in tenant if i not in fleet.held)
        waiting = await get(api, held)
        assert waiting.state == S.TASK_STATE_QUEUED
        assert "tenant" in waiting.waiting_reason, f"waiting_reason: {waiting.waiting_reason!r}"
        for _ in range(2):
            await fleet.finish_all()
            await fleet.take(2)
            await fleet.no_more()
        await fleet.finish_all()
    await all_succeeded(api, tenant + others)
    assert fleet.peak_by_key["tenant"] == 2
    assert not fleet.duplicates


async def test_global_limit_holds_across_queues_and_workers(api, coordinator) -> None:
    await set_limit(api, GLOBAL, max_running=2)
    ids = [i for q in ("a", "b", "c") for i in await submit_batch(api, 2, queue=q)]
    async with Fleet(coordinator.address, workers=3, slots=2) as fleet:
        await fleet.take(2)
        await fleet.no_more()
        waiting = await get(api, next(i for i in ids if i not in fleet.held))
        assert "global" in waiting.waiting_reason.lower(), f"waiting_reason: {waiting.waiting_reason!r}"
        for _ in range(2):
            await fleet.finish_all()
            await fleet.take(2)
            await fleet.no_more()
        await fleet.finish_all()
    await all_succeeded(api, ids)
    assert fleet.peak == 2
    assert not fleet.duplicates


async def test_a_limit_changed_at_run_time_applies_to_the_next_dispatch(api, coordinator) -> None:
    await set_limit(api, QUEUE, "elastic", max_running=1)
    ids = await submit_batch(api, 6, queue="elastic")
    async with Fleet(coordinator.address, workers=1, slots=8) as fleet:
        await fleet.take(1)
        await fleet.no_more()
        await set_limit(api, QUEUE, "elastic", max_running=3)  # raised: two more, nothing finished
        await fleet.take(2)
        await fleet.no_more()
        await set_limit(api, QUEUE, "elastic", max_running=0)  # removed: the rest
        await fleet.take(3)
        await set_limit(api, QUEUE, "elastic", max_running=2)  # lowered below the 6 running
        ids += await submit_batch(api, 2, queue="elastic")
        await fleet.no_more()
        await fleet.finish(list(fleet.held)[:4])  # 2 running: still at the limit
        await fleet.no_more()
        await fleet.finish(list(fleet.held)[:1])
        await fleet.take(1)
        await fleet.no_more()
        await fleet.finish_all()
        await fleet.take(1)
        await fleet.finish_all()
    await all_succeeded(api, ids)
    assert fleet.peak_by_queue["elastic"] == 6


async def test_limits_and_weights_survive_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        await set_limit(api, QUEUE, "kept", max_running=1)
        await set_limit(api, KEY, "tenant", max_running=4, weight=2)
        await set_limit(api, GLOBAL, max_running=9)
        before = await limits_by_scope(api)
    assert {k: v[0] for k, v in before.items()} == {(QUEUE, "kept"): 1, (KEY, "tenant"): 4, (GLOBAL, ""): 9}
    assert before[(KEY, "tenant")][1] == 2, "the key's weight"
    coordinator.restart()
    async with connect(coordinator) as api:
        assert await limits_by_scope(api) == before
        ids = await submit_batch(api, 3, queue="kept")
        async with Fleet(coordinator.address, workers=1, slots=3) as fleet:
            await fleet.take(1)
            await fleet.no_more()
            waiting = await get(api, next(i for i in ids if i not in fleet.held))
            assert "kept" in waiting.waiting_reason
            await fleet.finish_all()
            await fleet.take(1)
            await fleet.no_more()
            await fleet.finish_all()
            await fleet.take(1)
            await fleet.finish_all()
        await all_succeeded(api, ids)


@pytest.mark.parametrize("scope", [QUEUE, KEY, GLOBAL], ids=["queue", "key", "global"])
async def test_submissions_racing_free_slots_never_exceed_a_limit(api, coordinator, scope) -> None:
    fields = {"queue": "race"} if scope == QUEUE else {"concurrency_key": "race"} if scope == KEY else {}
    await set_limit(api, scope, "" if scope == GLOBAL else "race", max_running=2)
    async with Fleet(coordinator.address, workers=4, slots=4) as fleet:
        # 16 free slots while tasks arrive one by one, in parallel, and in a batch.
        singles = await asyncio.gather(*(submit(api, str(n), **fields) for n in range(10)))
        ids = [t.id for t in singles] + await submit_batch(api, 10, **fields)
        await fleet.run(len(ids))
    await all_succeeded(api, ids)
    busiest = {QUEUE: fleet.peak_by_queue["race"], KEY: fleet.peak_by_key["race"], GLOBAL: fleet.peak}[scope]
    assert busiest == 2, f"peak running under a limit of 2: {busiest}"
    assert not fleet.duplicates


async def test_a_queue_limit_counts_every_task_type_of_the_queue(api, coordinator) -> None:
    await set_limit(api, QUEUE, "mixed", max_running=2)
    ids = await submit_batch(api, 4, ECHO, queue="mixed") + await submit_batch(api, 4, SLEEP, queue="mixed")
    async with Fleet(coordinator.address, workers=4, slots=2, task_types=[ECHO, SLEEP]) as fleet:
        await fleet.take(2)
        await fleet.no_more()
        await fleet.finish_all()
        await fleet.run(len(ids) - 2)
    await all_succeeded(api, ids)
    assert fleet.peak_by_queue["mixed"] == 2


@pytest.mark.parametrize("ending", ["failed", "canceled", "timed_out", "worker_lost"])
async def test_every_way_an_attempt_ends_frees_its_limit_slot(api, coordinator, ending) -> None:
    await set_limit(api, QUEUE, "one", max_running=1)
    timeout = 0.5 if ending == "timed_out" else None
    first = await submit(api, "first", queue="one", timeout=timeout, retry=Retry(max_attempts=1))
    second = await submit(api, "second", queue="one")
    async with RawWorker(coordinator.address, "a", [ECHO], slots=2) as worker:
        got = await worker.next_assignment()
        assert got.id == first.id
        await worker.ack(got)
        await quiet(worker.assignments, 0.3, what="assignment over the queue limit")
        if ending == "failed":
            await fail_attempt(worker, got, retryable=False)
        elif ending == "canceled":
            await api.client.cancel(first.id)
            pushed = await asyncio.wait_for(worker.cancels.get(), 10)
            await worker.send_result(pb.AttemptResult(ref=pushed.ref, canceled="stopped"))
            assert (await asyncio.wait_for(worker.result_acks.get(), 10)).accepted
        elif ending == "timed_out":
            await asyncio.wait_for(worker.cancels.get(), 10)
        if ending != "worker_lost":
            assert (await worker.next_assignment()).id == second.id, f"after the first task {ending}"
    if ending == "worker_lost":
        async with RawWorker(coordinator.address, "b", [ECHO], slots=1) as other:
            seen = []
            while second.id not in seen:
                task = await other.next_assignment(timeout=coordinator.heartbeat_timeout + 10)
                seen.append(task.id)
                await complete(other, task)


async def test_running_attempts_count_toward_limits_after_a_restart(etcd, namespace) -> None:
    # A long heartbeat timeout: the orphaned attempt stays the keeper's while the coordinator restarts.
    with Coordinator(etcd.endpoint, namespace, heartbeat_timeout=6.0) as node:
        async with connect(node) as api:
            await set_limit(api, QUEUE, "held", max_running=1)
            first = await submit(api, "first", queue="held")
            second = await submit(api, "second", queue="held")
            async with RawWorker(node.address, "keeper", [ECHO], slots=1) as keeper:
                await keeper.start_next()
                await eventually(lambda: _is(api, first.id, S.TASK_STATE_RUNNING), what="RUNNING")
        node.restart()
        async with connect(node) as api, RawWorker(node.address, "other", [ECHO], slots=1) as other:
            await quiet(other.assignments, 1.0, what="assignment while the re-loaded attempt holds the limit")
            waiting = await get(api, second.id)
            assert (waiting.state, "held" in waiting.waiting_reason) == (S.TASK_STATE_QUEUED, True), waiting
            async with RawWorker(node.address, "keeper", [ECHO], slots=1, running=[(first.id, 1)]) as keeper:
                assert keeper.welcome is not None
                assert [(r.task_id, r.attempt) for r in keeper.welcome.reclaimed] == [(first.id, 1)]
                await keeper.send(heartbeat=pb.Heartbeat(draining=True))  # the freed slot must go to "other"
                assert (await keeper.succeed(first.id, 1, examples_pb2.EchoResponse())).accepted
            assert (await other.next_assignment(timeout=SLACK)).id == second.id


async def test_a_lifted_limit_clears_the_waiting_reason_and_held_count(api, coordinator) -> None:
    await set_limit(api, QUEUE, "gate", max_running=1)
    await submit(api, "a", queue="gate")
    b = await submit(api, "b", queue="gate")
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        await worker.ack(await worker.next_assignment())
        await quiet(worker.assignments, 0.3, what="assignment over the queue limit")
        assert (await get(api, b.id)).waiting_reason
        stats = await queue_stats(api, "gate")
        assert stats is not None and (stats.held, stats.limit) == (1, 1)
        await set_limit(api, QUEUE, "gate", max_running=0)
        # The worker has no free slot: b stays QUEUED, but nothing holds it back any more.
        waiting = await get(api, b.id)
        assert (waiting.state, waiting.waiting_reason) == (S.TASK_STATE_QUEUED, "")
        stats = await queue_stats(api, "gate")
        assert stats is not None and (stats.held, stats.limit) == (0, 0)


async def limits_by_scope(api: Api) -> dict[tuple[int, str], tuple[int, int]]:
    reply = await api.stub.ListLimits(pb.ListLimitsRequest())
    return {(lim.scope, lim.name): (lim.max_running, lim.weight) for lim in reply.limits}


async def test_invalid_limits_are_rejected_and_change_nothing(api) -> None:
    before = await limits_by_scope(api)
    for bad in (
        pb.Limit(scope=pb.LimitScope.LIMIT_SCOPE_UNSPECIFIED, max_running=1),
        pb.Limit(scope=QUEUE, name="q", max_running=-1),
        pb.Limit(scope=QUEUE, name="q", retention=duration(-1.0)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.SetLimit(pb.SetLimitRequest(limit=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    assert await limits_by_scope(api) == before


# ---------------------------------------------------------------------------- delays and ttl


async def test_a_delayed_task_stays_pending_until_not_before(api, coordinator) -> None:
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        task = await submit(api, delay=1.5)
        not_before = seconds(task.spec.not_before)
        pending = await get(api, task.id)
        assert pending.state == S.TASK_STATE_PENDING
        assert abs(seconds(pending.next_run_time) - not_before) < 0.01, "next_run_time is not_before"
        assigned = await worker.next_assignment(timeout=1.5 + 10)
        assert_between(now() - not_before, 0.0, SLACK, "assignment after not_before")
        assert seconds(assigned.assign_time) >= not_before


async def test_a_delay_survives_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        task = await submit(api, delay=4.0)
    not_before = seconds(task.spec.not_before)
    coordinator.restart()
    async with connect(coordinator) as api:
        assert now() < not_before, "the restart took longer than the delay; nothing was tested"
        pending = await get(api, task.id)
        assert pending.state == S.TASK_STATE_PENDING
        assert abs(seconds(pending.next_run_time) - not_before) < 0.01
        async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
            assigned = await worker.next_assignment(timeout=4.0 + 10)
            assert_between(now() - not_before, 0.0, SLACK, "assignment after not_before, after a restart")
            assert assigned.id == task.id


async def test_a_task_not_started_within_its_ttl_expires(api, coordinator) -> None:
    task = await submit(api, ttl=1.0)
    submitted = seconds(task.create_time)
    expired = await eventually(lambda: _expired(api, task.id), timeout=1.0 + SLACK + 5, what="EXPIRED after its ttl")
    assert_between(now() - submitted, 1.0, 1.0 + SLACK, "EXPIRED observed after submission")
    assert_between(seconds(expired.finish_time) - submitted, 1.0, 1.0 + SLACK, "finish_time - create_time")
    assert expired.error.type == "herder.expired"
    async with RawWorker(coordinator.address, "late", [ECHO], slots=1) as worker:
        await quiet(worker.assignments, 0.5, what="assignment of an expired task")


async def _expired(api: Api, task_id: str) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == S.TASK_STATE_EXPIRED else None


async def test_a_delayed_task_expires_when_its_ttl_ends_before_its_delay(api) -> None:
    task = await submit(api, delay=3.0, ttl=1.0)
    expired = await eventually(lambda: _expired(api, task.id), timeout=1.0 + SLACK + 5, what="EXPIRED")
    assert_between(seconds(expired.finish_time) - seconds(task.create_time), 1.0, 1.0 + SLACK, "expiry while PENDING")


async def test_a_started_task_does_not_expire(api, coordinator) -> None:
    task = await submit(api, ttl=1.0)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        await worker.start_next()
        await until(seconds(task.create_time) + 1.0 + 1.0)  # past the ttl, with room for a late expiry
        assert await state(api, task.id) == S.TASK_STATE_RUNNING
        assert (await worker.succeed(task.id, 1, examples_pb2.EchoResponse())).accepted
    assert await state(api, task.id) == S.TASK_STATE_SUCCEEDED


async def test_a_started_task_waiting_for_a_retry_does_not_expire(api, coordinator) -> None:
    task = await submit(api, ttl=1.0, retry=Retry(max_attempts=2, initial_backoff=1.5))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        await fail_attempt(worker, first)
        second = await worker.next_assignment(timeout=1.5 + 10)  # PENDING past the ttl meanwhile
        assert (second.id, second.attempt) == (task.id, 2)
        await complete(worker, second)
    assert await state(api, task.id) == S.TASK_STATE_SUCCEEDED


async def test_a_ttl_survives_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        task = await submit(api, ttl=3.0)
    coordinator.restart()
    async with connect(coordinator) as api:
        expired = await eventually(lambda: _expired(api, task.id), timeout=3.0 + SLACK + 5, what="EXPIRED")
        assert_between(seconds(expired.finish_time) - seconds(task.create_time), 3.0, 3.0 + SLACK, "expiry")


# ---------------------------------------------------------------------------- per-attempt timeout


async def test_an_attempt_past_its_timeout_is_failed_canceled_and_retried(api, coordinator) -> None:
    task = await submit(api, timeout=1.0, retry=Retry(max_attempts=2, initial_backoff=0.2))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        cancel = await asyncio.wait_for(worker.cancels.get(), 1.0 + SLACK + 5)
        assert_between(now() - seconds(first.assign_time), 1.0, 1.0 + SLACK, "CancelAttempt after assignment")
        assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
        failed = await get(api, task.id)
        assert [e.type for e in failed.attempt_errors] == ["herder.timeout"]
        late = await worker.succeed(task.id, 1, examples_pb2.EchoResponse(text="late"))
        assert not late.accepted, "a result for the timed-out attempt was accepted"
        second = await worker.next_assignment()
        assert (second.id, second.attempt) == (task.id, 2)
        await complete(worker, second)
    done = await get(api, task.id)
    assert (done.state, done.attempt) == (S.TASK_STATE_SUCCEEDED, 2)


async def test_a_timeout_with_no_attempts_left_fails_the_task(api, coordinator) -> None:
    task = await submit(api, timeout=0.5, retry=Retry(max_attempts=1))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        assigned = await worker.start_next()
        cancel = await asyncio.wait_for(worker.cancels.get(), 0.5 + SLACK + 5)
        assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
        failed = await eventually(lambda: _failed(api, task.id), what="FAILED after the timeout")
    assert failed.error.type == "herder.timeout"
    assert_between(seconds(failed.finish_time) - seconds(assigned.assign_time), 0.5, 0.5 + SLACK, "timeout")


async def test_a_timeout_survives_a_restart(etcd, namespace) -> None:
    # A long heartbeat timeout: the attempt stays the worker's while the coordinator restarts.
    with Coordinator(etcd.endpoint, namespace, heartbeat_timeout=6.0) as node:
        async with connect(node) as api:
            task = await submit(api, timeout=3.0, retry=Retry(max_attempts=1))
            async with RawWorker(node.address, "w", [ECHO], slots=1) as worker:
                assigned = await worker.start_next()
                await eventually(lambda: _is(api, task.id, S.TASK_STATE_RUNNING), what="RUNNING")
        node.restart()
        async with connect(node) as api, RawWorker(node.address, "w", [ECHO], running=[(task.id, 1)]) as worker:
            assert worker.welcome is not None and len(worker.welcome.reclaimed) == 1
            cancel = await asyncio.wait_for(worker.cancels.get(), 3.0 + SLACK + 5)
            assert_between(now() - seconds(assigned.assign_time), 3.0, 3.0 + SLACK, "timeout across a restart")
            assert (cancel.ref.task_id, cancel.ref.attempt) == (task.id, 1)
            failed = await eventually(lambda: _failed(api, task.id), what="FAILED")
            assert failed.error.type == "herder.timeout"


async def _failed(api: Api, task_id: str) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == S.TASK_STATE_FAILED else None


# ---------------------------------------------------------------------------- retries


async def test_retries_back_off_by_the_multiplier_pending_in_between(api, coordinator) -> None:
    retry = Retry(max_attempts=3, initial_backoff=0.4, backoff_multiplier=2.5, max_backoff=10)
    task = await submit(api, retry=retry)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        assigned = await worker.next_assignment()
        for failures, backoff in ((1, 0.4), (2, 1.0)):
            await worker.ack(assigned)
            sent = await fail_attempt(worker, assigned)
            waiting = await get(api, task.id)
            assert waiting.state == S.TASK_STATE_PENDING, named(waiting.state)
            assert_between(seconds(waiting.next_run_time) - sent, backoff, backoff + 0.5, f"next_run_time {failures}")
            assigned = await worker.next_assignment(timeout=backoff + 10)
            assert_between(now() - sent, backoff, backoff + SLACK, f"wait before attempt {failures + 1}")
            assert (assigned.id, assigned.attempt) == (task.id, failures + 1)
        await worker.ack(assigned)
        await fail_attempt(worker, assigned)
    done = await get(api, task.id)
    assert (done.state, done.attempt, done.error.type) == (S.TASK_STATE_FAILED, 3, "Boom")
    assert [e.type for e in done.attempt_errors] == ["Boom"] * 3


async def test_max_backoff_caps_the_wait(api, coordinator) -> None:
    retry = Retry(max_attempts=3, initial_backoff=0.3, backoff_multiplier=20, max_backoff=0.8)
    task = await submit(api, retry=retry)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        await fail_attempt(worker, first)
        second = await worker.start_next()
        sent = await fail_attempt(worker, second)
        third = await worker.next_assignment(timeout=10)
        assert_between(now() - sent, 0.8, 0.8 + SLACK, "second backoff, capped at 0.8 s (uncapped: 6 s)")
        assert (third.id, third.attempt) == (task.id, 3)


async def test_jitter_spreads_backoffs_within_its_fraction(api, coordinator) -> None:
    retry = Retry(max_attempts=2, initial_backoff=1.0, jitter=0.5)
    ids = await _submit_many(api, 8, retry)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=8) as worker:
        tasks = [await worker.next_assignment() for _ in ids]
        for task in tasks:
            await worker.ack(task)
        sent = await fail_all(worker, tasks)
        waits = [seconds((await get(api, i)).next_run_time) - sent for i in ids]
    for wait in waits:
        assert_between(wait, 0.5, 1.5 + 0.5, "backoff 1 s with jitter 0.5")
    assert len({round(w, 3) for w in waits}) > 1, f"8 backoffs with jitter 0.5 are all equal: {waits}"


async def test_an_explicit_policy_without_jitter_is_exact(api, coordinator) -> None:
    ids = await _submit_many(api, 8, Retry(max_attempts=2, initial_backoff=0.5))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=8) as worker:
        tasks = [await worker.next_assignment() for _ in ids]
        for task in tasks:
            await worker.ack(task)
        sent = await fail_all(worker, tasks)
        waits = [seconds((await get(api, i)).next_run_time) - sent for i in ids]
    for wait in waits:
        assert_between(wait, 0.5, 0.5 + 0.5, "backoff 0.5 s, no jitter asked for (no default jitter)")


async def _submit_many(api: Api, count: int, retry: Retry) -> list[str]:
    return [(await submit(api, str(n), retry=retry)).id for n in range(count)]


@pytest.mark.parametrize(("backoff", "retry_after"), [(30.0, 0.5), (0.1, 1.5)])
async def test_retry_after_overrides_the_backoff(api, coordinator, backoff, retry_after) -> None:
    task = await submit(api, retry=Retry(max_attempts=2, initial_backoff=backoff))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        sent = await fail_attempt(worker, first, retry_after=retry_after)
        waiting = await get(api, task.id)
        assert waiting.state == S.TASK_STATE_PENDING, named(waiting.state)
        assert_between(seconds(waiting.next_run_time) - sent, retry_after, retry_after + 0.5, "next_run_time")
        second = await worker.next_assignment(timeout=retry_after + 10)
        assert_between(now() - sent, retry_after, retry_after + SLACK, f"retry_after {retry_after} s")
        assert second.attempt == 2


async def test_a_non_retryable_error_type_fails_at_once(api, coordinator) -> None:
    retry = Retry(max_attempts=5, initial_backoff=0.1, non_retryable_error_types=("Fatal",))
    task = await submit(api, retry=retry)
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        await fail_attempt(worker, first, "Fatal", retryable=True)
        await quiet(worker.assignments, 0.5, what="a retry of a non-retryable error type")
    done = await get(api, task.id)
    assert (done.state, done.attempt, done.error.type) == (S.TASK_STATE_FAILED, 1, "Fatal")


async def test_an_error_marked_not_retryable_fails_at_once(api, coordinator) -> None:
    task = await submit(api, retry=Retry(max_attempts=5, initial_backoff=0.1))
    async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
        first = await worker.start_next()
        await fail_attempt(worker, first, "Bad", retryable=False)
        await quiet(worker.assignments, 0.5, what="a retry of a non-retryable error")
    done = await get(api, task.id)
    assert (done.state, done.attempt, done.error.type) == (S.TASK_STATE_FAILED, 1, "Bad")


async def test_a_retry_backoff_survives_a_restart(coordinator) -> None:
    async with connect(coordinator) as api:
        task = await submit(api, retry=Retry(max_attempts=2, initial_backoff=4.0))
        async with RawWorker(coordinator.address, "w", [ECHO], slots=1) as worker:
            first = await worker.start_next()
            sent = await fail_attempt(worker, first)
        due = seconds((await get(api, task.id)).next_run_time)
    coordinator.restart()
    async with connect(coordinator) as api:
        assert now() < due, "the restart took longer than the backoff; nothing was tested"
        pending = await get(api, task.id)
        assert (pending.state, seconds(pending.next_run_time)) == (S.TASK_STATE_PENDING, due)
        async with RawWorker(coordinator.address, "w2", [ECHO], slots=1) as worker:
            second = await worker.next_assignment(timeout=4.0 + 10)
            assert_between(now() - sent, 4.0, 4.0 + SLACK, "backoff across a restart")
            assert (second.id, second.attempt) == (task.id, 2)


# ---------------------------------------------------------------------------- idempotency


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
            await eventually(lambda: _gone(api, first.id), timeout=1 + SLACK + 5, what="the task deleted")
            await eventually(
                lambda: _no_keys(kv, namespace, ["reusable", first.id]), timeout=SLACK + 5, what="etcd keys gone"
            )
            second = await api.client.submit(ECHO, json={"text": "b"}, idempotency_key="reusable")
            assert second.created and second.id != first.id


async def _gone(api: Api, task_id: str) -> bool:
    try:
        await get(api, task_id)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return True
    return False


async def _no_keys(kv: Etcd, namespace: str, needles: list[str]) -> bool:
    return not await stored_keys_mentioning(kv, namespace, needles)


# ---------------------------------------------------------------------------- retention


async def test_finished_tasks_are_deleted_after_their_queues_retention(api, kv, namespace) -> None:
    await set_limit(api, QUEUE, "brief", retention=1.0)
    brief = await submit(api, queue="brief")
    kept = await submit(api, queue="kept")
    stats = await queue_stats(api, "brief")
    assert stats is not None and seconds(stats.retention) == 1.0
    finished = seconds((await api.client.cancel(brief.id)).finish_time)
    await api.client.cancel(kept.id)
    await eventually(lambda: _gone(api, brief.id), timeout=1 + SLACK + 5, what="the finished task deleted")
    assert_between(now() - finished, 1.0, 1.0 + SLACK + 1, "deletion after the queue's retention of 1 s")
    await eventually(lambda: _no_keys(kv, namespace, [brief.id]), what="its etcd keys gone")
    assert (await get(api, kept.id)).state == S.TASK_STATE_CANCELED


async def test_the_coordinator_retention_bounds_etcd_under_steady_load(etcd, namespace, kv) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--retention", "1"]) as node:
        async with connect(node) as api:
            ids: list[str] = []
            async with RawWorker(node.address, "w", [ECHO], slots=1) as worker:
                for _ in range(3):  # three waves of 10 finished tasks, one second apart
                    wave = await submit_batch(api, 10)
                    for task_id in wave[5:]:  # still queued: the 1-slot worker holds at most wave[0]
                        await api.client.cancel(task_id)
                    for _ in wave[:5]:
                        await complete(worker, await worker.next_assignment())
                    ids += wave
                    await until(now() + 1.0)
            await eventually(
                lambda: _no_keys(kv, namespace, ids), timeout=1 + SLACK + 5, what="every finished task's keys gone"
            )
            for task_id in ids[:3]:
                assert await _gone(api, task_id)
            left = [item.key async for item in kv.scan_prefix(f"/herder/{namespace}/tasks/".encode())]
            assert left == []


async def test_retention_applies_to_tasks_finished_before_a_restart(etcd, namespace, kv) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--retention", "3"]) as node:
        async with connect(node) as api:
            task = await submit(api)
            finished = seconds((await api.client.cancel(task.id)).finish_time)
        node.restart()
        async with connect(node) as api:
            assert await state(api, task.id) == S.TASK_STATE_CANCELED, "deleted before its retention"
            await eventually(lambda: _gone(api, task.id), timeout=3 + SLACK + 5, what="deleted after a restart")
            assert_between(now() - finished, 3.0, 3.0 + SLACK + 1, "deletion 3 s after finishing")
            await eventually(lambda: _no_keys(kv, namespace, [task.id]), what="its etcd keys gone")


# ---------------------------------------------------------------------------- visibility


async def test_list_queues_shows_backlog_running_limit_and_held(api, coordinator) -> None:
    await set_limit(api, QUEUE, "vis", max_running=1)
    pending = await submit(api, queue="vis", delay=60)
    queued = [await submit(api, str(n), queue="vis") for n in range(3)]
    async with RawWorker(coordinator.address, "w", [ECHO], slots=2) as worker:
        first = await worker.next_assignment()
        assert first.id == queued[0].id
        await worker.ack(first)
        await eventually(lambda: _is(api, first.id, S.TASK_STATE_RUNNING), what="RUNNING")
        await quiet(worker.assignments, 0.3, what="assignment over the queue limit")
        stats = await queue_stats(api, "vis")
        assert stats is not None
        seen = (stats.pending, stats.queued, stats.assigned, stats.running, stats.limit, stats.held)
        assert seen == (1, 2, 0, 1, 1, 2), "pending, queued, assigned, running, limit, held"
        oldest = await get(api, queued[1].id)
        assert seconds(stats.oldest_queued_time) == seconds(oldest.queue_time)
        await worker.succeed(first.id, 1, examples_pb2.EchoResponse())
        await dispatch_order(worker, 2)
    await eventually(lambda: _settled(api, "vis"), what="3 SUCCEEDED in ListQueues")
    stats = await queue_stats(api, "vis")
    assert stats is not None
    assert (stats.pending, stats.queued, stats.running, stats.held, stats.succeeded) == (1, 0, 0, 0, 3)
    assert 0 < seconds(stats.wait_p50) <= seconds(stats.wait_p99)
    assert stats.dispatch_rate > 0
    assert await state(api, pending.id) == S.TASK_STATE_PENDING


async def _settled(api: Api, queue: str) -> bool:
    stats = await queue_stats(api, queue)
    return stats is not None and stats.succeeded == 3


async def test_requested_resources_are_stored_and_shown(api) -> None:
    resources = task_pb2.Resources(cpu_millis=1500, memory_bytes=256 << 20)
    task = await submit(api, resources=resources)
    assert (await get(api, task.id)).spec.resources == resources
