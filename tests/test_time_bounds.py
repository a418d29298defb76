"""Every time the coordinator computes stays in protobuf's range: bounded at the edge, clamped inside."""

from __future__ import annotations

import time

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_stub, fence, get, submit
from _raw_worker import RawWorker, ref
from _timing import eventually, now, seconds

from herder.clients import errors
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.server.deadlines import Deadlines
from herder.server.horizon import MAX_DELAY_SECONDS, MAX_TIMESTAMP_SECONDS, clamp_delay, set_timestamp

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
DAY = 86400
# The defect's backoff: ~9,500 years, a valid Duration whose end no Timestamp can hold.
HUGE = 300_000_000_000


def test_clamps_keep_every_computed_time_valid() -> None:
    assert clamp_delay(float("nan")) == 0.0 and clamp_delay(-5) == 0.0
    assert clamp_delay(3e11) == MAX_DELAY_SECONDS
    ts = task_pb2.Task().next_run_time
    set_timestamp(ts, time.time() + 3e11)
    assert ts.seconds == MAX_TIMESTAMP_SECONDS
    ts.ToJsonString()  # raises for a Timestamp out of range


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        (
            {"retry": task_pb2.RetryPolicy(initial_backoff={"seconds": HUGE}, max_backoff={"seconds": HUGE})},
            "spec.retry.initial_backoff",
        ),
        ({"retry": task_pb2.RetryPolicy(max_backoff={"seconds": MAX_DELAY_SECONDS + 1})}, "spec.retry.max_backoff"),
        ({"ttl": {"seconds": MAX_DELAY_SECONDS + 1}}, "spec.ttl"),
        ({"timeout": {"seconds": HUGE}}, "spec.timeout"),
        ({"not_before": {"seconds": int(time.time()) + MAX_DELAY_SECONDS + DAY}}, "spec.not_before"),
    ],
)
async def test_delays_past_the_horizon_are_invalid(
    coordinator: Coordinator, fields: dict[str, object], path: str
) -> None:
    async with echo_stub(coordinator.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, **fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        violations = errors.from_rpc_error(caught.value).violations
        assert any(v.field == path and "at most" in v.description for v in violations), violations


async def test_longest_backoff_after_a_timeout_leaves_every_timer_running(coordinator: Coordinator) -> None:
    """Defect 1: a timed-out attempt whose backoff ended past year 9999 killed the timer loop."""
    longest = {"seconds": MAX_DELAY_SECONDS}
    async with echo_stub(coordinator.address) as stub:
        leader_before = await fence(stub)
        slow = await submit(
            stub,
            timeout={"seconds": 1},
            retry=task_pb2.RetryPolicy(max_attempts=3, initial_backoff=longest, max_backoff=longest),
        )
        async with RawWorker(coordinator.address, "holder", [ECHO], slots=2) as worker:
            assigned = await worker.next_assignment()
            await worker.ack(assigned)  # and never answers: the attempt times out
            pending = await eventually(
                lambda: _in_state(stub, slow.id, S.TASK_STATE_PENDING), what="the timed-out task waiting to retry"
            )
            assert seconds(pending.next_run_time) >= now() + MAX_DELAY_SECONDS - DAY
            # Timers still work for everyone else: this attempt times out too, and fails for good.
            other = await submit(stub, timeout={"seconds": 1}, retry=task_pb2.RetryPolicy(max_attempts=1))
            second = await worker.next_assignment()
            assert second.id == other.id
            await worker.ack(second)
            failed = await eventually(lambda: _in_state(stub, other.id, S.TASK_STATE_FAILED), what="a timeout")
            assert failed.error.type == "herder.timeout"
        assert await fence(stub) == leader_before
    assert "Traceback" not in coordinator.log_tail(100_000)


async def test_a_huge_retry_after_is_clamped_and_the_task_waits(coordinator: Coordinator) -> None:
    """Defect 2: retry_after of 3e11 s broke Connect and left the task RUNNING forever."""
    async with echo_stub(coordinator.address) as stub:
        task = await submit(stub, retry=task_pb2.RetryPolicy(max_attempts=5))
        async with RawWorker(coordinator.address, "asker", [ECHO]) as worker:
            assigned = await worker.start_next()
            result = pb.AttemptResult(
                ref=ref(task.id, assigned.attempt),
                error=task_pb2.TaskError(type="Busy", message="come back later", retryable=True),
                retry_after={"seconds": HUGE},
            )
            await worker.send_result(result)
            ack = await worker.result_acks.get()
            assert ack.accepted and worker.error is None
        pending = await eventually(lambda: _in_state(stub, task.id, S.TASK_STATE_PENDING), what="the task waiting")
        assert now() + MAX_DELAY_SECONDS - DAY <= seconds(pending.next_run_time) <= now() + MAX_DELAY_SECONDS + 60
        assert pending.next_run_time.ToJsonString().startswith(
            time.strftime("%Y", time.gmtime(now() + MAX_DELAY_SECONDS))
        )


async def _in_state(stub: object, task_id: str, state: int) -> task_pb2.Task | None:
    task = await get(stub, task_id)  # type: ignore[arg-type]
    return task if task.state == state else None


def test_due_timers_come_a_turn_at_a_time_earliest_first() -> None:
    deadlines = Deadlines()
    for i in range(1200):
        deadlines.push(1000.0 + i, f"t{i}")
    deadlines.discard("t0")
    first = deadlines.pop_due(5000.0, 500)
    assert first == [f"t{i}" for i in range(1, 501)]
    assert len(deadlines.pop_due(5000.0, 500)) == 500
    assert deadlines.pop_due(5000.0, 500) == [f"t{i}" for i in range(1001, 1200)]
    assert deadlines.pop_due(5000.0) == [] and len(deadlines) == 0
