"""The in-process worker: typed task handlers served over one coordinator session at a time.

```python
worker = Worker("127.0.0.1:50051", slots=8)

@worker.task("examples.echo")
async def echo(request: EchoRequest, ctx: TaskContext) -> EchoResponse:
    return EchoResponse(text=request.text)

await worker.run()  # until worker.shutdown()
```

The session follows the Connect protocol: hello, welcome, then assignments
(acknowledged at once), progress, results and heartbeats on one stream, written by
one writer task: acknowledgements and results that pile up while it writes go out
together in one message. When the stream fails the worker reconnects with backoff
and re-claims what it still runs; results the coordinator has not acknowledged are
kept and sent again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import math
import os
import signal
import socket
import traceback
import typing
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, message, timestamp_pb2
from opentelemetry import propagate, trace

from herder.clients import errors, outcomes
from herder.clients.backoff import Backoff
from herder.clients.descriptors import task_type_for
from herder.clients.endpoints import Endpoints, open_channel
from herder.clients.outcomes import BAD_OUTPUT, BAD_PAYLOAD, RESULT_TOO_LARGE
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop

_log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)

# The canceled reason of attempts stopped by shutdown; the coordinator re-queues them.
SHUTDOWN_REASON = "worker shutdown"
# TaskError types the worker itself reports.

# Errors that retrying the same request cannot fix: run() stops and raises them.
_FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
_MAX_DETAILS = 8000

_Ref = tuple[str, int]
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


class CancelSignal:
    """Whether the attempt is being cancelled: truthy once it is, with `reason` saying why.

    The handler's coroutine is also cancelled (CancelledError at its next await); this lets a
    handler that loops without awaiting, or runs cleanup, check for it or `await ctx.cancelled.wait()`.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason = ""

    def __bool__(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once the attempt is cancelled; cancelling the wait leaves the signal as it is."""
        await self._event.wait()

    def set(self, reason: str) -> None:
        """Mark the attempt cancelled (the first reason wins)."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()


ProgressSink = Callable[[float, str], Awaitable[None]]


class TaskContext:
    """What a handler knows about the attempt it runs, and how it reports progress.

    `task` is the full Task as assigned; `cancelled` turns true when the coordinator cancels the
    attempt or the worker shuts down past its grace period. Build one with just a Task to call a
    handler directly in a test (progress is then dropped).
    """

    def __init__(self, task: task_pb2.Task, *, progress_sink: ProgressSink | None = None) -> None:
        self.task = task
        self.cancelled = CancelSignal()
        self.metadata: Mapping[str, str] = dict(task.spec.metadata)
        self._progress_sink = progress_sink

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def attempt(self) -> int:
        """1 for the first attempt."""
        return self.task.attempt

    @property
    def task_type(self) -> str:
        return self.task.spec.type

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report progress: `fraction` 0..1 done (negative when unknown) and a short message.

        Best effort: dropped while the worker is disconnected, never raises because of the
        connection. Raises ValueError for a fraction above 1 or NaN, or a message too long to store
        (the welcome's max_progress_bytes, 16 KiB by default).
        """
        if math.isnan(fraction) or fraction > 1:
            raise ValueError(f"progress fraction must be <= 1 (negative for unknown), got {fraction}")
        if self._progress_sink is not None:
            await self._progress_sink(fraction, message)


@dataclass(frozen=True, slots=True)
class TaskRegistration:
    """One served task type: its handler and its typed contract (`contract` is what is registered)."""

    name: str
    handler: Handler
    input_type: type[message.Message]
    output_type: type[message.Message]
    description: str
    contract: task_pb2.TaskType = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a Worker connects, waits and shuts down; the defaults suit most services.

    - `backoff`: waits between reconnect tries (Backoff(): 0.1 s doubling to 5 s, 20 % jitter).
    - `connect_timeout`: seconds for registering task types and for the welcome to arrive (10).
    - `shutdown_grace`: seconds shutdown() lets running handlers finish when no grace is given (10).
    - `cancel_timeout`: seconds to wait for cancelled handlers to stop before giving up on them (5).
    - `result_ack_timeout`: seconds shutdown() waits for the last results to be acknowledged (5).
    - `heartbeat_interval`, `heartbeat_timeout`: used only when the welcome leaves them unset (1, 5).
    """

    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 10.0
    shutdown_grace: float = 10.0
    cancel_timeout: float = 5.0
    result_ack_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "cancel_timeout", "result_ack_timeout", "heartbeat_interval"):
            if not getattr(self, name) > 0:
                raise ValueError(f"WorkerSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_grace < 0:
            raise ValueError(f"WorkerSettings.shutdown_grace must be >= 0, got {self.shutdown_grace}")
        if self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("WorkerSettings.heartbeat_timeout must be longer than heartbeat_interval")


class _StreamLost(errors.UnavailableError):
    """The session's stream ended or went silent; the worker reconnects."""


@dataclass(eq=False)
class _Attempt:
    ref: _Ref
    task: task_pb2.Task
    registration: TaskRegistration
    context: TaskContext
    runner: asyncio.Task[None] | None = None
    handler: asyncio.Task[message.Message] | None = None
    # Kept until the coordinator acknowledges it, across reconnects.
    result: coordinator_pb2.AttemptResult | None = None
    # Session the result was last written to; resent on a newer session.
    result_sent_in: str = ""
    # No longer this worker's (rejected on reconnect): never reported.
    abandoned: bool = False


# What waits for the session's writer: a result, or a message (None: the half-close) and whether it was written.
_Outgoing = _Attempt | tuple[coordinator_pb2.ConnectRequest | None, asyncio.Future[bool]]


class _Session:
    """One open Connect stream after its welcome, written by one writer task.

    Acknowledgements and results wait in the session, and each write drains what has piled up into
    one AssignmentAck or one AttemptResults: a lone message goes out at once, and batches form only
    while a write is in progress (under load, one write carries many). Pending acknowledgements go
    before anything else, so the coordinator sees an attempt's ack before its progress and result;
    everything else keeps the order it was queued in. Handlers never write themselves, so cancelling
    one cannot cancel the call (grpc cancels a call whose write is cancelled).
    """

    def __init__(
        self,
        call: grpc.aio.StreamStreamCall[coordinator_pb2.ConnectRequest, coordinator_pb2.ConnectResponse],
        welcome: coordinator_pb2.Welcome,
        address: str,
        settings: WorkerSettings,
    ) -> None:
        self.call = call
        self.address = address
        self.session_id = welcome.session_id
        self.heartbeat_interval = _seconds(welcome.heartbeat_interval) or settings.heartbeat_interval
        self.heartbeat_timeout = _seconds(welcome.heartbeat_timeout) or settings.heartbeat_timeout
        self._acks: list[coordinator_pb2.AttemptRef] = []
        # Messages, results (_Attempt) and the half-close (None), in the order they were queued.
        self._queue: collections.deque[_Outgoing] = collections.deque()
        self._wake = asyncio.Event()
        self._open = True
        self._writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Session:
        self._writer = asyncio.create_task(self._write_loop(), name=f"herder-writer {self.session_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """End the call and the writer; whatever was still queued counts as not sent."""
        self.call.cancel()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer})
        self._fail_queued()

    def ack(self, ref: _Ref) -> None:
        """Queue an assignment's acknowledgement (dropped when the stream is gone: the ack timeout re-queues it)."""
        if self._open:
            self._acks.append(_ref_proto(ref))
            self._wake.set()

    def send_result(self, attempt: _Attempt) -> bool:
        """Queue the attempt's result; False when the stream is gone.

        If the write fails, attempt.result_sent_in is cleared again, so a later session resends it.
        """
        if not self._open:
            return False
        self._queue.append(attempt)
        self._wake.set()
        return True

    async def send(self, request: coordinator_pb2.ConnectRequest) -> bool:
        """Write one message (progress, heartbeat) in turn; False when the stream is gone.

        Cancelling the caller withdraws the message if it has not been written yet.
        """
        if not self._open:
            return False
        written: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((request, written))
        self._wake.set()
        return await written

    async def close(self) -> None:
        """Half-close after what is queued: the coordinator sees the end of the stream and closes its side."""
        if not self._open:
            return
        closed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append((None, closed))
        self._wake.set()
        await closed

    async def _write_loop(self) -> None:
        try:
            while self._open:
                await self._wake.wait()
                self._wake.clear()
                while self._open and (self._acks or self._queue):
                    await self._write_next()
        except Exception:
            _log.exception("session %s: the writer failed; ending the stream", self.session_id)
            self.call.cancel()  # the read loop ends and the worker reconnects
        finally:
            self._fail_queued()

    async def _write_next(self) -> None:
        if self._acks:
            refs, self._acks = self._acks, []
            await self._write(coordinator_pb2.ConnectRequest(ack=coordinator_pb2.AssignmentAck(refs=refs)))
            return
        head = self._queue.popleft()
        if isinstance(head, _Attempt):
            attempts = [head]
            while self._queue and isinstance(following := self._queue[0], _Attempt):
                attempts.append(following)
                self._queue.popleft()
            results = coordinator_pb2.AttemptResults(results=[a.result for a in attempts if a.result is not None])
            written = False
            try:
                written = await self._write(coordinator_pb2.ConnectRequest(results=results))
            finally:
                if not written:
                    self._unsent(attempts)
            return
        request, done = head
        if done.done():
            return  # the sender stopped waiting: withdrawn
        written = False
        try:
            if request is not None:
                written = await self._write(request)
            else:
                self._open = False
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self.call.done_writing()
                written = True
        finally:
            if not done.done():
                done.set_result(written)

    async def _write(self, request: coordinator_pb2.ConnectRequest) -> bool:
        """Write one message; a failure means the stream is gone, and nothing more is written."""
        try:
            if not self.call.done():
                await self.call.write(request)
                return True
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # The call was cancelled (an abandoned stream), not the writer.
        self._open = False
        return False

    def _fail_queued(self) -> None:
        self._open = False
        self._acks.clear()
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, _Attempt):
                self._unsent([item])
            elif not item[1].done():
                item[1].set_result(False)

    def _unsent(self, attempts: Iterable[_Attempt]) -> None:
        for attempt in attempts:
            if attempt.result_sent_in == self.session_id:
                attempt.result_sent_in = ""


class Worker:
    """Serves registered task types: one session with the coordinator, one asyncio task per attempt.

    `address` is the coordinator ("host:port"), or several replicas (a comma-separated string or
    a sequence; None reads HERDER_COORDINATOR) tried in turn, a host name standing for every
    address it resolves to; a follower's redirect to the leader is followed (see `endpoints`).
    `worker_id` defaults to host-pid-random, stable for the life of this object. At most `slots`
    handlers run at once: the coordinator never sends more than the free slots, and an assignment
    beyond them is not acknowledged, so the coordinator re-queues it after its ack timeout.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None,
        *,
        worker_id: str | None = None,
        slots: int = 8,
        labels: Mapping[str, str] | None = None,
        settings: WorkerSettings | None = None,
    ) -> None:
        try:
            endpoints = Endpoints(address)
        except ValueError as exc:
            raise ValueError(f"Worker: {exc}") from None
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"Worker slots must be an integer >= 1, got {slots!r}")
        if worker_id is not None and not worker_id.strip():
            raise ValueError("Worker worker_id must not be empty (leave it None for a generated one)")
        self._endpoints = endpoints
        self._worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._slot_count = slots
        self._labels = dict(labels or {})
        self._settings = settings or WorkerSettings()
        self._registrations: dict[str, TaskRegistration] = {}

        self._attempts: dict[_Ref, _Attempt] = {}
        self._slots = asyncio.Semaphore(slots)
        self._session: _Session | None = None
        self._registered = False
        self._tries = 0
        self._welcomed_at: float | None = None
        # What the coordinator stores (from the last welcome): bigger results are refused here, before sending.
        self._max_result_bytes = outcomes.DEFAULT_MAX_RESULT_BYTES
        self._max_error_bytes = outcomes.DEFAULT_MAX_ERROR_BYTES
        self._max_progress_bytes = outcomes.DEFAULT_MAX_PROGRESS_BYTES
        self._just_redirected = False

        self._started = False
        self._draining = False
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._closed = asyncio.Event()
        self._connected = asyncio.Event()
        self._no_attempts = asyncio.Event()
        self._no_attempts.set()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._run_task: asyncio.Task[None] | None = None

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
        if self._started:
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
        return self._worker_id

    @property
    def slots(self) -> int:
        return self._slot_count

    @property
    def registrations(self) -> Mapping[str, TaskRegistration]:
        return dict(self._registrations)

    @property
    def session_id(self) -> str | None:
        """The open session's id; None while disconnected."""
        return self._session.session_id if self._session is not None else None

    @property
    def running(self) -> int:
        """Attempts this worker holds: running, or with a result not yet acknowledged."""
        return sum(1 for a in self._attempts.values() if not a.abandoned)

    @property
    def draining(self) -> bool:
        return self._draining

    async def wait_connected(self, timeout: float) -> None:
        """Return once a session is open (welcome received); TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # -- running ------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Register the task types, connect, and serve until shutdown() completes.

        With `install_signal_handlers`, SIGINT and SIGTERM start shutdown(); a second signal
        cancels running handlers at once. A failing stream is reconnected with backoff, for ever.
        Raises RuntimeError when called twice or with no task types, and the HerderError of a
        rejection retrying cannot fix (InvalidArgumentError for a conflicting task type, ...).
        On failure or cancellation, handlers still running are cancelled without reporting (the
        coordinator re-queues them after the heartbeat timeout) and the stream is closed.
        """
        if self._started:
            raise RuntimeError("Worker.run() may be called only once")
        if not self._registrations:
            raise RuntimeError("the worker serves no task types: add handlers with @worker.task(...) before run()")
        self._started = True
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop) if install_signal_handlers else []
        try:
            await self._serve()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self._abandon_all()
            self._closed.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop in fixed steps and return once run() has returned.

        1. Stop taking tasks: heartbeats say draining, new assignments are not acknowledged.
        2. Let running handlers finish within `grace` seconds (settings.shutdown_grace when None).
        3. Cancel the rest; they are reported with canceled="worker shutdown", so the coordinator
           re-queues them as new attempts (not counted as failures).
        4. Wait up to settings.result_ack_timeout for the last results to be acknowledged.
        5. Close the stream.
        Safe to call twice or concurrently: later calls wait for the first. Cancelling the caller
        does not stop the shutdown, which goes on in the background.
        """
        if grace is not None and grace < 0:
            raise ValueError(f"shutdown grace must be >= 0, got {grace}")
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(
                self._shut_down(self._settings.shutdown_grace if grace is None else grace),
                name=f"herder-worker-shutdown {self._worker_id}",
            )
        await asyncio.shield(self._shutdown_task)

    async def __aenter__(self) -> Worker:
        """Start run() in the background; leaving the block shuts down and raises what run() raised."""
        self._run_task = asyncio.create_task(self.run(), name=f"herder-worker {self._worker_id}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.shutdown()
        if self._run_task is not None:
            await self._run_task

    # -- session loop -------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                address = await self._endpoints.target()
                session = asyncio.create_task(self._run_session(address), name=f"herder-session {address}")
                try:
                    await asyncio.wait({session, stop}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    session.cancel()
                    await asyncio.wait({session})
                    raise
                if not session.done():
                    await self._close_session(session)
                    return
                failure = session.exception()
                if failure is None:
                    failure = _StreamLost("the session ended")
                redirected = self._next_address(address, failure)
                if not isinstance(failure, errors.HerderError) or _is_fatal(failure):
                    _log.error("worker %s: %s rejected the session: %s", self._worker_id, address, failure)
                    raise failure
                if redirected and not self._just_redirected:
                    # A replica named the leader: go there now, not after a backoff grown while no one led
                    # (a failover). Only once in a row, so replicas naming each other cannot spin.
                    self._just_redirected = True
                    continue
                self._just_redirected = False
                if self._welcomed_at is not None and loop.time() - self._welcomed_at >= self._settings.backoff.max:
                    self._tries = 0  # a session that lasted is a fresh start, not one more failed try
                self._welcomed_at = None
                self._tries += 1
                delay = self._settings.backoff.delay(self._tries)
                _log.warning(
                    "worker %s: session with %s failed (%s); reconnect try %d in %.2fs",
                    self._worker_id,
                    address,
                    failure,
                    self._tries,
                    delay,
                )
                await asyncio.wait({stop}, timeout=delay)
        finally:
            stop.cancel()

    def _next_address(self, address: str, failure: BaseException) -> bool:
        """Where to connect next; True when `address` named another replica as the leader."""
        redirected = self._endpoints.failed(address, failure)
        if redirected:
            _log.info(
                "worker %s: %s is not the leader; following %s", self._worker_id, address, self._endpoints.current
            )
        return redirected

    async def _close_session(self, session_task: asyncio.Task[None]) -> None:
        session = self._session
        if session is not None:
            await session.close()
            # Let the coordinator end the stream itself, so it sees a clean close.
            await asyncio.wait({session_task}, timeout=1.0)
        session_task.cancel()
        await asyncio.wait({session_task})
        if not session_task.cancelled():
            session_task.exception()  # retrieved: the stream ending after our close is expected

    async def _run_session(self, address: str) -> None:
        """One stream from hello to its end; always ends by raising why it ended."""
        # Its own channel per session (not the shared cache): closing it ends every call of the session.
        channel = open_channel(address)
        try:
            stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(
                channel
            )
            try:
                if not self._registered:
                    await self._register(stub)
                call = stub.Connect()
                welcome = await self._hello(call)
                async with _Session(call, welcome, address, self._settings) as session:
                    self._session = session
                    self._welcomed_at = asyncio.get_running_loop().time()
                    self._connected.set()
                    _log.info(
                        "worker %s connected to %s (session %s, %d reclaimed, %d rejected)",
                        self._worker_id,
                        address,
                        session.session_id,
                        len(welcome.reclaimed),
                        len(welcome.rejected),
                    )
                    heartbeats = asyncio.create_task(self._heartbeat_loop(session))
                    try:
                        self._on_welcome(welcome)
                        await self._read_loop(session)
                    finally:
                        heartbeats.cancel()
                        await asyncio.wait({heartbeats})
            except grpc.aio.AioRpcError as exc:
                raise errors.from_rpc_error(exc) from exc
        finally:
            self._session = None
            self._connected.clear()
            await channel.close()

    async def _register(self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub) -> None:
        for registration in self._registrations.values():
            request = coordinator_pb2.RegisterTaskTypeRequest(task_type=registration.contract)
            await stub.RegisterTaskType(request, timeout=self._settings.connect_timeout)
            _log.info(
                "registered task type %s (%s -> %s)",
                registration.name,
                registration.contract.input_type,
                registration.contract.output_type,
            )
        self._registered = True

    async def _hello(
        self, call: grpc.aio.StreamStreamCall[coordinator_pb2.ConnectRequest, coordinator_pb2.ConnectResponse]
    ) -> coordinator_pb2.Welcome:
        hello = coordinator_pb2.WorkerHello(
            worker_id=self._worker_id,
            task_types=list(self._registrations),
            slots=self._slot_count,
            running=[_ref_proto(ref) for ref, a in self._attempts.items() if not a.abandoned],
            labels=self._labels,
        )
        try:
            await call.write(coordinator_pb2.ConnectRequest(hello=hello))
            first = await asyncio.wait_for(call.read(), timeout=self._settings.connect_timeout)
        except asyncio.InvalidStateError:
            await call.read()  # the call already ended: raises its status
            raise _StreamLost("the stream ended before the welcome") from None
        except TimeoutError:
            call.cancel()
            raise _StreamLost(f"no welcome within {self._settings.connect_timeout:g}s") from None
        if not isinstance(first, coordinator_pb2.ConnectResponse):
            raise _StreamLost("the coordinator closed the stream before the welcome")
        if not first.HasField("welcome"):
            call.cancel()
            raise _StreamLost(f"protocol error: expected a welcome, got {first.WhichOneof('message')}")
        return first.welcome

    def _on_welcome(self, welcome: coordinator_pb2.Welcome) -> None:
        self._max_result_bytes = welcome.max_result_bytes or outcomes.DEFAULT_MAX_RESULT_BYTES
        self._max_error_bytes = welcome.max_error_bytes or outcomes.DEFAULT_MAX_ERROR_BYTES
        self._max_progress_bytes = welcome.max_progress_bytes or outcomes.DEFAULT_MAX_PROGRESS_BYTES
        reclaimed = {(r.task_id, r.attempt) for r in welcome.reclaimed}
        for ref, attempt in list(self._attempts.items()):
            if ref not in reclaimed and not attempt.abandoned:
                _log.info("attempt %s/%d is no longer this worker's; dropping it", *ref)
                self._abandon(attempt)
        for attempt in list(self._attempts.values()):
            self._send_result(attempt)

    async def _heartbeat_loop(self, session: _Session) -> None:
        while True:
            await session.send(
                coordinator_pb2.ConnectRequest(heartbeat=coordinator_pb2.Heartbeat(draining=self._draining))
            )
            await asyncio.sleep(session.heartbeat_interval)

    async def _read_loop(self, session: _Session) -> None:
        while True:
            try:
                response = await asyncio.wait_for(session.call.read(), timeout=session.heartbeat_timeout)
            except TimeoutError:
                raise _StreamLost(f"nothing heard from the coordinator for {session.heartbeat_timeout:g}s") from None
            if not isinstance(response, coordinator_pb2.ConnectResponse):
                raise _StreamLost("the coordinator closed the stream")
            kind = response.WhichOneof("message")
            if kind == "assignments":
                for task in response.assignments.tasks:
                    await self._on_assignment(session, task)
            elif kind == "cancel":
                self._on_cancel(response.cancel)
            elif kind == "result_acks":
                for ack in response.result_acks.acks:
                    self._on_result_ack(ack)
            elif kind == "welcome":
                _log.warning("worker %s: ignoring a second welcome on session %s", self._worker_id, session.session_id)

    # -- attempts -----------------------------------------------------------------------

    async def _on_assignment(self, session: _Session, task: task_pb2.Task) -> None:
        ref = (task.id, task.attempt)
        known = self._attempts.get(ref)
        if known is not None:
            if not known.abandoned:  # the coordinator repeats an assignment whose ack it missed
                session.ack(ref)
            return
        registration = self._registrations.get(task.spec.type)
        # Not acknowledging is how a worker declines: the coordinator re-queues after ack_timeout.
        if self._draining:
            _log.info("not acknowledging %s/%d: the worker is draining", *ref)
            return
        if registration is None:
            _log.warning("not acknowledging %s/%d: task type %r is not served here", *ref, task.spec.type)
            return
        if self._slots.locked():
            _log.warning("not acknowledging %s/%d: all %d slots are busy", *ref, self._slot_count)
            return
        await self._slots.acquire()
        context = TaskContext(task, progress_sink=functools.partial(self._report_progress, ref))
        attempt = _Attempt(ref=ref, task=task, registration=registration, context=context)
        self._attempts[ref] = attempt
        self._no_attempts.clear()
        # The ack is queued before the runner can queue progress or a result, and acks are written
        # first; the attempt starts without waiting for the ack's write.
        session.ack(ref)
        attempt.runner = asyncio.create_task(self._execute(attempt), name=f"herder-attempt {ref[0]}/{ref[1]}")

    def _on_cancel(self, cancel: coordinator_pb2.CancelAttempt) -> None:
        attempt = self._attempts.get((cancel.ref.task_id, cancel.ref.attempt))
        if attempt is not None and attempt.result is None:
            _log.info("cancelling %s/%d: %s", *attempt.ref, cancel.reason)
            self._cancel(attempt, cancel.reason or "canceled")

    def _on_result_ack(self, ack: coordinator_pb2.ResultAck) -> None:
        attempt = self._attempts.get((ack.ref.task_id, ack.ref.attempt))
        if attempt is None or attempt.result is None:
            return
        if not ack.accepted:
            _log.info("the coordinator dropped the result of %s/%d: %s", *attempt.ref, ack.reason or "stale attempt")
        self._forget(attempt)

    def _cancel(self, attempt: _Attempt, reason: str) -> None:
        attempt.context.cancelled.set(reason)
        if attempt.handler is not None:
            attempt.handler.cancel()

    def _abandon(self, attempt: _Attempt) -> None:
        attempt.abandoned = True
        if attempt.runner is not None and not attempt.runner.done():
            self._cancel(attempt, "attempt superseded")
        else:
            self._forget(attempt)

    def _forget(self, attempt: _Attempt) -> None:
        self._attempts.pop(attempt.ref, None)
        if not self._attempts:
            self._no_attempts.set()

    async def _execute(self, attempt: _Attempt) -> None:
        """Run one attempt to its outcome and queue its result (kept for the next session when none is open)."""
        try:
            result = await self._outcome(attempt)
        finally:
            self._slots.release()
        if attempt.abandoned:
            self._forget(attempt)
            return
        attempt.result = self._bounded(result)
        self._send_result(attempt)

    def _bounded(self, result: coordinator_pb2.AttemptResult) -> coordinator_pb2.AttemptResult:
        """The result, or a herder.result_too_large error when the coordinator would refuse its size."""
        kind = result.WhichOneof("outcome")
        if kind == "output":
            size, limit = result.output.ByteSize(), self._max_result_bytes
        elif kind == "error":
            size, limit = result.error.ByteSize(), self._max_error_bytes
        else:
            return result
        if size <= limit:
            return result
        what = "output" if kind == "output" else f"error ({result.error.type}: {result.error.message[:200]!r}...)"
        text = f"the handler's {what} is {size} bytes, more than the {limit} bytes the coordinator stores"
        _log.warning("attempt %s/%d: %s", result.ref.task_id, result.ref.attempt, text)
        return coordinator_pb2.AttemptResult(ref=result.ref, error=_error(RESULT_TOO_LARGE, text, retryable=False))

    async def _outcome(self, attempt: _Attempt) -> coordinator_pb2.AttemptResult:
        registration, task, ctx = attempt.registration, attempt.task, attempt.context
        result = coordinator_pb2.AttemptResult(ref=_ref_proto(attempt.ref))
        expected = registration.input_type.DESCRIPTOR.full_name
        if task.spec.payload.TypeName() != expected:
            got = task.spec.payload.TypeName() or "no payload"
            result.error.CopyFrom(_error(BAD_PAYLOAD, f"task type {registration.name} expects {expected}, got {got}"))
            return result
        request = registration.input_type()
        try:
            task.spec.payload.Unpack(request)
        except message.DecodeError as exc:
            result.error.CopyFrom(_error(BAD_PAYLOAD, f"cannot decode the {expected} payload: {exc}"))
            return result
        if ctx.cancelled:
            result.canceled = ctx.cancelled.reason
            return result

        handler = asyncio.create_task(_invoke(registration, request, ctx))
        attempt.handler = handler
        try:
            await asyncio.wait({handler})
        except asyncio.CancelledError:
            handler.cancel()
            raise
        return _result_of(attempt, handler, result)

    def _send_result(self, attempt: _Attempt) -> None:
        session = self._session
        if session is None or attempt.result is None or attempt.abandoned:
            return  # kept: resent after the next welcome if the coordinator reclaims the attempt
        if attempt.result_sent_in == session.session_id:
            return
        if session.send_result(attempt):
            attempt.result_sent_in = session.session_id

    async def _report_progress(self, ref: _Ref, fraction: float, text: str) -> None:
        session = self._session
        attempt = self._attempts.get(ref)
        if session is None or attempt is None or attempt.result is not None or attempt.abandoned:
            return
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        update = coordinator_pb2.ProgressUpdate(
            ref=_ref_proto(attempt.ref),
            progress=task_pb2.Progress(fraction=fraction, message=text, update_time=now),
        )
        size = update.progress.ByteSize()
        if size > self._max_progress_bytes:
            raise ValueError(
                f"a progress update of {size} bytes is more than the {self._max_progress_bytes} bytes"
                " the coordinator stores; shorten the message"
            )
        await session.send(coordinator_pb2.ConnectRequest(progress=update))

    # -- shutdown -----------------------------------------------------------------------

    async def _shut_down(self, grace: float) -> None:
        self._draining = True
        running = self._runners()
        _log.info("worker %s draining: %d attempts running, grace %gs", self._worker_id, len(running), grace)
        session = self._session
        if session is not None:
            await session.send(coordinator_pb2.ConnectRequest(heartbeat=coordinator_pb2.Heartbeat(draining=True)))

        await self._wait_runners(running, grace)
        left = [a for a in self._attempts.values() if a.runner is not None and not a.runner.done()]
        if left:
            _log.info(
                "worker %s: cancelling %d attempts still running after the grace period", self._worker_id, len(left)
            )
            for attempt in left:
                self._cancel(attempt, SHUTDOWN_REASON)
            await self._wait_runners(self._runners(), self._settings.cancel_timeout)
            stuck = self._runners()
            if stuck:
                _log.warning(
                    "worker %s: %d handlers ignored cancellation: %s",
                    self._worker_id,
                    len(stuck),
                    ", ".join(t.get_name() for t in stuck),
                )

        if self._started and not self._closed.is_set():
            try:
                async with asyncio.timeout(self._settings.result_ack_timeout):
                    await self._no_attempts.wait()
            except TimeoutError:
                _log.warning(
                    "worker %s: %d results not acknowledged within %gs; the coordinator re-queues them",
                    self._worker_id,
                    self.running,
                    self._settings.result_ack_timeout,
                )
        self._stop.set()
        if self._started:
            await self._closed.wait()
        _log.info("worker %s stopped", self._worker_id)

    def _runners(self) -> list[asyncio.Task[None]]:
        return [a.runner for a in self._attempts.values() if a.runner is not None and not a.runner.done()]

    async def _wait_runners(self, runners: Iterable[asyncio.Task[None]], timeout: float) -> None:
        """Wait for these runners to end, at most `timeout` seconds, or until a second signal hurries us."""
        pending: set[asyncio.Future[Any]] = set(runners)
        if not pending:
            return
        hurry = asyncio.create_task(self._hurry.wait())
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while pending and not hurry.done():
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    return
                done, _ = await asyncio.wait(pending | {hurry}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                pending -= done
        finally:
            hurry.cancel()

    async def _abandon_all(self) -> None:
        runners = self._runners()
        for attempt in list(self._attempts.values()):
            attempt.abandoned = True
            if attempt.runner is not None:
                attempt.runner.cancel()
        if runners:
            await asyncio.wait(runners, timeout=self._settings.cancel_timeout)
        self._attempts.clear()
        self._no_attempts.set()

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread, or a platform without loop signal handlers
            installed.append(sig)
        return installed

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._shutdown_task is None:
            _log.info(
                "worker %s: %s received, shutting down (send it again to cancel running tasks)",
                self._worker_id,
                sig.name,
            )
            self._shutdown_task = asyncio.create_task(self._shut_down(self._settings.shutdown_grace))
        else:
            _log.warning("worker %s: %s received again, cancelling running tasks now", self._worker_id, sig.name)
            self._hurry.set()


def run_worker(worker: Worker) -> None:
    """Run `worker` in a new event loop until SIGINT or SIGTERM has shut it down gracefully.

    Blocks. A second signal cancels running handlers without waiting for the grace period.
    Raises what Worker.run() raises.
    """
    run_loop(worker.run(install_signal_handlers=True))


async def _invoke(registration: TaskRegistration, request: message.Message, ctx: TaskContext) -> message.Message:
    """The handler call, in a span that continues the submitter's trace."""
    parent = propagate.extract(dict(ctx.task.trace_context))
    attributes: dict[str, str | int] = {
        "herder.task_id": ctx.task_id,
        "herder.attempt": ctx.attempt,
        "herder.task_type": registration.name,
    }
    with _tracer.start_as_current_span(
        f"herder.task {registration.name}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ):
        return await registration.handler(request, ctx)


def _result_of(
    attempt: _Attempt, handler: asyncio.Task[message.Message], result: coordinator_pb2.AttemptResult
) -> coordinator_pb2.AttemptResult:
    """The AttemptResult for a finished handler task."""
    ref, registration, ctx = attempt.ref, attempt.registration, attempt.context
    exc = None if handler.cancelled() else handler.exception()
    if not handler.cancelled() and exc is None:
        output = handler.result()
        if not isinstance(output, registration.output_type):
            expected = registration.output_type.DESCRIPTOR.full_name
            result.error.CopyFrom(
                _error(BAD_OUTPUT, f"the handler returned {type(output).__name__}, not {expected}", retryable=False)
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
        result.error.CopyFrom(_error("CancelledError", "the handler was cancelled", retryable=True))
    elif isinstance(exc, RetryAfter):
        _log.info("attempt %s/%d asks for a retry after %gs: %s", *ref, exc.seconds, exc.message)
        result.error.CopyFrom(_error(type(exc).__name__, exc.message, retryable=True))
        result.retry_after.CopyFrom(_duration(exc.seconds))
    elif isinstance(exc, NonRetryableError):
        _log.info("attempt %s/%d failed for good: %s: %s", *ref, exc.type, exc.message)
        result.error.CopyFrom(_error(exc.type, exc.message, retryable=False, details=exc.details))
    else:
        _log.warning("attempt %s/%d failed: %s: %s", *ref, type(exc).__name__, exc, exc_info=exc)
        details = "".join(traceback.format_exception(exc))[-_MAX_DETAILS:]
        result.error.CopyFrom(_error(type(exc).__name__, str(exc), retryable=True, details=details))
    return result


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


def _is_fatal(error: errors.HerderError) -> bool:
    return not isinstance(error, errors.StaleAttemptError) and error.code in _FATAL_CODES


def _error(kind: str, text: str, *, retryable: bool = False, details: str = "") -> task_pb2.TaskError:
    return task_pb2.TaskError(type=kind, message=text, retryable=retryable, details=details)


def _ref_proto(ref: _Ref) -> coordinator_pb2.AttemptRef:
    return coordinator_pb2.AttemptRef(task_id=ref[0], attempt=ref[1])


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


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
