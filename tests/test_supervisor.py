"""The supervisor sidecar end to end: coordinator, `herder supervisor` and a plain grpc.aio handler,
each a real process (tests/_plain_handler.py is written only with the generated stubs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _helpers import process_group
from _timing import SLACK, eventually, eventually_sync
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from herder.clients import Client, Retry
from herder.clients.context import TaskContext
from herder.clients.embedded_etcd import free_port
from herder.clients.outcomes import HANDLER_DEADLINE_EXCEEDED, HANDLER_NO_RESULT, HANDLER_UNAVAILABLE, TIMEOUT
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, supervisor_pb2, supervisor_pb2_grpc, task_pb2
from herder.supervisor import HandlerRunner

pytestmark = pytest.mark.timeout(60)

S = task_pb2.TaskState
HANDLER = str(Path(__file__).with_name("_plain_handler.py"))
ECHO = "examples.echo"


@pytest.fixture
def markers() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="herder-handler-") as path:
        yield Path(path)


@contextlib.contextmanager
def handler(
    port: int, mode: str = "echo", seconds: float = 1.0, marker: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    args = [sys.executable, HANDLER, "--port", str(port), "--mode", mode, "--seconds", str(seconds)]
    if marker is not None:
        args += ["--marker", str(marker)]
    with process_group(args) as process:
        yield process


@contextlib.contextmanager
def supervisor(
    coordinator: Coordinator, handler_port: int, *extra: str, log: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    args = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address]
    args += ["--handler", f"127.0.0.1:{handler_port}", "--slots", "2", *extra]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "wb")) if log is not None else subprocess.DEVNULL
        process = stack.enter_context(process_group(args, env=env, stdout=out))
        yield process


@contextlib.asynccontextmanager
async def client(coordinator: Coordinator) -> AsyncIterator[Client]:
    async with Client(coordinator.address) as value:
        yield value


async def _connected(c: Client, count: int = 1) -> None:
    async def check() -> bool:
        return len(await c.nodes()) == count

    await eventually(check, f"{count} supervisor sessions")


async def _state(c: Client, task_id: str, *states: int) -> task_pb2.Task:
    async def check() -> task_pb2.Task | None:
        task = await c.get(task_id)
        return task if task.state in states else None

    return await eventually(check, f"task {task_id} in {states}", timeout=30)


def _exists(path: Path) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await asyncio.to_thread(path.exists)

    return check


def _marked(markers: Path, task_id: str, event: str, timeout: float = 15.0) -> str:
    path = markers / f"{task_id}.{event}"
    eventually_sync(path.exists, f"the handler's {event} marker of {task_id}", timeout=timeout)
    return path.read_text()


async def test_typed_round_trip_with_progress_and_metadata(coordinator: Coordinator, markers: Path) -> None:
    port = free_port()
    with handler(port, "progress", 0.4, markers), supervisor(coordinator, port):
        async with client(coordinator) as c:
            await _connected(c)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="typed"))

            async def progressed() -> str:
                return (await c.get(handle.id)).progress.message

            await eventually(progressed, "progress from the handler")
            result = await handle.result(30, output_type=examples_pb2.EchoResponse)
    assert result.text == "typed" and result.attributes["attempt"] == "1"
    metadata = json.loads(_marked(markers, handle.id, "metadata"))
    assert metadata["herder-task-id"] == handle.id and metadata["herder-attempt"] == "1"


async def test_a_supervisor_tracing_nothing_passes_the_stored_trace_context_on(
    coordinator: Coordinator, markers: Path
) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    port = free_port()
    with handler(port, "echo", 0, markers), supervisor(coordinator, port):
        async with client(coordinator) as c, grpc.aio.insecure_channel(coordinator.address) as channel:
            await _connected(c)
            spec = task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": "traced elsewhere"}))
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            # The submitter traces (its context in the metadata); neither the coordinator nor the supervisor does.
            reply = await stub.SubmitTask(
                coordinator_pb2.SubmitTaskRequest(spec=spec), metadata=[("traceparent", parent)]
            )
            await (await c.handle(reply.task.id)).result(30)
    metadata = json.loads(_marked(markers, reply.task.id, "metadata"))
    assert metadata["traceparent"] == parent


async def test_timeout_cancels_execute(coordinator: Coordinator, markers: Path) -> None:
    port = free_port()
    with handler(port, "sleep", 30, markers), supervisor(coordinator, port):
        async with client(coordinator) as c:
            await _connected(c)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="t"), timeout=1, retry=Retry(max_attempts=1))
            _marked(markers, handle.id, "cancelled", timeout=1 + 2 * SLACK)
            task = await _state(c, handle.id, S.TASK_STATE_FAILED)
    # Both sides count the same deadline from the assignment: whichever is first is recorded.
    assert task.error.type in (TIMEOUT, HANDLER_DEADLINE_EXCEEDED)


async def test_supervisor_enforces_the_timeout_itself(markers: Path) -> None:
    # No coordinator here: the runner alone must stop a handler that overruns the task's timeout.
    port = free_port()
    payload = any_pb2.Any()
    payload.Pack(examples_pb2.EchoRequest(text="late"))
    task = task_pb2.Task(id="t-deadline", attempt=1, spec=task_pb2.TaskSpec(type=ECHO, payload=payload))
    # Long enough that a loaded machine surely starts the call within it: the handler must see it
    # begin, then see it cancelled at the deadline.
    task.spec.timeout.FromSeconds(2)
    with handler(port, "sleep", 30, markers):
        runner = HandlerRunner(f"127.0.0.1:{port}")
        try:
            await runner.describe()
            running = asyncio.create_task(runner.run(TaskContext(task)))
            started = markers / f"{task.id}.started"
            await eventually(_exists(started), what="the handler starting the call")
            result = await asyncio.wait_for(running, 20)
        finally:
            await runner.close()
        assert result.error.type == HANDLER_DEADLINE_EXCEEDED and result.error.retryable
        # While the handler still runs: it sees the call end at the deadline.
        await eventually(_exists(markers / f"{task.id}.cancelled"), what="the handler seeing the call cancelled")


async def test_cancel_from_coordinator_cancels_execute(coordinator: Coordinator, markers: Path) -> None:
    port = free_port()
    with handler(port, "sleep", 30, markers), supervisor(coordinator, port):
        async with client(coordinator) as c:
            await _connected(c)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="c"))
            _marked(markers, handle.id, "started")
            await c.cancel(handle.id, "test")
            _marked(markers, handle.id, "cancelled")
            await _state(c, handle.id, S.TASK_STATE_CANCELED)


async def test_status_lists_the_held_attempt_until_it_ends(coordinator: Coordinator, markers: Path) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    with handler(port, "sleep", 30, markers), supervisor(coordinator, port, "--listen", admin):
        async with client(coordinator) as c:
            await _connected(c)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="held"), timeout=120)
            _marked(markers, handle.id, "started")
            (held,) = (await _status(admin)).attempts
            assert (held.task_id, held.attempt, held.task_type, held.queue) == (handle.id, 1, ECHO, "default")
            assert held.deadline.ToSeconds() - held.assign_time.ToSeconds() == 120
            assert not held.finished and not held.cancel_requested
            await c.cancel(handle.id, "test")
            await _state(c, handle.id, S.TASK_STATE_CANCELED)

            async def released() -> bool:
                return not (await _status(admin)).attempts

            await eventually(released, "the canceled attempt gone from GetStatus")


async def test_execute_without_result_fails_retryable(coordinator: Coordinator) -> None:
    port = free_port()
    with handler(port, "no-result"), supervisor(coordinator, port):
        async with client(coordinator) as c:
            await _connected(c)
            retry = Retry(max_attempts=2, initial_backoff=0.1)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="n"), retry=retry)
            task = await _state(c, handle.id, S.TASK_STATE_FAILED)
    assert task.attempt == 2  # retryable: the second attempt ran
    assert task.error.type == HANDLER_NO_RESULT and task.error.retryable


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int((await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status)


async def test_handler_lost_then_back(coordinator: Coordinator, markers: Path) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    with supervisor(coordinator, port, "--listen", admin):
        async with client(coordinator) as c:
            with handler(port, "sleep", 30, markers):
                await _connected(c)
                retry = Retry(max_attempts=3, initial_backoff=0.1)
                handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="back"), retry=retry)
                _marked(markers, handle.id, "started")
            # The handler is SIGKILLed: the attempt fails retryable, and the supervisor stops serving.

            async def failed_unavailable() -> bool:
                task = await c.get(handle.id)
                return any(e.type == HANDLER_UNAVAILABLE and e.retryable for e in task.attempt_errors)

            await eventually(failed_unavailable, "a handler_unavailable attempt error")

            async def not_serving() -> bool:
                return await _health(admin) == health_pb2.HealthCheckResponse.NOT_SERVING

            await eventually(not_serving, "health NOT_SERVING while the handler is down")
            with handler(port, "echo"):
                result = await handle.result(30, output_type=examples_pb2.EchoResponse)

                async def serving() -> bool:
                    return await _health(admin) == health_pb2.HealthCheckResponse.SERVING

                await eventually(serving, "health SERVING once the handler is back")
    assert result.text == "back"


async def test_sigterm_drains_running_attempt(coordinator: Coordinator, markers: Path) -> None:
    port = free_port()
    with handler(port, "sleep", 2, markers), supervisor(coordinator, port, "--grace", "20") as process:
        async with client(coordinator) as c:
            await _connected(c)
            handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="drain"))
            _marked(markers, handle.id, "started")
            os.killpg(process.pid, signal.SIGTERM)
            result = await handle.result(30, output_type=examples_pb2.EchoResponse)
            assert eventually_sync(lambda: process.poll() is not None, "the supervisor to exit")
            assert process.returncode == 0
            assert (await c.get(handle.id)).attempt == 1
    assert result.text == "drain"


async def test_sigkilled_supervisor_loses_nothing(coordinator: Coordinator, markers: Path) -> None:
    port = free_port()
    with handler(port, "sleep", 1.5, markers):
        async with client(coordinator) as c:
            with supervisor(coordinator, port) as first:
                await _connected(c)
                handle = await c.submit(ECHO, examples_pb2.EchoRequest(text="again"))
                _marked(markers, handle.id, "started")
                os.killpg(first.pid, signal.SIGKILL)
            with supervisor(coordinator, port):
                result = await handle.result(30, output_type=examples_pb2.EchoResponse)
            assert (await c.get(handle.id)).attempt >= 2
    assert result.text == "again"


async def test_admin_status_health_and_drain(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    with handler(port), supervisor(coordinator, port, "--listen", admin, "--node-id", "sidecar-1") as process:
        async with client(coordinator) as c:
            await _connected(c)

        async def serving() -> bool:
            try:
                return await _health(admin) == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                return False

        await eventually(serving, "health SERVING")
        async with grpc.aio.insecure_channel(admin) as channel:
            stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
            status = await stub.GetStatus(supervisor_pb2.GetStatusRequest(), timeout=5)
            assert status.worker_id == "sidecar-1" and status.connected and not status.draining
            assert status.session_id and status.coordinator_address == coordinator.address
            assert status.slots == 2 and list(status.task_types) == [ECHO]
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = {s.name async for reply in replies for s in reply.list_services_response.service}
            assert {"herder.v1.SupervisorService", "grpc.health.v1.Health"} <= services
            drained = await stub.Drain(supervisor_pb2.DrainRequest(), timeout=5)
            assert drained.running == 0
        eventually_sync(lambda: process.poll() is not None, "the supervisor to exit after Drain")
        assert process.returncode == 0


async def _status(admin: str) -> supervisor_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(admin) as channel:
        stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
        return await stub.GetStatus(supervisor_pb2.GetStatusRequest(), timeout=5)


async def test_handler_pid_comes_from_describe_and_follows_a_restart(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    with supervisor(coordinator, port, "--listen", admin, "--resource-interval", "0.2"):
        for _ in range(2):  # the second handler is a new process: the supervisor follows its new pid
            with handler(port) as process:

                async def sampled() -> supervisor_pb2.ResourceSample | None:
                    try:
                        sample = (await _status(admin)).resources
                    except grpc.aio.AioRpcError:
                        return None  # the supervisor is still starting
                    return sample if sample.handler_pid == process.pid and sample.handler_rss_bytes > 0 else None

                await eventually(sampled, f"the handler's pid {process.pid} and RSS in the node's samples")


@pytest.mark.parametrize(
    "args",
    [
        ["--handler", "127.0.0.1:1", "--slots", "0"],
        ["--handler", "127.0.0.1:1", "--grace", "soon"],
        ["--slots", "2"],
        ["--handler", "127.0.0.1:1", "--bogus"],
        ["--handler", "127.0.0.1:1", "--handler-pid", "0"],
        ["--handler", "127.0.0.1:1", "--resource-interval", "0.01"],
        ["--handler", "127.0.0.1:1", "--disk-path", "/no/such/dir"],
        ["--handler", "127.0.0.1:1", "--cpu", "two"],
        ["--handler", "127.0.0.1:1", "--memory", "4 gigs"],
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    herder = str(Path(sys.executable).with_name("herder"))
    done = subprocess.run(
        [herder, "supervisor", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("herder supervisor: "), done.stderr
