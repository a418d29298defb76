"""The in-process worker: typed task handlers served over one coordinator session at a time.

```python
worker = Worker("127.0.0.1:50051", slots=8)

@worker.task("examples.echo")
async def echo(request: EchoRequest, ctx: TaskContext) -> EchoResponse:
    return EchoResponse(text=request.text)

await worker.run()  # until worker.shutdown()
```

The Connect protocol itself (sessions, acknowledgements, re-claims, result re-sending,
reconnects, staged shutdown) is the SessionEngine's (`engine.py`); this module is the
handler API and the AttemptRunner that calls Python handlers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import traceback
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from google.protobuf import any_pb2, duration_pb2, message

from herder.clients import logs
from herder.clients.context import CancelSignal, ProgressSink, TaskContext
from herder.clients.descriptors import caller_metadata, task_type_for
from herder.clients.endpoints import Endpoints
from herder.clients.engine import SHUTDOWN_REASON, SessionEngine, WorkerSettings
from herder.clients.outcomes import BAD_OUTPUT, BAD_PAYLOAD, CUT, task_error
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop
from herder.clients.worker_config import worker_arguments, worker_settings

_log = logging.getLogger(__name__)

_MAX_DETAILS = 8000

Handler = Callable[[Any, "TaskContext"], Awaitable[message.Message]]
_H = TypeVar("_H", bound=Callable[..., Awaitable[message.Message]])


class RetryAfter(Exception):
    """Raise from a handler to fail this attempt and ask for the next one no sooner than `seconds` from now.

    Reported as a retryable TaskError (type "RetryAfter") with `retry_after`; the task's retry
    policy still decides whether another attempt is left.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"RetryAfter needs a finite number of seconds >= 0, got {seconds}")
        super().__init__(message or f"retry after {seconds:g}s")
        self.seconds = seconds
        self.message = message or f"retry after {seconds:g}s"


class NonRetryableError(Exception):
    """Raise from a handler to fail the task at once, without further attempts.

    `type` becomes TaskError.type (the class name when empty); `details` is attached as is.
    """

    def __init__(self, message: str, *, type: str = "", details: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.__class__.__name__
        self.details = details


@dataclass(frozen=True, slots=True)
class TaskRegistration:
    """One served task type: its handler and its typed contract (`contract` is what is registered)."""

    name: str
    handler: Handler
    input_type: type[message.Message]
    output_type: type[message.Message]
    description: str
    contract: task_pb2.TaskType = field(repr=False, compare=False)


class Worker:
    """Serves registered task types: one session with the coordinator, one asyncio task per attempt.

    `address` is the coordinator ("host:port"), or several replicas (a comma-separated string or
    a sequence; None reads HERDER_COORDINATOR) tried in turn, a host name standing for every
    address it resolves to; a follower's redirect to the leader is followed (see `endpoints`).
    `worker_id` defaults to host-pid-random, stable for the life of this object. At most `slots`
    handlers run at once: the coordinator never sends more than the free slots, and an assignment
    beyond them is not acknowledged, so the coordinator re-queues it after its ack timeout.
    `capacity` is what this worker offers to tasks' resource requests (say its container's limits,
    `Resources(cpu_millis=2000, memory_bytes=4 << 30)`); a field left 0 comes from the node's
    resource samples (all its cores, all its memory). See README "Placement".
    """

    def __init__(
        self,
        address: str | Sequence[str] | None,
        *,
        worker_id: str | None = None,
        slots: int = 8,
        labels: Mapping[str, str] | None = None,
        settings: WorkerSettings | None = None,
        capacity: task_pb2.Resources | None = None,
    ) -> None:
        try:
            endpoints = Endpoints(address)
        except ValueError as exc:
            raise ValueError(f"Worker: {exc}") from None
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"Worker slots must be an integer >= 1, got {slots!r}")
        if worker_id is not None and not worker_id.strip():
            raise ValueError("Worker worker_id must not be empty (leave it None for a generated one)")
        self._registrations: dict[str, TaskRegistration] = {}
        self._engine = SessionEngine(
            endpoints,
            _HandlerRunner(self._registrations),
            worker_id=worker_id,
            slots=slots,
            labels=labels,
            settings=settings,
            logger=_log,
            capacity=capacity,
        )
        self._run_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config_file: str | None = None, *, labels: Mapping[str, str] | None = None) -> Worker:
        """A Worker configured by HERDER_* variables (HERDER_COORDINATOR, HERDER_SLOTS, ...), else the
        [worker] table of `config_file` (default: the file HERDER_CONFIG names), else the defaults.

        Raises herder.clients.settings.SettingsError (a ValueError) naming a bad setting and its source.
        """
        return cls(**worker_arguments(worker_settings(config_file=config_file)), labels=labels)

    # -- registration -------------------------------------------------------------------

    def task(
        self,
        name: str,
        *,
        input_type: type[message.Message] | None = None,
        output_type: type[message.Message] | None = None,
        description: str = "",
    ) -> Callable[[_H], _H]:
        """Decorator serving an `async def handler(request, ctx) -> output` as task type `name`.

        Input and output message classes come from the handler's annotations unless given.
        Raises TypeError at decoration time when they cannot be determined or are not protobuf
        message classes, or the handler is not an async function taking (request, ctx); ValueError
        for an empty or duplicate name; RuntimeError once the worker has started.
        """

        def register(handler: _H) -> _H:
            self.add_task(name, handler, input_type=input_type, output_type=output_type, description=description)
            return handler

        return register

    def add_task(
        self,
        name: str,
        handler: Callable[..., Awaitable[message.Message]],
        *,
        input_type: type[message.Message] | None = None,
        output_type: type[message.Message] | None = None,
        description: str = "",
    ) -> TaskRegistration:
        """Serve `handler` as task type `name`; the non-decorator form of `task()`, same errors."""
        if self._engine.started:
            raise RuntimeError(f"cannot add task type {name!r}: the worker has started (add handlers before run())")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"task type name must be a non-empty string, got {name!r}")
        if name in self._registrations:
            raise ValueError(f"task type {name!r} is already served by {_describe(self._registrations[name].handler)}")
        input_cls, output_cls = _message_types(name, handler, input_type, output_type)
        registration = TaskRegistration(
            name=name,
            handler=handler,
            input_type=input_cls,
            output_type=output_cls,
            description=description,
            contract=task_type_for(name, input_cls, output_cls, description=description),
        )
        self._registrations[name] = registration
        return registration

    # -- state --------------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self._engine.worker_id

    @property
    def slots(self) -> int:
        return self._engine.slots

    @property
    def registrations(self) -> Mapping[str, TaskRegistration]:
        return dict(self._registrations)

    @property
    def session_id(self) -> str | None:
        """The open session's id; None while disconnected."""
        return self._engine.session_id

    @property
    def running(self) -> int:
        """Attempts this worker holds: running, or with a result not yet acknowledged."""
        return self._engine.running

    @property
    def draining(self) -> bool:
        return self._engine.draining

    async def wait_connected(self, timeout: float) -> None:
        """Return once a session is open (welcome received); TimeoutError after `timeout` seconds."""
        await self._engine.wait_connected(timeout)

    # -- running ------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Register the task types, connect, and serve until shutdown() completes.

        With `install_signal_handlers`, SIGINT and SIGTERM start shutdown(); a second signal
        cancels running handlers at once. A failing stream is reconnected with backoff, for ever.
        Logs (logger herder.clients.worker) when it connects, reconnects and stops; with no logging
        configured at all, those lines go to stderr at INFO (herder.clients.logs.show_when_unconfigured).
        Raises RuntimeError when called twice or with no task types, and the HerderError of a
        rejection retrying cannot fix (InvalidArgumentError for a conflicting task type, ...).
        On failure or cancellation, handlers still running are cancelled without reporting (the
        coordinator re-queues them after the heartbeat timeout) and the stream is closed.
        """
        if self._engine.started:
            raise RuntimeError("Worker.run() may be called only once")
        if not self._registrations:
            raise RuntimeError("the worker serves no task types: add handlers with @worker.task(...) before run()")
        logs.show_when_unconfigured()  # connects, reconnects and stops are worth seeing with no logging set up
        await self._engine.run(install_signal_handlers=install_signal_handlers)

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop and return once run() has returned: no new tasks, running handlers get `grace` seconds
        (settings.shutdown_grace when None), the rest are cancelled and re-queued, the last results are
        delivered (the steps are `SessionEngine.shutdown`'s). Safe to call twice or concurrently."""
        await self._engine.shutdown(grace)

    async def __aenter__(self) -> Worker:
        """Start run() in the background; leaving the block shuts down and raises what run() raised."""
        self._run_task = asyncio.create_task(self.run(), name=f"herder-worker {self.worker_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()
        if self._run_task is not None:
            await self._run_task


class _HandlerRunner:
    """Runs attempts by calling the registered Python handler of the task's type."""

    def __init__(self, registrations: Mapping[str, TaskRegistration]) -> None:
        self._registrations = registrations

    def task_types(self) -> Sequence[str]:
        return list(self._registrations)

    async def prepare(self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, timeout: float) -> dict[str, int]:
        versions: dict[str, int] = {}
        for registration in self._registrations.values():
            request = coordinator_pb2.RegisterTaskTypeRequest(task_type=registration.contract)
            response = await stub.RegisterTaskType(request, timeout=timeout, metadata=caller_metadata("worker"))
            versions[registration.name] = response.task_type.version
            _log.info(
                "registered task type %s version %d (%s -> %s)",
                registration.name,
                response.task_type.version,
                registration.contract.input_type,
                registration.contract.output_type,
            )
        return versions

    async def run(self, context: TaskContext) -> coordinator_pb2.AttemptResult:
        task = context.task
        registration = self._registrations[task.spec.type]
        result = coordinator_pb2.AttemptResult()
        expected = registration.input_type.DESCRIPTOR.full_name
        if task.spec.payload.TypeName() != expected:
            got = task.spec.payload.TypeName() or "no payload"
            result.error.CopyFrom(
                task_error(BAD_PAYLOAD, f"task type {registration.name} expects {expected}, got {got}")
            )
            return result
        request = registration.input_type()
        try:
            task.spec.payload.Unpack(request)
        except message.DecodeError as exc:
            result.error.CopyFrom(task_error(BAD_PAYLOAD, f"cannot decode the {expected} payload: {exc}"))
            return result

        handler = asyncio.create_task(_invoke(registration, request, context))
        # A cancel reaches the handler as CancelledError at its next await, through a callback rather
        # than a second task waiting on the signal for every attempt.
        stop_watching = context.cancelled.add_callback(handler.cancel)
        try:
            await handler
        except (Exception, asyncio.CancelledError):
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                handler.cancel()  # this runner is cancelled (abandoned), not just the handler
                raise
            # Otherwise it is the handler's own outcome, read from the task below.
        finally:
            stop_watching()
        return _result_of(registration, context, handler, result)


def run_worker(worker: Worker) -> None:
    """Run `worker` in a new event loop until SIGINT or SIGTERM has shut it down gracefully.

    Blocks. A second signal cancels running handlers without waiting for the grace period.
    Raises what Worker.run() raises.
    """
    run_loop(worker.run(install_signal_handlers=True))


async def _invoke(registration: TaskRegistration, request: message.Message, ctx: TaskContext) -> message.Message:
    """The handler call; the engine's process span for the attempt is current (see herder.clients.tracing)."""
    return await registration.handler(request, ctx)


def _result_of(
    registration: TaskRegistration,
    ctx: TaskContext,
    handler: asyncio.Task[message.Message],
    result: coordinator_pb2.AttemptResult,
) -> coordinator_pb2.AttemptResult:
    """The AttemptResult for a finished handler task."""
    ref = (ctx.task_id, ctx.attempt)
    exc = None if handler.cancelled() else handler.exception()
    if not handler.cancelled() and exc is None:
        output = handler.result()
        if not isinstance(output, registration.output_type):
            expected = registration.output_type.DESCRIPTOR.full_name
            result.error.CopyFrom(
                task_error(BAD_OUTPUT, f"the handler returned {type(output).__name__}, not {expected}", retryable=False)
            )
            return result
        packed = any_pb2.Any()
        packed.Pack(output)
        result.output.CopyFrom(packed)
        return result
    if ctx.cancelled:
        # Whatever the handler raised on its way out, the attempt ended because it was cancelled.
        result.canceled = ctx.cancelled.reason
        return result
    if exc is None:  # cancelled from inside the handler, not by us
        result.error.CopyFrom(task_error("CancelledError", "the handler was cancelled", retryable=True))
    elif isinstance(exc, RetryAfter):
        _log.info("attempt %s/%d asks for a retry after %gs: %s", *ref, exc.seconds, exc.message)
        result.error.CopyFrom(task_error(type(exc).__name__, exc.message, retryable=True))
        result.retry_after.CopyFrom(_duration(exc.seconds))
    elif isinstance(exc, NonRetryableError):
        _log.info("attempt %s/%d failed for good: %s: %s", *ref, exc.type, exc.message)
        result.error.CopyFrom(task_error(exc.type, exc.message, retryable=False, details=exc.details))
    else:
        _log.warning("attempt %s/%d failed: %s: %s", *ref, type(exc).__name__, exc, exc_info=exc)
        details = _traceback_text(exc)
        result.error.CopyFrom(task_error(type(exc).__name__, str(exc), retryable=True, details=details))
    return result


def _traceback_text(exc: BaseException) -> str:
    """The formatted traceback, its tail kept within _MAX_DETAILS; each part (a frame, the final line
    repeating the message) is cut to a share of it, so a huge message cannot push the frames out."""
    parts = traceback.format_exception(exc)
    share = _MAX_DETAILS // 4
    text = "".join(part if len(part) <= share else part[:share] + CUT + "\n" for part in parts)
    return text if len(text) <= _MAX_DETAILS else CUT + text[-_MAX_DETAILS:]


def _message_types(
    name: str,
    handler: Callable[..., Awaitable[message.Message]],
    input_type: type[message.Message] | None,
    output_type: type[message.Message] | None,
) -> tuple[type[message.Message], type[message.Message]]:
    """The handler's input and output message classes, from the arguments or its annotations."""
    what = f"handler {_describe(handler)} of task type {name!r}"
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"{what} must be an async function (async def)")
    try:
        inspect.signature(handler).bind(None, None)
    except TypeError:
        raise TypeError(f"{what} must take two positional arguments: (request, ctx)") from None
    except ValueError:  # no signature to inspect (a builtin); assume it fits
        pass
    found: list[Any] = [input_type, output_type]
    if input_type is None or output_type is None:
        try:
            hints = typing.get_type_hints(handler)
        except Exception as exc:
            raise TypeError(
                f"cannot read the annotations of {what} ({exc}); pass input_type= and output_type="
            ) from exc
        if input_type is None:
            parameters = list(inspect.signature(handler).parameters.values())
            found[0] = hints.get(parameters[0].name) if parameters else None
        if output_type is None:
            found[1] = hints.get("return")
    for index, role in enumerate(("input", "output")):
        cls = found[index]
        if cls is None:
            where = "its first parameter" if role == "input" else "its return type"
            raise TypeError(f"{what} has no {role} message type: annotate {where} or pass {role}_type=")
        if not (isinstance(cls, type) and issubclass(cls, message.Message) and hasattr(cls, "DESCRIPTOR")):
            raise TypeError(f"the {role} type of {what} must be a generated protobuf message class, got {cls!r}")
    return found[0], found[1]


def _describe(handler: object) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


__all__ = [
    "BAD_OUTPUT",
    "BAD_PAYLOAD",
    "SHUTDOWN_REASON",
    "CancelSignal",
    "Handler",
    "NonRetryableError",
    "ProgressSink",
    "RetryAfter",
    "TaskContext",
    "TaskRegistration",
    "Worker",
    "WorkerSettings",
    "run_worker",
]
