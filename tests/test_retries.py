"""Retries: backoff, its cap and jitter, retry_after, non-retryable errors, across a restart."""

from __future__ import annotations

import pytest
from _raw_worker import RawWorker
from _scheduling import ECHO, Api, S, connect, fail_all, fail_attempt, get, named, submit
from _timing import SLACK, assert_between, now, quiet, seconds

from herder.clients import Retry

pytestmark = pytest.mark.timeout(60)


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
