"""Overload: a coordinator whose event loop runs behind refuses new work with RESOURCE_EXHAUSTED and a
RetryInfo, writes nothing for it, keeps serving everything else, and takes work again once it catches up."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from _timing import eventually
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from herder.clients import Client, errors
from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server.app import Coordinator, CoordinatorConfig
from herder.server.overload import MAX_RETRY_AFTER, MIN_RETRY_AFTER, PROBE_INTERVAL, SLOW_READS, Overload

pytestmark = pytest.mark.timeout(60)

MAX_LAG = 0.03
# How long the hog below holds the loop each turn: well past MAX_LAG, so every probe runs late.
HOLD = 0.1


async def test_the_probe_sees_a_blocked_loop_and_refuses_with_a_retry_delay() -> None:
    overload = Overload(max_lag=0.1, max_waiting=0, interval=0.01)
    overload.start()
    try:
        overload.check()  # nothing blocked yet: taken
        time.sleep(0.3)  # noqa: ASYNC251 -- holds the loop on purpose: the probe is now ~290 ms overdue
        assert overload.lag() >= 0.25
        with pytest.raises(errors.OverloadedError, match=r"runs \d+ ms behind, the limit is 100 ms") as caught:
            overload.check()
        assert MIN_RETRY_AFTER <= caught.value.retry_after <= MAX_RETRY_AFTER
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert overload.refused == 1

        async def caught_up() -> bool:
            return overload.lag() < 0.1

        await eventually(caught_up, "the lag to fall once the loop runs", timeout=10)
        overload.check()
        overload.max_lag = 0  # 0: never refuses
        time.sleep(0.3)  # noqa: ASYNC251 -- as above
        overload.check()
    finally:
        overload.stop()


class _CountedReads(Overload):
    """The probe with its reads of gRPC's counts counted, and what they find set by the test."""

    def __init__(self, max_waiting: int, interval: float) -> None:
        super().__init__(max_lag=0, max_waiting=max_waiting, interval=interval)
        self.probes = 0
        self.reads = 0
        self.found = 0

    def _probe(self) -> None:
        self.probes += 1
        super()._probe()

    def count_waiting(self) -> int:
        self.reads += 1
        return self.found


async def test_the_probe_reads_grpcs_counts_every_probe_only_near_the_limit() -> None:
    overload = _CountedReads(max_waiting=100, interval=0.05)
    overload.start()
    try:

        async def probed(count: int) -> bool:
            return overload.probes >= count

        await eventually(lambda: probed(20), "20 probes", timeout=20)
        # Far below the limit: a read every SLOW_READS-th probe (and at a late one).
        assert overload.reads < overload.probes
        overload.found = 25  # a quarter of the limit: from the next read on, every probe reads
        probes = overload.probes
        await eventually(lambda: probed(probes + SLOW_READS), "the next read", timeout=20)
        probes, reads = overload.probes, overload.reads
        await eventually(lambda: probed(probes + 10), "10 more probes", timeout=20)
        assert overload.reads - reads == overload.probes - probes
        assert overload.waiting == 25
    finally:
        overload.stop()


@contextlib.asynccontextmanager
async def _hogged() -> AsyncIterator[None]:
    """The loop held HOLD seconds every turn (what a saturated coordinator's loop looks like)."""

    async def hog() -> None:
        while True:
            time.sleep(HOLD)  # noqa: ASYNC251 -- holds the loop on purpose
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def _leading(etcd: EmbeddedEtcd, namespace: str, **overload: Any) -> AsyncIterator[Coordinator]:
    # In this process, so the test can hold the coordinator's own event loop.
    node = Coordinator(
        CoordinatorConfig(etcd=(etcd.endpoint,), listen=f"127.0.0.1:{free_port()}", namespace=namespace, **overload)
    )
    await node.start()
    try:

        async def leading() -> bool:
            return node.leader is not None

        await eventually(leading, "the coordinator to lead", timeout=20)
        async with grpc.aio.insecure_channel(node.address) as channel:
            task_type = task_type_for("overload.noop", empty_pb2.Empty, empty_pb2.Empty)
            await coordinator_pb2_grpc.CoordinatorServiceStub(channel).RegisterTaskType(
                pb.RegisterTaskTypeRequest(task_type=task_type)
            )
        yield node
    finally:
        await node.stop()


@pytest.fixture
async def coordinator(etcd: EmbeddedEtcd, namespace: str) -> AsyncIterator[Coordinator]:
    async with _leading(etcd, namespace, max_loop_lag=MAX_LAG, max_waiting_calls=0) as node:
        yield node


def _spec(key: str) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(type="overload.noop", queue="q", idempotency_key=key)
    spec.payload.Pack(empty_pb2.Empty())
    return spec


async def test_an_overloaded_coordinator_refuses_submissions_clearly_and_recovers(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        async with _hogged():
            for call in (
                stub.SubmitTask(pb.SubmitTaskRequest(spec=_spec("a"))),
                stub.SubmitTasks(pb.SubmitTasksRequest(specs=[_spec("b"), _spec("c")])),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "overloaded" in (caught.value.details() or "")
                status = rpc_status.from_call(caught.value)
                assert status is not None
                [detail] = status.details
                info = error_details_pb2.RetryInfo()
                assert detail.Unpack(info)
                assert MIN_RETRY_AFTER <= info.retry_delay.ToMilliseconds() / 1000 <= MAX_RETRY_AFTER
            # Reads and other calls are still served.
            listed = await stub.ListTasks(pb.ListTasksRequest())
            assert list(listed.tasks) == []  # nothing was written for the refused submissions
            assert isinstance(errors.from_rpc_error(caught.value), errors.OverloadedError)
            # The SDK retries after the delay asked for while its timeout allows.
            refused = coordinator.overload.refused
            client = Client(coordinator.address, timeout=30)
            submitting = asyncio.create_task(
                client.submit("overload.noop", empty_pb2.Empty(), queue="q", idempotency_key="sdk")
            )

            async def retried() -> bool:
                return coordinator.overload.refused >= refused + 2

            await eventually(retried, "the SDK to retry a refused submission", timeout=20)
        handle = await asyncio.wait_for(submitting, 30)  # the loop caught up: the retry was taken
        await client.close()
        assert handle.id

        # Caught up: taken again.
        async def taken() -> bool:
            try:
                await stub.SubmitTask(pb.SubmitTaskRequest(spec=_spec("a")))
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return False
            return True

        await eventually(taken, "a submission taken once the loop catches up", timeout=20)
        listed = await stub.ListTasks(pb.ListTasksRequest())
        assert sorted(task.spec.idempotency_key for task in listed.tasks) == ["a", "sdk"]


async def test_calls_waiting_in_grpc_past_the_limit_are_refused_and_nothing_is_written(
    etcd: EmbeddedEtcd, namespace: str
) -> None:
    calls = 40
    async with _leading(etcd, namespace, max_loop_lag=0, max_waiting_calls=10) as node:
        # Past the probe's next turn too, so it runs (and counts them) before any is picked up.
        outcomes = await _sent_while_held(node, calls, "k", 2 * PROBE_INTERVAL)
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        taken = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
        assert refused, "no call was refused with 40 waiting and a limit of 10"
        for error in refused:
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
            assert "calls wait to be read, the limit is 10" in (error.details() or "")
        async with grpc.aio.insecure_channel(node.address) as aio_channel:
            listed = await coordinator_pb2_grpc.CoordinatorServiceStub(aio_channel).ListTasks(pb.ListTasksRequest())
        assert sorted(t.spec.idempotency_key for t in listed.tasks) == sorted(
            r.task.spec.idempotency_key for r in taken
        )


async def test_calls_grpc_dropped_past_its_pending_limit_do_not_count_as_waiting(
    etcd: EmbeddedEtcd, namespace: str
) -> None:
    calls, pending = 60, 20
    async with _leading(etcd, namespace, max_loop_lag=0, max_waiting_calls=8, max_pending_calls=pending) as node:
        outcomes = await _sent_while_held(node, calls, "d")  # gRPC keeps 20 of them and drops the rest
        dropped = [o for o in outcomes if isinstance(o, grpc.RpcError) and o.code() is grpc.StatusCode.CANCELLED]
        assert len(dropped) >= calls // 2, f"{len(dropped)} of {calls} dropped by gRPC, with room for {pending}"

        # gRPC counts each dropped call as started and never as ended: they must not stay "waiting".
        async def nothing_waits() -> bool:
            return node.overload.count_waiting() == 0

        await eventually(nothing_waits, "the dropped calls no longer counted as waiting", timeout=20)
        async with grpc.aio.insecure_channel(node.address) as aio_channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(aio_channel)
            for i in range(20):  # each would be refused while the dropped calls counted
                await stub.SubmitTask(pb.SubmitTaskRequest(spec=_spec(f"after{i}")))


async def _sent_while_held(node: Coordinator, calls: int, prefix: str, hold_after: float = 0.0) -> list[Any]:
    """Send `calls` SubmitTasks from a client on its own threads while this loop (the coordinator's)
    is held, until gRPC has them all (and `hold_after` seconds more): they wait there, none picked up.
    Returns each call's response or RpcError."""
    received = node.overload.received()
    channel = grpc.insecure_channel(node.address)
    submit = channel.unary_unary(
        "/herder.v1.CoordinatorService/SubmitTask",
        request_serializer=pb.SubmitTaskRequest.SerializeToString,
        response_deserializer=pb.SubmitTaskResponse.FromString,
    )
    try:
        specs = [pb.SubmitTaskRequest(spec=_spec(f"{prefix}{i}")) for i in range(calls)]
        futures = [submit.future(request, timeout=60) for request in specs]
        deadline = time.monotonic() + 30
        while node.overload.received() < received + calls:
            assert time.monotonic() < deadline, "the calls did not reach the coordinator's gRPC server"
            time.sleep(0.01)  # noqa: ASYNC251 -- holds the loop on purpose
        time.sleep(hold_after)  # noqa: ASYNC251
        return await asyncio.gather(*(asyncio.wrap_future(_as_future(f)) for f in futures))
    finally:
        channel.close()


def _as_future(call: Any) -> concurrent.futures.Future[Any]:
    """A grpc future as a concurrent one, holding its response or its RpcError."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def done(finished: Any) -> None:
        error = finished.exception()
        future.set_result(error if error is not None else finished.result())

    call.add_done_callback(done)
    return future
