"""Queue, concurrency-key and global limits: never over-dispatched, changed at run time, durable."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from _cluster import Coordinator
from _raw_worker import RawWorker
from _scheduling import (
    ECHO,
    GLOBAL,
    KEY,
    QUEUE,
    SLEEP,
    Api,
    Fleet,
    S,
    all_succeeded,
    complete,
    connect,
    fail_attempt,
    get,
    has_state,
    queue_stats,
    running_in,
    set_limit,
    submit,
    submit_batch,
)
from _timing import SLACK, duration, eventually, quiet

from herder.clients import Retry
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.timeout(60)


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
        # Each queue counts its own tasks the key's limit holds back: one of q1's three, three of q2's.
        stats = {q.name: q for q in (await api.stub.ListQueues(pb.ListQueuesRequest(), timeout=5)).queues}
        assert (stats["q1"].held, stats["q2"].held) == (
            sum(1 for t in tenant[:3] if t not in fleet.held),
            sum(1 for t in tenant[3:] if t not in fleet.held),
        ), stats
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
                await eventually(lambda: has_state(api, first.id, S.TASK_STATE_RUNNING), what="RUNNING")
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
