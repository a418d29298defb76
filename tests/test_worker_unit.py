"""Worker SDK pieces that need no coordinator: backoff, handler registration, contexts, example handlers."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pytest
from google.protobuf import any_pb2, duration_pb2, empty_pb2

from herder.clients.backoff import Backoff
from herder.clients.embedded_etcd import free_port
from herder.clients.examples import FlakyError, build_example_worker, echo, flaky, sleep
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2
from herder.clients.worker import NonRetryableError, RetryAfter, TaskContext, Worker, WorkerSettings, _HandlerRunner

pytestmark = pytest.mark.timeout(20)


def _task(attempt: int = 1) -> task_pb2.Task:
    return task_pb2.Task(id="t1", attempt=attempt, spec=task_pb2.TaskSpec(type="examples.sleep", metadata={"k": "v"}))


# --- backoff ---


def test_backoff_grows_by_the_multiplier_until_the_cap() -> None:
    backoff = Backoff(initial=0.1, multiplier=2.0, max=1.0, jitter=0.0)
    assert [backoff.delay(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


def test_backoff_jitter_stays_within_its_fraction_and_the_cap() -> None:
    backoff = Backoff(initial=1.0, multiplier=1.0, max=1.0, jitter=0.5)
    rng = random.Random(7)
    delays = [backoff.delay(1, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)
    assert len(set(delays)) > 1


def test_backoff_survives_a_very_long_outage() -> None:
    assert Backoff(jitter=0.0).delay(100_000) == 5.0


@pytest.mark.parametrize(
    "kwargs",
    [{"initial": -1.0}, {"multiplier": 0.5}, {"initial": 2.0, "max": 1.0}, {"jitter": 1.5}],
)
def test_backoff_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="Backoff"):
        Backoff(**kwargs)


def test_backoff_attempts_start_at_one() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(0)


# --- registration ---


def test_task_infers_message_types_from_annotations() -> None:
    worker = Worker("127.0.0.1:1")

    @worker.task("examples.echo", description="echoes")
    async def handler(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        return examples_pb2.EchoResponse(text=request.text)

    registration = worker.registrations["examples.echo"]
    assert registration.handler is handler
    assert registration.input_type is examples_pb2.EchoRequest
    assert registration.output_type is examples_pb2.EchoResponse
    contract = registration.contract
    assert (contract.name, contract.input_type, contract.output_type, contract.description) == (
        "examples.echo",
        "herder.examples.v1.EchoRequest",
        "herder.examples.v1.EchoResponse",
        "echoes",
    )
    assert [f.name for f in contract.descriptors.file] == [
        "google/protobuf/duration.proto",
        "herder/examples/v1/examples.proto",
    ]


def test_explicit_types_win_over_annotations() -> None:
    worker = Worker("127.0.0.1:1")

    @worker.task("plain", input_type=empty_pb2.Empty, output_type=empty_pb2.Empty)
    async def handler(request, ctx):  # type: ignore[no-untyped-def]
        return empty_pb2.Empty()

    assert worker.registrations["plain"].input_type is empty_pb2.Empty


def test_missing_annotations_are_a_type_error() -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError, match="no input message type"):

        @worker.task("plain")
        async def handler(request, ctx) -> empty_pb2.Empty:  # type: ignore[no-untyped-def]
            return empty_pb2.Empty()


def test_non_message_annotations_are_a_type_error() -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError, match=r"output type .* must be a generated protobuf message class"):

        @worker.task("plain")  # type: ignore[type-var]
        async def handler(request: empty_pb2.Empty, ctx: TaskContext) -> dict[str, str]:
            return {}


def test_unresolvable_annotations_are_a_type_error() -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError, match="cannot read the annotations"):

        @worker.task("plain")
        async def handler(request: NoSuchMessage, ctx: TaskContext) -> empty_pb2.Empty:  # type: ignore[name-defined]  # noqa: F821
            return empty_pb2.Empty()


def test_sync_handlers_are_a_type_error() -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError, match="must be an async function"):
        worker.add_task("plain", lambda request, ctx: empty_pb2.Empty())  # type: ignore[arg-type, return-value]


def test_handlers_take_request_and_context() -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError, match=r"two positional arguments: \(request, ctx\)"):

        @worker.task("plain")
        async def handler(request: empty_pb2.Empty) -> empty_pb2.Empty:
            return request


def test_duplicate_and_empty_names_are_rejected() -> None:
    worker = build_example_worker("127.0.0.1:1")
    with pytest.raises(ValueError, match="already served"):
        worker.add_task("examples.echo", echo)
    with pytest.raises(ValueError, match="non-empty"):
        worker.add_task(" ", echo)


@pytest.mark.parametrize(
    ("address", "kwargs"),
    [("", {}), ("127.0.0.1:1", {"slots": 0}), ("127.0.0.1:1", {"worker_id": ""}), ([], {})],
)
def test_bad_worker_settings_are_rejected(address: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="Worker"):
        Worker(address, **kwargs)  # type: ignore[arg-type]


def test_worker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        WorkerSettings(heartbeat_interval=2.0, heartbeat_timeout=1.0)


async def test_run_needs_task_types() -> None:
    with pytest.raises(RuntimeError, match="serves no task types"):
        await Worker("127.0.0.1:1").run()


# --- lifecycle without a coordinator ---


async def test_shutdown_before_run_is_safe_twice() -> None:
    worker = build_example_worker("127.0.0.1:1")
    await worker.shutdown()
    await worker.shutdown()
    async with asyncio.timeout(5):
        await worker.run()  # already shut down: returns at once
    with pytest.raises(RuntimeError, match="once"):
        await worker.run()


class _LogWaiter(logging.Handler):
    """Sets an event when a log record contains `text`."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_unreachable_coordinator_is_retried_until_shutdown() -> None:
    waiter = _LogWaiter("reconnect try 3 ")
    logger = logging.getLogger("herder.clients.worker")
    logger.addHandler(waiter)
    try:
        settings = WorkerSettings(backoff=Backoff(initial=0.01, max=0.05), connect_timeout=1.0)
        worker = build_example_worker(f"127.0.0.1:{free_port()}", settings=settings)
        run = asyncio.create_task(worker.run())
        async with asyncio.timeout(10):
            await waiter.seen.wait()
            with pytest.raises(TimeoutError):
                await worker.wait_connected(0.05)
            await worker.shutdown(grace=1.0)
            await run
    finally:
        logger.removeHandler(waiter)
    assert worker.draining
    with pytest.raises(RuntimeError, match="has started"):
        worker.add_task("late", echo)


# --- contexts and handler outcomes ---


async def test_progress_is_validated_and_forwarded() -> None:
    seen: list[tuple[float, str]] = []

    async def sink(fraction: float, message: str) -> None:
        seen.append((fraction, message))

    ctx = TaskContext(_task(), progress_sink=sink)
    await ctx.progress(0.5, "half")
    await ctx.progress(-1)
    with pytest.raises(ValueError, match="progress fraction"):
        await ctx.progress(1.5)
    with pytest.raises(ValueError, match="progress fraction"):
        await ctx.progress(float("nan"))
    assert seen == [(0.5, "half"), (-1, "")]
    assert (ctx.task_id, ctx.attempt, ctx.task_type, dict(ctx.metadata)) == ("t1", 1, "examples.sleep", {"k": "v"})


async def test_cancel_signal_is_truthy_once_set() -> None:
    ctx = TaskContext(_task())
    assert not ctx.cancelled
    ctx.cancelled.set("stop")
    ctx.cancelled.set("later reasons are ignored")
    assert ctx.cancelled and ctx.cancelled.reason == "stop"
    async with asyncio.timeout(1):
        await ctx.cancelled.wait()


def test_cancel_callbacks_run_once_when_set_at_once_when_late_and_not_once_removed() -> None:
    signal = TaskContext(_task()).cancelled
    calls: list[str] = []
    signal.add_callback(lambda: calls.append("first"))
    remove = signal.add_callback(lambda: calls.append("removed"))
    remove()
    remove()  # twice is harmless
    signal.set("stop")
    signal.set("again")
    assert calls == ["first"]
    signal.add_callback(lambda: calls.append("late"))
    assert calls == ["first", "late"]


def test_retry_after_and_non_retryable_errors_carry_their_fields() -> None:
    assert RetryAfter(1.5).message == "retry after 1.5s"
    with pytest.raises(ValueError, match="RetryAfter"):
        RetryAfter(-1)
    assert NonRetryableError("bad").type == "NonRetryableError"
    assert NonRetryableError("bad", type="billing.declined").type == "billing.declined"


async def test_example_echo_returns_its_payload() -> None:
    out = await echo(examples_pb2.EchoRequest(text="hi", attributes={"a": "b"}), TaskContext(_task()))
    assert out == examples_pb2.EchoResponse(text="hi", attributes={"a": "b"})


async def test_example_sleep_reports_each_step() -> None:
    fractions: list[float] = []

    async def sink(fraction: float, message: str) -> None:
        fractions.append(fraction)

    request = examples_pb2.SleepRequest(duration=duration_pb2.Duration(nanos=40_000_000), steps=4)
    out = await sleep(request, TaskContext(_task(), progress_sink=sink))
    assert fractions == [0.25, 0.5, 0.75, 1.0]
    assert out.slept.ToNanoseconds() >= 40_000_000


async def test_example_sleep_rejects_negative_durations() -> None:
    with pytest.raises(NonRetryableError, match="negative"):
        await sleep(examples_pb2.SleepRequest(duration=duration_pb2.Duration(seconds=-1)), TaskContext(_task()))


async def test_example_flaky_fails_its_first_attempts() -> None:
    request = examples_pb2.FlakyRequest(fail_attempts=2)
    for attempt in (1, 2):
        with pytest.raises(FlakyError):
            await flaky(request, TaskContext(_task(attempt)))
    assert (await flaky(request, TaskContext(_task(3)))).attempt == 3


# --- the handler runner: one attempt's outcome ---


def _echo_attempt(handler: Any) -> tuple[_HandlerRunner, TaskContext]:
    """A runner serving examples.echo with `handler`, and a context for one attempt of it."""
    worker = Worker("127.0.0.1:1")
    worker.add_task("examples.echo", handler)
    payload = any_pb2.Any()
    payload.Pack(examples_pb2.EchoRequest(text="hi"))
    task = task_pb2.Task(id="t1", attempt=1, spec=task_pb2.TaskSpec(type="examples.echo", payload=payload))
    return _HandlerRunner(worker.registrations), TaskContext(task)


async def test_runner_turns_each_way_a_handler_ends_into_its_result() -> None:
    started = asyncio.Event()

    async def waits(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        started.set()
        await asyncio.sleep(60)
        return examples_pb2.EchoResponse(text=request.text)

    async def cancels_itself(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        raise asyncio.CancelledError

    async def fails(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        raise NonRetryableError("no", type="app.bad")

    runner, ctx = _echo_attempt(echo)
    output = examples_pb2.EchoResponse()
    (await runner.run(ctx)).output.Unpack(output)
    assert output.text == "hi"

    runner, ctx = _echo_attempt(fails)
    result = await runner.run(ctx)
    assert (result.error.type, result.error.retryable) == ("app.bad", False)

    runner, ctx = _echo_attempt(cancels_itself)  # not cancelled by the worker: a retryable error
    result = await runner.run(ctx)
    assert (result.error.type, result.error.retryable) == ("CancelledError", True)

    runner, ctx = _echo_attempt(waits)  # the cancel signal ends the handler; the attempt says why
    running = asyncio.create_task(runner.run(ctx))
    await started.wait()
    ctx.cancelled.set("operator")
    result = await asyncio.wait_for(running, 10)
    assert result.canceled == "operator"


async def test_cancelling_the_runner_cancels_its_handler() -> None:
    started, ended = asyncio.Event(), asyncio.Event()

    async def waits(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            ended.set()
        return examples_pb2.EchoResponse()

    runner, ctx = _echo_attempt(waits)
    running = asyncio.create_task(runner.run(ctx))
    await started.wait()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.wait_for(ended.wait(), 10)
