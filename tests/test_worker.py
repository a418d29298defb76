"""The Worker SDK against a real etcd and a real coordinator subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack

import pytest
from _cluster import Coordinator, start_replicas
from google.protobuf import duration_pb2

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.client import Client, Retry, TaskHandle, task_spec
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.examples import build_example_worker, echo
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2
from herder.clients.worker import SHUTDOWN_REASON, RetryAfter, TaskContext, Worker, WorkerSettings

pytestmark = pytest.mark.timeout(60)


S = task_pb2
FAST = WorkerSettings(backoff=Backoff(initial=0.05, max=0.3), connect_timeout=5.0)
GATE = "test.gate"


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


class Gate:
    """A test.gate handler that blocks until released (or, with `pass_from`, from that attempt on)."""

    def __init__(self, pass_from: int = 0) -> None:
        self.pass_from = pass_from
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.runs: list[int] = []
        self.cancel_reasons: list[str] = []

    def serve(self, worker: Worker) -> Worker:
        @worker.task(GATE)
        async def gate(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
            self.runs.append(ctx.attempt)
            self.started.set()
            try:
                if not (self.pass_from and ctx.attempt >= self.pass_from):
                    await self.release.wait()
            except asyncio.CancelledError:
                self.cancel_reasons.append(ctx.cancelled.reason)
                raise
            self.finished.set()
            return examples_pb2.EchoResponse(text=f"{request.text} #{ctx.attempt}")

        return worker


@contextlib.asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[Worker]:
    """Run `worker` (shut down on exit) and wait until its task types are registered and it is connected."""
    async with worker:
        await worker.wait_connected(10)
        yield worker


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait (polling) until `predicate()` holds; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def watch_until(
    handle: TaskHandle, predicate: Callable[[task_pb2.Task], bool], timeout: float = 10.0
) -> task_pb2.Task:
    async with asyncio.timeout(timeout), contextlib.aclosing(handle.watch()) as events:
        async for event in events:
            if predicate(event.task):
                return event.task
    raise AssertionError(f"task {handle.id} finished without matching: {handle.task}")


async def test_task_runs_and_succeeds(coordinator: Coordinator) -> None:
    async with (
        build_example_worker(coordinator.address, settings=FAST) as worker,
        Client(coordinator.address) as client,
    ):
        await worker.wait_connected(10)
        handle = await client.submit("examples.echo", examples_pb2.EchoRequest(text="hi", attributes={"a": "b"}))
        result = await handle.result(10, output_type=examples_pb2.EchoResponse)
        assert result == examples_pb2.EchoResponse(text="hi", attributes={"a": "b"})
        types = {t.name: t for t in await client.task_types()}
        assert types["examples.sleep"].input_type == "herder.examples.v1.SleepRequest"
        nodes = await client.nodes()
        assert [n.worker_id for n in nodes] == [worker.worker_id]
        assert handle.task.state == S.TASK_STATE_SUCCEEDED


async def test_progress_is_visible_while_running(coordinator: Coordinator) -> None:
    async with serving(build_example_worker(coordinator.address, settings=FAST)), Client(coordinator.address) as client:
        handle = await client.submit("examples.sleep", examples_pb2.SleepRequest(duration=_duration(1.0), steps=4))
        running = await watch_until(handle, lambda t: t.state == S.TASK_STATE_RUNNING and t.progress.fraction > 0)
        assert running.progress.message.startswith("slept 1 of 4") or running.progress.fraction > 0.25
        result = await handle.result(10, output_type=examples_pb2.SleepResponse)
        assert result.slept.ToNanoseconds() >= 1_000_000_000


async def test_cancellation_reaches_the_handler(coordinator: Coordinator) -> None:
    gate = Gate()
    worker = gate.serve(Worker(coordinator.address, settings=FAST))
    async with serving(worker), Client(coordinator.address) as client:
        handle = await client.submit(GATE, examples_pb2.EchoRequest(text="x"))
        async with asyncio.timeout(10):
            await gate.started.wait()
        await client.cancel(handle.id, "changed my mind")
        task = await handle.wait(10)
        assert task.state == S.TASK_STATE_CANCELED
        assert gate.cancel_reasons == ["changed my mind"]
        await until(lambda: worker.running == 0)


async def test_retryable_errors_are_retried(coordinator: Coordinator) -> None:
    async with serving(build_example_worker(coordinator.address, settings=FAST)), Client(coordinator.address) as client:
        handle = await client.submit(
            "examples.flaky",
            examples_pb2.FlakyRequest(fail_attempts=2),
            retry=Retry(max_attempts=5, initial_backoff=0.05, max_backoff=0.1),
        )
        result = await handle.result(15, output_type=examples_pb2.FlakyResponse)
        assert result.attempt == 3
        task = await client.get(handle.id)
        assert [(e.type, e.retryable) for e in task.attempt_errors] == [("FlakyError", True)] * 2


async def test_non_retryable_errors_fail_the_task(coordinator: Coordinator) -> None:
    async with serving(build_example_worker(coordinator.address, settings=FAST)), Client(coordinator.address) as client:
        request = examples_pb2.SleepRequest(duration=duration_pb2.Duration(seconds=-1))
        handle = await client.submit("examples.sleep", request, retry=Retry(max_attempts=5))
        task = await handle.wait(10)
        assert (task.state, task.attempt, task.error.type, task.error.retryable) == (
            S.TASK_STATE_FAILED,
            1,
            "examples.invalid_duration",
            False,
        )


async def test_retry_after_delays_the_next_attempt(coordinator: Coordinator) -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    worker = Worker(coordinator.address, settings=FAST)

    @worker.task("test.later")
    async def later(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        starts.append(loop.time())
        if ctx.attempt == 1:
            raise RetryAfter(0.8, "busy")
        return examples_pb2.EchoResponse(text=request.text)

    async with serving(worker), Client(coordinator.address) as client:
        handle = await client.submit("test.later", examples_pb2.EchoRequest(text="x"), retry=Retry(max_attempts=3))
        await handle.result(10)
        task = await client.get(handle.id)
    assert [(e.type, e.message) for e in task.attempt_errors] == [("RetryAfter", "busy")]
    assert starts[1] - starts[0] >= 0.7


async def test_shutdown_lets_running_tasks_finish(coordinator: Coordinator) -> None:
    worker = build_example_worker(coordinator.address, settings=FAST)
    async with Client(coordinator.address) as client:
        async with serving(worker):
            handle = await client.submit("examples.sleep", examples_pb2.SleepRequest(duration=_duration(0.5)))
            await watch_until(handle, lambda t: t.state == S.TASK_STATE_RUNNING)
            await worker.shutdown(grace=10)
            await worker.shutdown(grace=10)  # safe twice
        task = await client.get(handle.id)
    assert (task.state, task.attempt) == (S.TASK_STATE_SUCCEEDED, 1)


async def test_shutdown_requeues_unfinished_tasks(coordinator: Coordinator) -> None:
    first, second = Gate(), Gate(pass_from=2)
    async with Client(coordinator.address) as client:
        async with serving(gate_worker(first, coordinator.address)) as worker:
            handle = await client.submit(GATE, examples_pb2.EchoRequest(text="x"))
            async with asyncio.timeout(10):
                await first.started.wait()
            await worker.shutdown(grace=0.2)
        assert first.cancel_reasons == [SHUTDOWN_REASON]
        requeued = await client.get(handle.id)
        assert (requeued.state, requeued.attempt, len(requeued.attempt_errors)) == (S.TASK_STATE_QUEUED, 1, 0)
        async with serving(gate_worker(second, coordinator.address)):
            result = await handle.result(10, output_type=examples_pb2.EchoResponse)
    assert result.text == "x #2"


async def test_reconnect_reclaims_the_running_attempt(coordinator: Coordinator) -> None:
    gate = Gate()
    async with Client(coordinator.address) as client, serving(gate_worker(gate, coordinator.address)) as worker:
        handle = await client.submit(GATE, examples_pb2.EchoRequest(text="x"))
        async with asyncio.timeout(10):
            await gate.started.wait()
        before = worker.session_id
        await asyncio.to_thread(coordinator.restart)
        await until(lambda: worker.session_id not in (None, before))
        gate.release.set()
        result = await handle.result(15, output_type=examples_pb2.EchoResponse)
    assert result.text == "x #1"
    assert gate.runs == [1]


async def test_result_finished_while_disconnected_is_resent(coordinator: Coordinator) -> None:
    gate = Gate()
    async with Client(coordinator.address) as client, serving(gate_worker(gate, coordinator.address)) as worker:
        handle = await client.submit(GATE, examples_pb2.EchoRequest(text="x"))
        async with asyncio.timeout(10):
            await gate.started.wait()
        await asyncio.to_thread(coordinator.kill)
        gate.release.set()
        async with asyncio.timeout(10):
            await gate.finished.wait()
        await until(lambda: worker.session_id is None)
        assert worker.running == 1  # the result, kept until acknowledged
        await asyncio.to_thread(coordinator.start)
        result = await handle.result(20, output_type=examples_pb2.EchoResponse)
        await until(lambda: worker.running == 0)
    assert result.text == "x #1"
    assert gate.runs == [1]


async def test_a_follower_sends_the_worker_to_the_leader(
    coordinator: Coordinator, etcd: EmbeddedEtcd, namespace: str
) -> None:
    with Coordinator(etcd.endpoint, namespace).start(wait_leader=False) as follower:
        await asyncio.to_thread(follower.wait_has_leader)
        async with (
            build_example_worker(follower.address, settings=FAST) as worker,
            Client(coordinator.address) as client,
        ):
            await worker.wait_connected(10)
            assert [n.worker_id for n in await client.nodes()] == [worker.worker_id]
            handle = await client.submit("examples.echo", examples_pb2.EchoRequest(text="via follower"))
            assert (await handle.result(10, output_type=examples_pb2.EchoResponse)).text == "via follower"


async def test_a_worker_given_every_replica_keeps_serving_across_a_leader_kill(
    etcd: EmbeddedEtcd, namespace: str
) -> None:
    with ExitStack() as stack:
        leader, *followers = start_replicas(etcd.endpoint, namespace, 3, stack)
        addresses = [followers[0].address, leader.address, followers[1].address]
        async with (
            build_example_worker(addresses, settings=FAST) as worker,
            Client(",".join(addresses), timeout=20) as client,
        ):
            await worker.wait_connected(10)
            before = await client.submit("examples.echo", examples_pb2.EchoRequest(text="before"))
            assert (await before.result(10, output_type=examples_pb2.EchoResponse)).text == "before"

            # Running across the kill: the worker re-claims it from the new leader, the watch follows.
            running = await client.submit("examples.sleep", examples_pb2.SleepRequest(duration=_duration(2.0)))
            await watch_until(running, lambda t: t.state == S.TASK_STATE_RUNNING)
            waiting = asyncio.create_task(running.result(30, output_type=examples_pb2.SleepResponse))
            await asyncio.sleep(0.2)  # let the watch open before the kill breaks it

            await asyncio.to_thread(leader.kill)
            after = await client.submit("examples.echo", examples_pb2.EchoRequest(text="after"))
            assert (await after.result(20, output_type=examples_pb2.EchoResponse)).text == "after"
            assert [n.worker_id for n in await client.nodes()] == [worker.worker_id]
            await waiting
            assert (await client.get(running.id)).attempt == 1


async def test_a_rejected_task_type_stops_the_worker(coordinator: Coordinator) -> None:
    worker = Worker(coordinator.address, settings=FAST)
    worker.add_task("not a valid name!", echo)
    with pytest.raises(errors.InvalidArgumentError):
        async with asyncio.timeout(10):
            await worker.run()


async def test_example_worker_process_finishes_its_task_on_sigterm(coordinator: Coordinator) -> None:
    with example_worker_process(coordinator.address) as process:
        async with Client(coordinator.address) as client:
            async with asyncio.timeout(20):
                while True:
                    if await client.nodes():
                        break
                    await asyncio.sleep(0.05)
            handle = await client.submit("examples.sleep", examples_pb2.SleepRequest(duration=_duration(1.0)))
            await watch_until(handle, lambda t: t.state == S.TASK_STATE_RUNNING)
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 20)
            task = await client.get(handle.id)
    assert code == 0
    assert (task.state, task.attempt) == (S.TASK_STATE_SUCCEEDED, 1)


async def test_many_assignments_at_once_are_acknowledged_and_reported(coordinator: Coordinator) -> None:
    gate = Gate()
    worker = gate.serve(Worker(coordinator.address, slots=64, settings=FAST))
    async with Client(coordinator.address) as client, serving(worker):
        session = worker.session_id
        submitted = await client.submit_many(task_spec(GATE, examples_pb2.EchoRequest(text=str(i))) for i in range(64))
        handles = [h for h in submitted if isinstance(h, TaskHandle)]
        await until(lambda: len(gate.runs) == 64)
        gate.release.set()  # the results pile up while the writer writes, and go out together
        texts = [(await h.result(10, output_type=examples_pb2.EchoResponse)).text for h in handles]
        assert worker.session_id == session
    assert texts == [f"{i} #1" for i in range(64)]
    assert gate.runs == [1] * 64  # every ack arrived in time: no attempt was re-queued


async def test_cancelling_a_handler_while_it_reports_progress_keeps_the_session(coordinator: Coordinator) -> None:
    worker = Worker(coordinator.address, settings=FAST)
    started = asyncio.Event()

    @worker.task(GATE)
    async def chatty(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        started.set()
        while True:  # cancelled while a progress message is queued or being written
            await ctx.progress(-1, "working")

    async with Client(coordinator.address) as client, serving(worker):
        session = worker.session_id
        handle = await client.submit(GATE, examples_pb2.EchoRequest(text="x"))
        async with asyncio.timeout(10):
            await started.wait()
        await client.cancel(handle.id, "enough")
        await until(lambda: worker.running == 0)  # the result was acknowledged
        assert worker.session_id == session
        assert (await client.get(handle.id)).state == S.TASK_STATE_CANCELED


def gate_worker(gate: Gate, address: str) -> Worker:
    return gate.serve(Worker(address, settings=FAST))


@contextlib.contextmanager
def example_worker_process(address: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "herder.clients.examples", "--coordinator", address, "--shutdown-grace", "10"],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
