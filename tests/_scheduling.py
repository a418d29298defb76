"""Shared by the scheduler's end-to-end tests (test_priorities, test_fairness, test_limits, test_delays,
test_timeouts, test_retries, test_idempotency, test_retention): real etcd, real coordinator processes
and raw protocol workers.

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
from _cluster import Coordinator
from _raw_worker import RawWorker, ref
from _timing import duration, eventually, now, quiet
from google.protobuf import any_pb2

from herder.clients import Client
from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server._etcd import Etcd

S = task_pb2.TaskState
GLOBAL = pb.LimitScope.LIMIT_SCOPE_GLOBAL
QUEUE = pb.LimitScope.LIMIT_SCOPE_QUEUE
KEY = pb.LimitScope.LIMIT_SCOPE_CONCURRENCY_KEY
ECHO = "examples.echo"
SLEEP = "examples.sleep"


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
        return all(await asyncio.gather(*(has_state(api, i, S.TASK_STATE_SUCCEEDED) for i in ids)))

    await eventually(check, what=f"all {len(ids)} tasks SUCCEEDED")


async def has_state(api: Api, task_id: str, wanted: int) -> bool:
    return await state(api, task_id) == wanted


async def gone(api: Api, task_id: str) -> bool:
    """The task is deleted: GetTask says NOT_FOUND."""
    try:
        await get(api, task_id)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return True
    return False


async def no_keys(kv: Etcd, namespace: str, needles: list[str]) -> bool:
    """No key under the namespace names any of these."""
    return not await stored_keys_mentioning(kv, namespace, needles)
