"""A worker cannot loop a task forever: results with no outcome fail the attempt, and a worker
that never acknowledges is quarantined instead of failing every task of its types."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from _cluster import Coordinator
from _helpers import ECHO, echo_stub, get, submit
from _raw_worker import RawWorker, ref
from _timing import eventually, quiet

from herder.clients.cli import main
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.server.service import MAX_ITEMS_PER_MESSAGE
from herder.server.sessions import MAX_PENDING_MESSAGES, Session

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
QUARANTINE = 4.0


@pytest.fixture
def strict(etcd: EmbeddedEtcd, namespace: str) -> Iterator[Coordinator]:
    with Coordinator(etcd.endpoint, namespace, ack_timeout=1.0, extra_args=["--quarantine", str(QUARANTINE)]) as node:
        yield node


async def test_a_result_with_no_outcome_is_rejected_and_uses_up_an_attempt(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        task = await submit(stub, retry=task_pb2.RetryPolicy(max_attempts=2, initial_backoff={"nanos": 1000}))
        async with RawWorker(coordinator.address, "empty", [ECHO]) as worker:
            for attempt in (1, 2):
                assigned = await worker.next_assignment()
                assert (assigned.id, assigned.attempt) == (task.id, attempt)
                await worker.ack(assigned)
                await worker.send_result(pb.AttemptResult(ref=ref(task.id, attempt)))
                ack = await asyncio.wait_for(worker.result_acks.get(), 10)
                assert not ack.accepted and "no outcome" in ack.reason
        done = await eventually(lambda: _in(stub, task.id, S.TASK_STATE_FAILED), what="the task failed")
        assert [e.type for e in done.attempt_errors] == ["herder.invalid_result"] * 2


async def test_a_worker_that_never_acknowledges_is_quarantined_and_costs_no_attempt(
    strict: Coordinator, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    async with echo_stub(strict.address) as stub:
        task = await submit(stub, retry=task_pb2.RetryPolicy(max_attempts=1))
        async with RawWorker(strict.address, "mute", [ECHO], slots=4) as mute:
            assigned = await mute.next_assignment()  # and never acknowledged
            nodes = await eventually(lambda: _quarantined(stub), what="the worker quarantined")
            assert [n.worker_id for n in nodes] == ["mute"] and "not acknowledged" in nodes[0].quarantine_reason
            code = await asyncio.to_thread(main, ["--coordinator", strict.address, "status"])
            shown = capsys.readouterr().out
            assert code == 0 and "QUARANTINED" in shown and "not acknowledged" in " ".join(shown.split())
            requeued = await get(stub, task.id)
            assert (requeued.state, requeued.attempt) == (S.TASK_STATE_QUEUED, assigned.attempt)
            # Quarantined: nothing more for it, on this session or a new one, while the cool-down lasts.
            await quiet(mute.assignments, 1.0, what="an assignment to a quarantined worker")
            async with RawWorker(strict.address, "mute", [ECHO]) as again:
                await quiet(again.assignments, 0.5, what="an assignment to a quarantined worker's new session")
            # A healthy worker runs the task; max_attempts=1 was not used up by the ack timeout.
            async with RawWorker(strict.address, "healthy", [ECHO]) as healthy:
                attempt = await healthy.start_next()
                assert (await healthy.succeed(task.id, attempt.attempt, examples_pb2.EchoResponse(text="ok"))).accepted
            done = await get(stub, task.id)
            assert done.state == S.TASK_STATE_SUCCEEDED
            assert [e.type for e in done.attempt_errors] == ["herder.ack_timeout"]
            # After the cool-down the worker gets work again.
            later = await submit(stub, "later")
            again_assigned = await mute.next_assignment(timeout=QUARANTINE + 10)
            assert again_assigned.id == later.id
            assert not await _quarantined(stub)


async def _in(stub: object, task_id: str, state: int) -> task_pb2.Task | None:
    task = await get(stub, task_id)  # type: ignore[arg-type]
    return task if task.state == state else None


async def _quarantined(stub: object) -> list[pb.Node]:
    reply = await stub.ListNodes(pb.ListNodesRequest())  # type: ignore[attr-defined]
    return [node for node in reply.nodes if node.HasField("quarantined_until")]


async def test_a_message_with_more_items_than_slots_ends_the_session(coordinator: Coordinator) -> None:
    flood = pb.AttemptResults(
        results=[
            pb.AttemptResult(ref=ref(f"no-such-task-{i}", 1), canceled="x") for i in range(MAX_ITEMS_PER_MESSAGE + 1)
        ]
    )
    async with RawWorker(coordinator.address, "flooder", [ECHO]) as worker:
        await worker.send(results=flood)
        await asyncio.wait_for(worker.closed.wait(), 30)
        assert worker.error is not None and worker.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 10000" in (worker.error.details() or "")
    async with echo_stub(coordinator.address) as stub:
        assert (await stub.ListNodes(pb.ListNodesRequest())).nodes == []


async def test_a_session_whose_worker_reads_nothing_is_ended_once_too_much_waits() -> None:
    session = Session(worker_id="deaf", task_types=frozenset({ECHO}), slots=1, labels={}, address="test")
    for i in range(MAX_PENDING_MESSAGES - 1):
        session.send_result_ack(ref(f"t{i}", 1), False, "stale")
    assert not session.closed
    session.send_result_ack(ref("one-more", 1), False, "stale")
    session.send_result_ack(ref("and-another", 1), False, "stale")
    assert session.closed
    assert await session.next_messages() == []
