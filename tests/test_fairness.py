"""Fair sharing between concurrency keys (deficit round-robin) within a priority level."""

from __future__ import annotations

from collections import Counter

import pytest
from _raw_worker import RawWorker
from _scheduling import ECHO, KEY, complete, dispatch_order, queue_stats, set_limit, submit, submit_batch

pytestmark = pytest.mark.timeout(60)


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
