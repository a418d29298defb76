"""The supervisor's AttemptRunner: each attempt is one TaskHandlerService.Execute call on the handler service.

The handler is a local service in any language. Its progress messages become the attempt's
progress; its output or error becomes the attempt's result. The attempt's remaining time (the
task's timeout from its assignment) is the call's gRPC deadline, so the supervisor stops a handler
that overruns even when the handler does not. A cancel from the coordinator cancels the call.

Whether the handler answers is probed all along (grpc.health.v1 when it offers it, else Describe);
while it does not, the engine declines new assignments and in-flight calls fail as retryable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import psutil
from google.protobuf import any_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herder.clients import tracing
from herder.clients.backoff import Backoff
from herder.clients.context import TaskContext
from herder.clients.descriptors import caller_metadata
from herder.clients.endpoints import CHANNEL_OPTIONS
from herder.clients.outcomes import (
    BAD_OUTPUT,
    COORDINATOR_ERROR_TYPES,
    HANDLER_DEADLINE_EXCEEDED,
    HANDLER_FAILED,
    HANDLER_NO_RESULT,
    HANDLER_UNAVAILABLE,
    task_error,
)
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, handler_pb2, handler_pb2_grpc, task_pb2

_log = logging.getLogger("herder.supervisor")
# What of a task's stored trace context goes to the handler when this supervisor traces nothing itself.
_TRACE_KEYS = ("traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class HandlerSettings:
    """How the supervisor talks to its handler service.

    - `backoff`: waits between Describe tries at start (Backoff(): 0.1 s doubling to 5 s).
    - `call_timeout`: seconds for one Describe or health check (2).
    - `probe_interval`: seconds between checks that the handler answers (1).
    """

    backoff: Backoff = field(default_factory=Backoff)
    call_timeout: float = 2.0
    probe_interval: float = 1.0


class HandlerRunner:
    """Runs attempts by forwarding them to the TaskHandlerService at `target` (host:port or unix:PATH).

    `on_change(available, why)` is called each time the handler starts or stops answering.
    """

    def __init__(
        self,
        target: str,
        settings: HandlerSettings | None = None,
        on_change: Callable[[bool, str], None] | None = None,
    ) -> None:
        self.target = target
        self._settings = settings or HandlerSettings()
        self._on_change = on_change
        # Herder's channel options: a restarted handler is found again within 2 s, not gRPC's default 2 min.
        self._channel = grpc.aio.insecure_channel(
            target, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors()
        )
        self._stub: handler_pb2_grpc.TaskHandlerServiceAsyncStub = handler_pb2_grpc.TaskHandlerServiceStub(
            self._channel
        )
        self._health: health_pb2_grpc.HealthAsyncStub = health_pb2_grpc.HealthStub(self._channel)
        self._has_health = True
        self._types: dict[str, handler_pb2.HandledType] = {}
        self.available = False
        # The handler's process id as its Describe answer gave it (None: it did not say).
        self.pid: int | None = None
        # Monotonic time the handler stopped answering (or the runner started); None while it answers.
        self.unavailable_since: float | None = time.monotonic()

    async def close(self) -> None:
        await self._channel.close()

    # -- describe and availability -----------------------------------------------------------

    async def describe(self) -> None:
        """Call Describe until the handler answers (backoff between tries; one log line per state).

        Raises ValueError when the handler answers but serves no task types. Cancellable.
        """
        tries = 0
        while True:
            try:
                response = await self._stub.Describe(handler_pb2.DescribeRequest(), timeout=self._settings.call_timeout)
                break
            except grpc.aio.AioRpcError as exc:
                if tries == 0:
                    _log.warning("handler %s does not answer Describe yet (%s); retrying", self.target, _why(exc))
                tries += 1
                await asyncio.sleep(self._settings.backoff.delay(tries))
        if not response.task_types:
            raise ValueError(f"the handler at {self.target} serves no task types (its Describe answer is empty)")
        self._types = {t.name: t for t in response.task_types}
        self.pid = response.pid or None
        self._set_available(True, "Describe answered")
        _log.info("handler %s serves %s", self.target, ", ".join(sorted(self._types)))

    async def watch(self) -> None:
        """Probe the handler every probe_interval until cancelled, reporting each change of state."""
        while True:
            await asyncio.sleep(self._settings.probe_interval)
            up, why = await self._probe()
            # Back after a failure, or restarted between two probes (its pid is gone): maybe a new build.
            if up and (not self.available or (self.pid is not None and not psutil.pid_exists(self.pid))):
                pid = self.pid
                up, why = await self._describe_again()
                if up and self.available and self.pid != pid and self._on_change is not None:
                    _log.info("handler %s restarted: pid %s, was %s", self.target, self.pid, pid)
                    self._on_change(True, "restarted")
            self._set_available(up, why)

    async def _describe_again(self) -> tuple[bool, str]:
        """Describe a handler that came back: it may be a new process (another pid) or a new build."""
        try:
            response = await self._stub.Describe(handler_pb2.DescribeRequest(), timeout=self._settings.call_timeout)
        except grpc.aio.AioRpcError as exc:
            return False, _why(exc)
        self.pid = response.pid or None
        served = sorted(t.name for t in response.task_types)
        if served != sorted(self._types):
            # The session and the registered contracts were made for the types Describe gave at start.
            _log.warning(
                "handler %s now serves %s; this supervisor keeps serving %s (restart it to serve the new set)",
                self.target,
                ", ".join(served) or "nothing",
                ", ".join(sorted(self._types)),
            )
        return True, "Describe answered"

    async def _probe(self) -> tuple[bool, str]:
        timeout = self._settings.call_timeout
        try:
            if self._has_health:
                try:
                    answer = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
                    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
                    return serving, "health: SERVING" if serving else "health: NOT_SERVING"
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self._has_health = False  # no health service there: Describe tells whether it answers
            await self._stub.Describe(handler_pb2.DescribeRequest(), timeout=timeout)
            return True, "Describe answered"
        except grpc.aio.AioRpcError as exc:
            return False, _why(exc)

    def _set_available(self, up: bool, why: str) -> None:
        if up == self.available:
            return
        self.available = up
        self.unavailable_since = None if up else time.monotonic()
        if up:
            _log.info("handler %s answers (%s)", self.target, why)
        else:
            _log.warning("handler %s does not answer (%s)", self.target, why)
        if self._on_change is not None:
            self._on_change(up, why)

    # -- AttemptRunner ----------------------------------------------------------------------

    def task_types(self) -> Sequence[str]:
        return sorted(self._types)

    async def prepare(self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, timeout: float) -> dict[str, int]:
        versions: dict[str, int] = {}
        for handled in self._types.values():
            contract = task_pb2.TaskType(
                name=handled.name,
                input_type=handled.input_type,
                output_type=handled.output_type,
                descriptors=handled.descriptors,
            )
            response = await stub.RegisterTaskType(
                coordinator_pb2.RegisterTaskTypeRequest(task_type=contract),
                timeout=timeout,
                metadata=caller_metadata("supervisor"),
            )
            versions[handled.name] = response.task_type.version
            _log.info(
                "registered task type %s version %d (%s -> %s)",
                handled.name,
                response.task_type.version,
                handled.input_type,
                handled.output_type,
            )
        return versions

    async def run(self, context: TaskContext) -> coordinator_pb2.AttemptResult:
        """Forward the attempt to Execute; cancelling this coroutine or context.cancelled cancels the call."""
        task = context.task
        remaining = _remaining(task)
        if remaining is not None and remaining <= 0:
            return _failed(HANDLER_DEADLINE_EXCEEDED, "the task's timeout passed before the attempt started")
        # The attempt's process span (current here) is the handler's parent, so its spans join the trace;
        # with no tracer set up here, the task's stored context is passed on as it is.
        metadata = tracing.traceparent_metadata() or [
            (key, value) for key, value in task.trace_context.items() if key in _TRACE_KEYS
        ]
        metadata += [("herder-task-id", task.id), ("herder-attempt", str(task.attempt))]
        call = self._stub.Execute(handler_pb2.ExecuteRequest(task=task), timeout=remaining, metadata=metadata)
        # Cancelling the attempt cancels the call (the handler sees it cancelled); a callback rather
        # than a task per attempt waiting for the signal.
        remove = context.cancelled.add_callback(call.cancel)
        try:
            result = await self._consume(call, context, remaining)
        except asyncio.CancelledError:
            call.cancel()
            current = asyncio.current_task()
            if context.cancelled and current is not None and not current.cancelling():
                return coordinator_pb2.AttemptResult(canceled=context.cancelled.reason)  # the call's cancel
            raise
        finally:
            remove()
        if context.cancelled and call.cancelled():
            return coordinator_pb2.AttemptResult(canceled=context.cancelled.reason)
        return result

    async def _consume(
        self,
        call: grpc.aio.UnaryStreamCall[handler_pb2.ExecuteRequest, handler_pb2.ExecuteResponse],
        context: TaskContext,
        remaining: float | None,
    ) -> coordinator_pb2.AttemptResult:
        ref = f"{context.task_id}/{context.attempt}"
        try:
            async for response in call:
                kind = response.WhichOneof("message")
                if kind == "progress":
                    try:
                        await context.progress(response.progress.fraction, response.progress.message)
                    except ValueError as exc:  # the handler's mistake; the attempt goes on
                        _log.warning("attempt %s: progress dropped: %s", ref, exc)
                elif kind == "output":
                    return self._output(context, response.output)
                elif kind == "error":
                    return self._error(response.error)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                text = f"the handler ran past the task's timeout ({remaining or 0:.3g}s left at the start)"
                _log.info("attempt %s: %s", ref, text)
                return _failed(HANDLER_DEADLINE_EXCEEDED, text)
            if code == grpc.StatusCode.UNAVAILABLE:
                self._set_available(False, _why(exc))
                return _failed(HANDLER_UNAVAILABLE, f"the handler at {self.target} is unavailable: {exc.details()}")
            _log.info("attempt %s: Execute failed: %s", ref, _why(exc))
            return _failed(HANDLER_FAILED, f"Execute failed: {_why(exc)}")
        _log.warning("attempt %s: the handler ended Execute without an output or an error", ref)
        return _failed(HANDLER_NO_RESULT, "the handler ended Execute without an output or an error")

    def _output(self, context: TaskContext, output: any_pb2.Any) -> coordinator_pb2.AttemptResult:
        handled = self._types.get(context.task_type)
        if handled is not None and handled.output_type and output.TypeName() != handled.output_type:
            text = f"the handler returned {output.TypeName() or 'an empty Any'}, not {handled.output_type}"
            return coordinator_pb2.AttemptResult(error=task_error(BAD_OUTPUT, text))
        return coordinator_pb2.AttemptResult(output=output)

    def _error(self, error: task_pb2.TaskError) -> coordinator_pb2.AttemptResult:
        if error.type in COORDINATOR_ERROR_TYPES:
            # Only the coordinator sets these; passed on as they are, the coordinator would refuse the result.
            error = task_error(f"handler:{error.type}", error.message, retryable=error.retryable, details=error.details)
        return coordinator_pb2.AttemptResult(error=error)


def _remaining(task: task_pb2.Task) -> float | None:
    """Seconds left of the task's timeout, counted from the assignment as the coordinator counts it."""
    if not task.spec.HasField("timeout"):
        return None
    timeout = task.spec.timeout.ToNanoseconds() / 1e9
    if timeout <= 0:
        return None
    if not task.HasField("assign_time"):
        return timeout
    return task.assign_time.ToNanoseconds() / 1e9 + timeout - time.time()


def _failed(kind: str, text: str) -> coordinator_pb2.AttemptResult:
    return coordinator_pb2.AttemptResult(error=task_error(kind, text, retryable=True))


def _why(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


__all__ = ["HandlerRunner", "HandlerSettings"]
