"""The worker side of the Connect protocol, written once: the Worker and the supervisor both run on it.

A SessionEngine holds one session with the coordinator at a time: hello (re-claiming what it still
runs), welcome, assignments (acknowledged at once), progress, results and heartbeats on one stream,
written by one writer task: acknowledgements and results that pile up while it writes go out together
in one message. When the stream fails it follows the leader or reconnects with backoff; results the
coordinator has not acknowledged are kept and sent again. Shutdown runs in fixed steps.

What runs an attempt is not its business: an AttemptRunner registers the task types it serves and
turns one assigned Task (with a TaskContext for progress and cancellation) into an AttemptResult.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from herder.clients import errors, outcomes, tracing
from herder.clients.alerts import MAX_HEARTBEAT_ALERTS
from herder.clients.backoff import Backoff
from herder.clients.context import TaskContext
from herder.clients.endpoints import Endpoints, open_channel
from herder.clients.outcomes import RESULT_TOO_LARGE, task_error
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, supervisor_pb2, task_pb2
from herder.clients.resources import ResourceSampler, ResourceSettings

_log = logging.getLogger(__name__)
# The session stream, traced where it starts (tracing.start_stream), not by a channel interceptor.
_CONNECT = "/herder.v1.CoordinatorService/Connect"

# The canceled reason of attempts stopped by shutdown; the coordinator re-queues them.
SHUTDOWN_REASON = "worker shutdown"

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

_Ref = tuple[str, int]


class AttemptRunner(Protocol):
    """What runs attempts for a SessionEngine: the Worker's Python handlers, or the supervisor's handler service."""

    def task_types(self) -> Sequence[str]:
        """The task types served; read once, when the engine starts."""
        ...

    async def prepare(
        self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, timeout: float
    ) -> Mapping[str, int] | None:
        """Register the task types with the coordinator; called before the first session until it succeeds.

        Returns the registered version of each type (sent in every hello, so a session is refused once
        a type changed incompatibly), or None to declare none. A grpc error it raises is handled like
        a failed session: retried with backoff, or fatal (FailedPrecondition for messages that are
        incompatible with the registered ones, InvalidArgument for an invalid contract, ...).
        """
        ...

    async def run(self, context: TaskContext) -> coordinator_pb2.AttemptResult:
        """Run one attempt of context.task and return its outcome (the engine fills in `ref`).

        When context.cancelled is set (a cancel from the coordinator, or shutdown past its grace)
        stop and return canceled=context.cancelled.reason. The engine cancels this coroutine only
        when the attempt is no longer this worker's: then clean up and let CancelledError through.
        Any other exception becomes a retryable error of that type.
        """
        ...


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How a Worker connects, waits and shuts down; the defaults suit most services.

    - `backoff`: waits between reconnect tries (Backoff(): 0.1 s doubling to 5 s, 20 % jitter).
    - `connect_timeout`: seconds for registering task types and for the welcome to arrive (10).
    - `shutdown_grace`: seconds shutdown() lets running handlers finish when no grace is given (10).
    - `cancel_timeout`: seconds to wait for cancelled handlers to stop before giving up on them (5).
    - `result_ack_timeout`: seconds shutdown() waits for the last results to be acknowledged (5).
    - `heartbeat_interval`, `heartbeat_timeout`: used only when the welcome leaves them unset (1, 5).
    - `resource_interval`: seconds between resource samples sent with heartbeats, 0.1 to 60 (1).
    """

    backoff: Backoff = field(default_factory=Backoff)
    connect_timeout: float = 10.0
    shutdown_grace: float = 10.0
    cancel_timeout: float = 5.0
    result_ack_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    resource_interval: float = 1.0

    def __post_init__(self) -> None:
        ResourceSettings(interval=self.resource_interval)  # raises ValueError out of bounds
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
    context: TaskContext
    runner: asyncio.Task[None] | None = None
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


class SessionEngine:
    """One worker's sessions with the coordinator, over which `runner` runs at most `slots` attempts at once.

    `endpoints` are the coordinator replicas (the leader is followed). The coordinator never sends
    more than the free slots; an assignment beyond them, of a type not served, or arriving while
    draining is not acknowledged, so the coordinator re-queues it after its ack timeout (and
    quarantines this worker for a while: declining is for shutdown, pause() for anything else).
    """

    def __init__(
        self,
        endpoints: Endpoints,
        runner: AttemptRunner,
        *,
        worker_id: str | None = None,
        slots: int = 8,
        labels: Mapping[str, str] | None = None,
        settings: WorkerSettings | None = None,
        logger: logging.Logger | None = None,
        resources: ResourceSampler | None = None,
        capacity: task_pb2.Resources | None = None,
        alerts: Callable[[], Sequence[supervisor_pb2.Alert]] | None = None,
    ) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        self._endpoints = endpoints
        # The user's logger (herder.clients.worker, herder.supervisor): log names stay what operators filter on.
        self._log = logger or _log
        self._runner = runner
        self._worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._slot_count = slots
        self._labels = dict(labels or {})
        # Offered to tasks' resource requests; unset fields come from the resource samples.
        self._capacity = task_pb2.Resources()
        if capacity is not None:
            self._capacity.CopyFrom(capacity)
        self._settings = settings or WorkerSettings()
        self._task_types: frozenset[str] = frozenset()
        # A sampler given by the caller is the caller's to run (the supervisor samples before it connects);
        # without one, this process is the handler: sample it while run() runs.
        self._owns_resources = resources is None
        self.resources = resources or ResourceSampler(
            ResourceSettings(interval=self._settings.resource_interval, handler_pid=os.getpid())
        )
        # The active alerts each heartbeat carries (the supervisor's); None: heartbeats carry none.
        self._alerts = alerts
        # Monotonic time the coordinator was last heard from (any message), for heartbeat_lag.
        self._last_heard = time.monotonic()

        self._attempts: dict[_Ref, _Attempt] = {}
        self._slots = asyncio.Semaphore(slots)
        self._session: _Session | None = None
        self._prepared = False
        # The registered version of each served type, as prepare() found it; declared in each hello.
        self._type_versions: dict[str, int] = {}
        self._tries = 0
        self._welcomed_at: float | None = None
        # What the coordinator stores (from the last welcome): bigger results are refused here, before sending.
        self._max_result_bytes = outcomes.DEFAULT_MAX_RESULT_BYTES
        self._max_error_bytes = outcomes.DEFAULT_MAX_ERROR_BYTES
        self._max_progress_bytes = outcomes.DEFAULT_MAX_PROGRESS_BYTES
        self._just_redirected = False

        self._started = False
        self._draining = False
        self._paused = ""
        self._pause_set = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._beat_now = asyncio.Event()
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._closed = asyncio.Event()
        self._connected = asyncio.Event()
        self._no_attempts = asyncio.Event()
        self._no_attempts.set()
        self._shutdown_task: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def slots(self) -> int:
        return self._slot_count

    @property
    def started(self) -> bool:
        return self._started

    @property
    def address(self) -> str | None:
        """The coordinator of the open session; None while disconnected."""
        return self._session.address if self._session is not None else None

    @property
    def paused(self) -> str:
        """Why no new tasks are taken (empty when they are); see pause()."""
        return self._paused

    def pause(self, reason: str) -> None:
        """Take no new tasks until resume(), without shutting down (the supervisor's handler is down).

        The session's heartbeats say draining at once, so the coordinator stops assigning; the
        session stays open (the node and its alerts stay visible), and after resume(), once every
        held attempt's result is acknowledged, it is replaced by a new one: the coordinator's
        draining flag is one-way per session. Running attempts go on; an assignment already on its
        way is still run.
        """
        if not self._paused:
            self._log.warning("worker %s: taking no new tasks: %s", self._worker_id, reason)
        self._paused = reason or "paused"
        self._resumed.clear()
        self._pause_set.set()
        self._beat_now.set()

    def resume(self) -> None:
        """Take tasks again after pause(), on a new session (see pause())."""
        if self._paused:
            self._log.info("worker %s: taking tasks again", self._worker_id)
            if self._session is None:
                self._last_heard = time.monotonic()  # silent by choice until now: not lag
        self._paused = ""
        self._pause_set.clear()
        self._resumed.set()

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

    def coordinator_silence(self) -> float | None:
        """Seconds since the coordinator was last heard from (connected or not); None when no session is wanted.

        None before run(), after shutdown and while paused with the session closed: silence
        then is by choice, not lag.
        """
        if not self._started or self._stop.is_set() or (self._paused and self._session is None):
            return None
        return time.monotonic() - self._last_heard

    def held(self) -> list[supervisor_pb2.HeldAttempt]:
        """The attempts this worker holds (running, or finished and not yet acknowledged), oldest first."""
        found = []
        for attempt in self._attempts.values():
            if attempt.abandoned:
                continue
            task = attempt.task
            held = supervisor_pb2.HeldAttempt(
                task_id=task.id,
                attempt=task.attempt,
                task_type=task.spec.type,
                queue=task.spec.queue,
                finished=attempt.result is not None,
                cancel_requested=bool(attempt.context.cancelled),
            )
            if task.HasField("assign_time"):
                held.assign_time.CopyFrom(task.assign_time)
                if task.spec.HasField("timeout") and _seconds(task.spec.timeout) > 0:
                    held.deadline.FromNanoseconds(task.assign_time.ToNanoseconds() + task.spec.timeout.ToNanoseconds())
            found.append(held)
        return sorted(found, key=lambda h: (h.assign_time.ToNanoseconds(), h.task_id))

    def overdue(self) -> list[tuple[str, float]]:
        """Attempts still running past their task's timeout: (task_id/attempt, seconds past), most overdue first.

        The handler was told to stop at the timeout; one still running ignores it.
        """
        now = time.time()
        found = []
        for attempt in self._attempts.values():
            spec = attempt.task.spec
            if attempt.runner is None or attempt.runner.done() or not spec.HasField("timeout"):
                continue
            timeout = _seconds(spec.timeout)
            if timeout <= 0 or not attempt.task.HasField("assign_time"):
                continue
            past = now - (attempt.task.assign_time.ToNanoseconds() / 1e9 + timeout)
            if past > 0:
                found.append((f"{attempt.ref[0]}/{attempt.ref[1]}", past))
        return sorted(found, key=lambda item: -item[1])

    async def wait_connected(self, timeout: float) -> None:
        """Return once a session is open (welcome received); TimeoutError after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    # -- running ------------------------------------------------------------------------

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Prepare the runner (register its task types), connect, and serve until shutdown() completes.

        With `install_signal_handlers`, SIGINT and SIGTERM start shutdown(); a second signal
        cancels running handlers at once. A failing stream is reconnected with backoff, for ever.
        Raises RuntimeError when called twice or with no task types, and the HerderError of a
        rejection retrying cannot fix (InvalidArgumentError for a conflicting task type, ...).
        On failure or cancellation, handlers still running are cancelled without reporting (the
        coordinator re-queues them after the heartbeat timeout) and the stream is closed.
        """
        if self._started:
            raise RuntimeError("SessionEngine.run() may be called only once")
        self._task_types = frozenset(self._runner.task_types())
        if not self._task_types:
            raise RuntimeError("the runner serves no task types")
        self._started = True
        self._last_heard = time.monotonic()
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop) if install_signal_handlers else []
        sampling = (
            asyncio.create_task(self.resources.run(), name=f"herder-worker-resources {self._worker_id}")
            if self._owns_resources
            else None
        )
        try:
            await self._serve()
        finally:
            if sampling is not None:
                sampling.cancel()
                await asyncio.wait({sampling})
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

    # -- session loop -------------------------------------------------------------------

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if self._paused:
                    resumed = asyncio.create_task(self._resumed.wait())
                    try:
                        await asyncio.wait({resumed, stop}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        resumed.cancel()
                    continue
                address = await self._endpoints.target()
                session = asyncio.create_task(self._run_session(address), name=f"herder-session {address}")
                idle = asyncio.create_task(self._resumed_and_idle())
                try:
                    await asyncio.wait({session, stop, idle}, return_when=asyncio.FIRST_COMPLETED)
                except asyncio.CancelledError:
                    session.cancel()
                    await asyncio.wait({session})
                    raise
                finally:
                    idle.cancel()
                if not session.done():
                    await self._close_session(session)
                    if self._stop.is_set():
                        return
                    self._log.info("worker %s: taking tasks again on a new session", self._worker_id)
                    self._tries = 0
                    continue
                failure = session.exception()
                if failure is None:
                    failure = _StreamLost("the session ended")
                redirected = self._next_address(address, failure)
                if not isinstance(failure, errors.HerderError) or _is_fatal(failure):
                    self._log.error("worker %s: %s rejected the session: %s", self._worker_id, address, failure)
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
                self._log.warning(
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

    async def _resumed_and_idle(self) -> None:
        """Return once resumed after a pause of this session, with no attempt held (every result acknowledged)."""
        await self._pause_set.wait()
        while True:
            await self._resumed.wait()
            await self._no_attempts.wait()
            if not self._paused:
                return  # paused again meanwhile: the draining session stays until the next resume

    def _next_address(self, address: str, failure: BaseException) -> bool:
        """Where to connect next; True when `address` named another replica as the leader."""
        redirected = self._endpoints.failed(address, failure)
        if redirected:
            self._log.info(
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
                if not self._prepared:
                    versions = await self._runner.prepare(stub, self._settings.connect_timeout)
                    self._type_versions = dict(versions or {})
                    self._prepared = True
                call = tracing.start_stream(_CONNECT, lambda metadata: stub.Connect(metadata=metadata))
                welcome = await self._hello(call)
                self._last_heard = time.monotonic()
                async with _Session(call, welcome, address, self._settings) as session:
                    self._session = session
                    self._welcomed_at = asyncio.get_running_loop().time()
                    self._connected.set()
                    self._log.info(
                        "worker %s connected to %s (session %s, %d reclaimed, %d rejected); serving %s with %d slots",
                        self._worker_id,
                        address,
                        session.session_id,
                        len(welcome.reclaimed),
                        len(welcome.rejected),
                        ", ".join(sorted(self._task_types)),
                        self._slot_count,
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

    async def _hello(
        self, call: grpc.aio.StreamStreamCall[coordinator_pb2.ConnectRequest, coordinator_pb2.ConnectResponse]
    ) -> coordinator_pb2.Welcome:
        hello = coordinator_pb2.WorkerHello(
            worker_id=self._worker_id,
            task_types=sorted(self._task_types),
            slots=self._slot_count,
            running=[_ref_proto(ref) for ref, a in self._attempts.items() if not a.abandoned],
            labels=self._labels,
            capacity=self._capacity,
            type_versions=self._type_versions,
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
                self._log.info("attempt %s/%d is no longer this worker's; dropping it", *ref)
                self._abandon(attempt)
        for attempt in list(self._attempts.values()):
            self._send_result(attempt)

    async def _heartbeat_loop(self, session: _Session) -> None:
        while True:
            self._beat_now.clear()
            beat = self._heartbeat(draining=self._draining or bool(self._paused))
            await session.send(coordinator_pb2.ConnectRequest(heartbeat=beat))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(session.heartbeat_interval):
                    await self._beat_now.wait()  # pause() wants its draining heartbeat out now

    def _heartbeat(self, draining: bool) -> coordinator_pb2.Heartbeat:
        beat = coordinator_pb2.Heartbeat(draining=draining)
        if (sample := self.resources.latest) is not None:
            beat.resources.CopyFrom(sample)
        if self._alerts is not None:
            beat.alerts.extend(list(self._alerts())[:MAX_HEARTBEAT_ALERTS])
        return beat

    async def _read_loop(self, session: _Session) -> None:
        while True:
            try:
                response = await asyncio.wait_for(session.call.read(), timeout=session.heartbeat_timeout)
            except TimeoutError:
                raise _StreamLost(f"nothing heard from the coordinator for {session.heartbeat_timeout:g}s") from None
            if not isinstance(response, coordinator_pb2.ConnectResponse):
                raise _StreamLost("the coordinator closed the stream")
            self._last_heard = time.monotonic()
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
                self._log.warning(
                    "worker %s: ignoring a second welcome on session %s", self._worker_id, session.session_id
                )

    # -- attempts -----------------------------------------------------------------------

    async def _on_assignment(self, session: _Session, task: task_pb2.Task) -> None:
        ref = (task.id, task.attempt)
        known = self._attempts.get(ref)
        if known is not None:
            if not known.abandoned:  # the coordinator repeats an assignment whose ack it missed
                session.ack(ref)
            return
        # Not acknowledging is how a worker declines: the coordinator re-queues after ack_timeout.
        if self._draining:
            self._log.info("not acknowledging %s/%d: the worker is draining", *ref)
            return
        if task.spec.type not in self._task_types:
            self._log.warning("not acknowledging %s/%d: task type %r is not served here", *ref, task.spec.type)
            return
        if self._slots.locked():
            self._log.warning("not acknowledging %s/%d: all %d slots are busy", *ref, self._slot_count)
            return
        await self._slots.acquire()
        context = TaskContext(task, progress_sink=functools.partial(self._report_progress, ref))
        attempt = _Attempt(ref=ref, task=task, context=context)
        self._attempts[ref] = attempt
        self._no_attempts.clear()
        # The ack is queued before the runner can queue progress or a result, and acks are written
        # first; the attempt starts without waiting for the ack's write.
        session.ack(ref)
        attempt.runner = asyncio.create_task(self._execute(attempt), name=f"herder-attempt {ref[0]}/{ref[1]}")

    def _on_cancel(self, cancel: coordinator_pb2.CancelAttempt) -> None:
        attempt = self._attempts.get((cancel.ref.task_id, cancel.ref.attempt))
        if attempt is not None and attempt.result is None:
            self._log.info("cancelling %s/%d: %s", *attempt.ref, cancel.reason)
            self._cancel(attempt, cancel.reason or "canceled")

    def _on_result_ack(self, ack: coordinator_pb2.ResultAck) -> None:
        attempt = self._attempts.get((ack.ref.task_id, ack.ref.attempt))
        if attempt is None or attempt.result is None:
            return
        if not ack.accepted:
            self._log.info(
                "the coordinator dropped the result of %s/%d: %s", *attempt.ref, ack.reason or "stale attempt"
            )
        self._forget(attempt)

    def _cancel(self, attempt: _Attempt, reason: str) -> None:
        # The runner sees the signal and stops; its coroutine is cancelled only when abandoned.
        attempt.context.cancelled.set(reason)

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
        if kind == "error":
            # An error keeps its type and as much of its message and traceback as fits.
            bounded = coordinator_pb2.AttemptResult()
            bounded.CopyFrom(result)
            if outcomes.fit_error(bounded.error, limit):
                return bounded
        what = "output" if kind == "output" else f"error ({result.error.type}: {result.error.message[:200]!r}...)"
        text = f"the handler's {what} is {size} bytes, more than the {limit} bytes the coordinator stores"
        self._log.warning("attempt %s/%d: %s", result.ref.task_id, result.ref.attempt, text)
        return coordinator_pb2.AttemptResult(ref=result.ref, error=task_error(RESULT_TOO_LARGE, text, retryable=False))

    async def _outcome(self, attempt: _Attempt) -> coordinator_pb2.AttemptResult:
        ctx = attempt.context
        result = coordinator_pb2.AttemptResult()
        # The attempt's CONSUMER span: current while the runner runs, so the handler continues the trace.
        with tracing.process_span(ctx.task, ctx.attempt, self._worker_id) as span:
            if ctx.cancelled:
                result.canceled = ctx.cancelled.reason
            else:
                try:
                    result = await self._runner.run(ctx)
                except Exception as exc:  # the runner's own bug: report it rather than lose the attempt
                    self._log.exception("attempt %s/%d: the runner failed", *attempt.ref)
                    result = coordinator_pb2.AttemptResult(
                        error=task_error(type(exc).__name__, str(exc), retryable=True)
                    )
            kind = result.WhichOneof("outcome")
            if kind == "error":
                tracing.set_outcome(span, "failed", result.error.type)
            else:
                tracing.set_outcome(span, "succeeded" if kind == "output" else "canceled")
        result.ref.CopyFrom(_ref_proto(attempt.ref))
        return result

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
        self._log.info("worker %s draining: %d attempts running, grace %gs", self._worker_id, len(running), grace)
        session = self._session
        if session is not None:
            await session.send(coordinator_pb2.ConnectRequest(heartbeat=self._heartbeat(draining=True)))

        await self._wait_runners(running, grace)
        left = [a for a in self._attempts.values() if a.runner is not None and not a.runner.done()]
        if left:
            self._log.info(
                "worker %s: cancelling %d attempts still running after the grace period", self._worker_id, len(left)
            )
            for attempt in left:
                self._cancel(attempt, SHUTDOWN_REASON)
            await self._wait_runners(self._runners(), self._settings.cancel_timeout)
            stuck = self._runners()
            if stuck:
                self._log.warning(
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
                self._log.warning(
                    "worker %s: %d results not acknowledged within %gs; the coordinator re-queues them",
                    self._worker_id,
                    self.running,
                    self._settings.result_ack_timeout,
                )
        self._stop.set()
        if self._started:
            await self._closed.wait()
        self._log.info("worker %s stopped", self._worker_id)

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
            self._log.info(
                "worker %s: %s received, shutting down (send it again to cancel running tasks)",
                self._worker_id,
                sig.name,
            )
            self._shutdown_task = asyncio.create_task(self._shut_down(self._settings.shutdown_grace))
        else:
            self._log.warning("worker %s: %s received again, cancelling running tasks now", self._worker_id, sig.name)
            self._hurry.set()


def _is_fatal(error: errors.HerderError) -> bool:
    return not isinstance(error, errors.StaleAttemptError) and error.code in _FATAL_CODES


def _ref_proto(ref: _Ref) -> coordinator_pb2.AttemptRef:
    return coordinator_pb2.AttemptRef(task_id=ref[0], attempt=ref[1])


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


__all__ = ["SHUTDOWN_REASON", "AttemptRunner", "SessionEngine", "WorkerSettings"]
