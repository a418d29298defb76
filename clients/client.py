"""The Herder client SDK: submit, inspect, watch and cancel tasks on a coordinator.

`Client` is asyncio-first and speaks the generated `herder.v1` messages; `SyncClient`
wraps it for synchronous code. A client takes one or several coordinator replicas; which
one it talks to, following the leader and retrying UNAVAILABLE, is `endpoints.Endpoints`.
Every failed gRPC call surfaces as a `herder.clients.errors.HerderError`, converted
in exactly one place (`_herder_errors`).

Scheduling settings (concurrency limits, fair-share weights, queue retention) are set with
`set_limit` and read with `limits`; `queues` shows each queue's backlog and wait times.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json as jsonlib
import math
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, overload

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2
from opentelemetry import propagate

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.descriptors import MessageType, add_files, caller_metadata, task_type_for
from herder.clients.endpoints import AUTO_KEY_PREFIX, DEFAULT_ADDRESS, Endpoints, new_idempotency_key
from herder.clients.locks import Lock, default_owner
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2

if TYPE_CHECKING:
    from herder.clients.proto.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
M = TypeVar("M", bound=Message)
T = TypeVar("T")

State: TypeAlias = task_pb2.TaskState.ValueType
TERMINAL_STATES: frozenset[State] = frozenset(
    {
        task_pb2.TASK_STATE_SUCCEEDED,
        task_pb2.TASK_STATE_FAILED,
        task_pb2.TASK_STATE_CANCELED,
        task_pb2.TASK_STATE_EXPIRED,
    }
)
_STATE_PREFIX = "TASK_STATE_"
# Events per WatchTasks response the SDK asks for: what is ready goes in one message (the server's
# one write per response is most of a watch's cost on a busy coordinator).
WATCH_MAX_EVENTS = 256


def state_name(state: State) -> str:
    """The short name of a state: TASK_STATE_RUNNING -> "RUNNING"."""
    return task_pb2.TaskState.Name(state).removeprefix(_STATE_PREFIX)


def parse_state(name: str) -> State:
    """The state for a name such as "running", "RUNNING" or "TASK_STATE_RUNNING"; ValueError when unknown."""
    key = name.strip().upper()
    if not key.startswith(_STATE_PREFIX):
        key = _STATE_PREFIX + key
    try:
        state = task_pb2.TaskState.Value(key)
    except ValueError:
        state = task_pb2.TASK_STATE_UNSPECIFIED
    if state == task_pb2.TASK_STATE_UNSPECIFIED:
        known = ", ".join(state_name(s).lower() for s in task_pb2.TaskState.values() if s)
        raise ValueError(f"unknown task state {name!r} (one of {known})")
    return state


def is_terminal(state: State) -> bool:
    """True for SUCCEEDED, FAILED, CANCELED and EXPIRED: the task will not change again."""
    return state in TERMINAL_STATES


LimitScope: TypeAlias = coordinator_pb2.LimitScope.ValueType
_SCOPE_NAMES: dict[LimitScope, str] = {
    coordinator_pb2.LIMIT_SCOPE_GLOBAL: "global",
    coordinator_pb2.LIMIT_SCOPE_QUEUE: "queue",
    coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY: "key",
}
_SCOPES: dict[str, LimitScope] = {
    **{name: scope for scope, name in _SCOPE_NAMES.items()},
    **{coordinator_pb2.LimitScope.Name(scope).lower(): scope for scope in _SCOPE_NAMES},
    "concurrency_key": coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY,
}
# The fields each scope uses; set_limit reads the current limit only when the caller leaves one of them out.
_SCOPE_FIELDS: dict[LimitScope, frozenset[str]] = {
    coordinator_pb2.LIMIT_SCOPE_GLOBAL: frozenset({"max_running"}),
    coordinator_pb2.LIMIT_SCOPE_QUEUE: frozenset({"max_running", "retention"}),
    coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY: frozenset({"max_running", "weight"}),
}
_INT64_MAX = 2**63 - 1
_UINT32_MAX = 2**32 - 1
# google.protobuf.Duration spans about +-10,000 years.
_DURATION_MAX_SECONDS = 315_576_000_000


def scope_name(scope: LimitScope) -> str:
    """The short name of a limit scope: "global", "queue" or "key"."""
    return _SCOPE_NAMES.get(scope) or coordinator_pb2.LimitScope.Name(scope).lower()


def parse_scope(scope: str | LimitScope) -> LimitScope:
    """The LimitScope for "global", "queue" or "key" (also "concurrency_key" and the enum's names,
    any case) or for a LimitScope value; InvalidArgumentError on `limit.scope` when unknown."""
    if isinstance(scope, str):
        found = _SCOPES.get(scope.strip().lower().replace("-", "_"))
    else:
        found = scope if scope in _SCOPE_NAMES else None
    if found is None:
        raise errors.bad_request(f"unknown limit scope {scope!r}", [("limit.scope", "must be global, queue or key")])
    return found


@dataclass(frozen=True, slots=True)
class Retry:
    """How a task's failed attempts are retried; zero or None takes the coordinator's default.

    - `max_attempts`: total attempts, the first included (1 = never retry).
    - `initial_backoff`, `max_backoff`: seconds before the first retry, and the cap.
    - `backoff_multiplier`: each retry waits this many times the previous one (>= 1).
    - `jitter`: fraction 0..1 of the backoff randomly added or removed.
    - `non_retryable_error_types`: TaskError types that fail the task at once.
    """

    max_attempts: int = 0
    initial_backoff: float | None = None
    backoff_multiplier: float = 0.0
    max_backoff: float | None = None
    jitter: float = 0.0
    non_retryable_error_types: tuple[str, ...] = ()

    def to_proto(self) -> task_pb2.RetryPolicy:
        policy = task_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_multiplier=self.backoff_multiplier,
            jitter=self.jitter,
            non_retryable_error_types=self.non_retryable_error_types,
        )
        if self.initial_backoff is not None:
            policy.initial_backoff.CopyFrom(_duration(self.initial_backoff))
        if self.max_backoff is not None:
            policy.max_backoff.CopyFrom(_duration(self.max_backoff))
        return policy


@dataclass(frozen=True, slots=True)
class WatchReconnect:
    """How `TaskHandle.watch` and `TaskHandle.result` survive a broken stream (a coordinator restart
    or a leader change): re-open the watch after `backoff`, and give up with the last error once the
    stream has failed for `give_up_after` seconds (default 30) without delivering an event.
    """

    backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.1, max=2.0))
    give_up_after: float = 30.0


Seconds: TypeAlias = float | timedelta


# The longest ttl, timeout or backoff and the furthest delay the coordinator accepts (366 days); the
# coordinator's own bound (server/horizon.py) is this one.
MAX_DELAY_SECONDS = 366 * 24 * 3600
_INT32 = (-(2**31), 2**31 - 1)


def _spec_violations(
    priority: int, delay: Seconds | None, ttl: Seconds | None, timeout: Seconds | None
) -> list[tuple[str, str]]:
    """Numbers that would overflow a field (or datetime) before the coordinator could say so."""
    found = []
    if not _INT32[0] <= priority <= _INT32[1]:
        found.append(("priority", f"must be {_INT32[0]} to {_INT32[1]}, got {priority}"))
    for name, value in (("delay", delay), ("ttl", ttl), ("timeout", timeout)):
        if value is None:
            continue
        seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
        if not 0 <= seconds <= MAX_DELAY_SECONDS:
            found.append((name, f"must be 0 to {MAX_DELAY_SECONDS} seconds (366 days), got {value}"))
    return found


def task_spec(
    type: str,
    payload: Message | None = None,
    *,
    json: str | Mapping[str, Any] | None = None,
    queue: str = "",
    priority: int = 0,
    idempotency_key: str = "",
    concurrency_key: str = "",
    delay: Seconds | None = None,
    not_before: datetime | None = None,
    ttl: Seconds | None = None,
    timeout: Seconds | None = None,
    retry: Retry | task_pb2.RetryPolicy | None = None,
    tags: Iterable[str] = (),
    metadata: Mapping[str, str] | None = None,
    resources: task_pb2.Resources | None = None,
) -> task_pb2.TaskSpec:
    """A TaskSpec, as `Client.submit` sends it and `Client.submit_many` takes it.

    `payload` is a typed message (packed into an Any; an Any is used as is); `json` is the
    input as JSON text or a dict, encoded by the coordinator with the registered input type.
    `delay` (seconds or timedelta from now) and `not_before` (a datetime, naive = UTC) both
    postpone the start. Conflicting arguments raise InvalidArgumentError; nothing is sent.
    """
    violations: list[tuple[str, str]] = []
    if payload is not None and json is not None:
        violations.append(("payload_json", "give payload or json, not both"))
    if delay is not None and not_before is not None:
        violations.append(("not_before", "give delay or not_before, not both"))
    violations += _spec_violations(priority, delay, ttl, timeout)
    if violations:
        raise errors.bad_request("invalid task spec", violations)
    spec = task_pb2.TaskSpec(
        type=type,
        queue=queue,
        priority=priority,
        idempotency_key=idempotency_key,
        concurrency_key=concurrency_key,
        tags=list(tags),
        metadata=dict(metadata or {}),
    )
    if isinstance(payload, any_pb2.Any):
        spec.payload.CopyFrom(payload)
    elif payload is not None:
        spec.payload.Pack(payload)
    if json is not None:
        spec.payload_json = json if isinstance(json, str) else jsonlib.dumps(json)
    if delay is not None:
        not_before = datetime.now(UTC) + _timedelta(delay)
    if not_before is not None:
        if not_before.tzinfo is None:
            not_before = not_before.replace(tzinfo=UTC)
        spec.not_before.FromDatetime(not_before)
    if ttl is not None:
        spec.ttl.CopyFrom(_duration(ttl))
    if timeout is not None:
        spec.timeout.CopyFrom(_duration(timeout))
    if retry is not None:
        spec.retry.CopyFrom(retry if isinstance(retry, task_pb2.RetryPolicy) else retry.to_proto())
    if resources is not None:
        spec.resources.CopyFrom(resources)
    return spec


def unpack(value: any_pb2.Any, output_type: type[M] | None = None) -> Message:
    """The message inside an Any: as `output_type` when given (TypeError if it holds another type),
    else as the generated class of its type when one is imported, else the Any itself."""
    if output_type is not None:
        out = output_type()
        if not value.type_url:
            return out
        if not value.Unpack(out):
            raise TypeError(f"the value is a {value.TypeName()}, not a {out.DESCRIPTOR.full_name}")
        return out
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(value.TypeName())
    except KeyError:
        return value
    message = message_factory.GetMessageClass(descriptor)()
    value.Unpack(message)
    return message


@contextlib.contextmanager
def _herder_errors() -> Iterator[None]:
    """The one place a failed gRPC call becomes a HerderError."""
    try:
        yield
    except grpc.RpcError as exc:
        raise errors.from_rpc_error(exc) from exc


class Client:
    """An asyncio client of a Herder coordinator and its replicas, following the leader.

    `address` is "host:port", a comma-separated list of replicas or a sequence of them (None:
    env HERDER_COORDINATOR, else 127.0.0.1:50051); a host name stands for every address it
    resolves to. ValueError when an entry is not host:port.

    Every unary call retries UNAVAILABLE until `timeout` seconds have passed since it started:
    a follower's redirect is followed at once, a replica that does not answer (or knows no
    leader) is left for the next one after `retry_backoff`; then the last error is raised
    (UnavailableError or NotLeaderError). DeadlineExceededError is not retried. Submissions
    carry an idempotency key (one is generated when the caller gives none), so a retry whose
    first try was committed returns that task instead of a second one.

    Use `async with Client(address) as client:` or call `close()`. Streams (`watch`) have no
    deadline. A call cancelled by its caller cancels the RPC. Channels open lazily on the first
    call and belong to that event loop: use a client from one loop only (`SyncClient` for threads).
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        timeout: float = 10.0,
        watch_reconnect: WatchReconnect | None = None,
        retry_backoff: Backoff | None = None,
    ) -> None:
        self._endpoints = Endpoints(address)
        self._timeout = timeout
        self.watch_reconnect = watch_reconnect or WatchReconnect()
        self.retry_backoff = retry_backoff or Backoff(initial=0.05, max=1.0)
        # Task types' registered messages, for results whose class this process has not imported.
        self._registered_pool = descriptor_pool.DescriptorPool()

    @property
    def address(self) -> str:
        """The coordinator this client talks to now (the leader's, once it was redirected)."""
        return self._endpoints.current

    @property
    def addresses(self) -> tuple[str, ...]:
        """The coordinator addresses it was given (host names not expanded)."""
        return self._endpoints.configured

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled. Safe to call twice."""
        await self._endpoints.close()

    # --- tasks ---

    async def submit(
        self,
        type: str,
        payload: Message | None = None,
        *,
        json: str | Mapping[str, Any] | None = None,
        queue: str = "",
        priority: int = 0,
        idempotency_key: str = "",
        concurrency_key: str = "",
        delay: Seconds | None = None,
        not_before: datetime | None = None,
        ttl: Seconds | None = None,
        timeout: Seconds | None = None,
        retry: Retry | task_pb2.RetryPolicy | None = None,
        tags: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        resources: task_pb2.Resources | None = None,
    ) -> TaskHandle:
        """Submit one task; returns once it is committed. See `task_spec` for the arguments.

        With an idempotency key that matches an existing task, the handle is that task's
        (`handle.created` is False). Without one, a key "herder-sdk-<uuid>" is generated, so the
        retries after a lost reply find the task the first try stored (`created` stays True).
        Invalid input raises InvalidArgumentError naming the fields.
        """
        spec = task_spec(
            type,
            payload,
            json=json,
            queue=queue,
            priority=priority,
            idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
            delay=delay,
            not_before=not_before,
            ttl=ttl,
            timeout=timeout,
            retry=retry,
            tags=tags,
            metadata=metadata,
            resources=resources,
        )
        auto_key = _give_key(spec)
        response = await self._unary(lambda s: s.SubmitTask, coordinator_pb2.SubmitTaskRequest(spec=spec))
        return TaskHandle(self, response.task, created=response.created or auto_key)

    async def submit_many(self, specs: Iterable[task_pb2.TaskSpec]) -> builtins.list[TaskHandle | errors.HerderError]:
        """Submit a batch (build specs with `task_spec`); one result per spec, in order.

        A rejected item is its error (InvalidArgumentError, ...) in the list, not raised; the
        others are stored. A failure of the whole call (unreachable coordinator) raises. Specs
        without an idempotency key get one, as in `submit` (the caller's specs are not changed).
        """
        request = coordinator_pb2.SubmitTasksRequest(specs=builtins.list(specs))
        auto_keys = [_give_key(spec) for spec in request.specs]
        response = await self._unary(lambda s: s.SubmitTasks, request)
        results: builtins.list[TaskHandle | errors.HerderError] = []
        for item, auto_key in zip(response.results, auto_keys, strict=False):
            if item.code:
                status = status_pb2.Status(code=item.code, message=item.message, details=item.details)
                results.append(errors.from_status_proto(status))
            else:
                results.append(TaskHandle(self, item.task, created=item.created or auto_key))
        return results

    async def get(self, id: str, *, include_result_json: bool = False) -> task_pb2.Task:
        """The task as stored now; NotFoundError when there is no such task."""
        request = coordinator_pb2.GetTaskRequest(id=id, include_result_json=include_result_json)
        return (await self._unary(lambda s: s.GetTask, request)).task

    async def handle(self, id: str) -> TaskHandle:
        """A handle on an existing task (to wait for its result); NotFoundError when there is none."""
        return TaskHandle(self, await self.get(id), created=False)

    async def list(
        self,
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        page_size: int = 0,
        page_token: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        newest_first: bool = False,
    ) -> tuple[builtins.list[task_pb2.Task], str]:
        """One page of tasks matching every filter given, and the next page's token ("" on the last).

        Oldest first unless newest_first; pass the same order with a page token.
        """
        request = coordinator_pb2.ListTasksRequest(
            queue=queue,
            states=builtins.list(states),
            type=type,
            tags=builtins.list(tags),
            page_size=page_size,
            page_token=page_token,
            order=coordinator_pb2.TASK_ORDER_NEWEST_FIRST if newest_first else coordinator_pb2.TASK_ORDER_OLDEST_FIRST,
        )
        if created_after is not None:
            request.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.created_before.FromDatetime(created_before)
        response = await self._unary(lambda s: s.ListTasks, request)
        return builtins.list(response.tasks), response.next_page_token

    async def iter_tasks(
        self,
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        page_size: int = 0,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        newest_first: bool = False,
    ) -> AsyncGenerator[task_pb2.Task, None]:
        """Every matching task, fetching page after page as the iteration goes."""
        states, tags = tuple(states), tuple(tags)
        token = ""
        while True:
            tasks, token = await self.list(
                queue=queue,
                states=states,
                type=type,
                tags=tags,
                page_size=page_size,
                page_token=token,
                created_after=created_after,
                created_before=created_before,
                newest_first=newest_first,
            )
            for task in tasks:
                yield task
            if not token:
                return

    async def cancel(self, id: str, reason: str = "") -> task_pb2.Task:
        """Cancel a task that has not finished; a running one is cancelled on its worker.

        Returns the task (CANCELED, or still RUNNING with cancel_requested until its worker stops).
        FailedPreconditionError when it already finished, NotFoundError when there is no such task.
        Retried on UNAVAILABLE like every call: cancelling twice is harmless, but a retry after a
        reply was lost may find the task CANCELED by the first try and raise FailedPreconditionError.
        """
        request = coordinator_pb2.CancelTaskRequest(id=id, reason=reason)
        return (await self._unary(lambda s: s.CancelTask, request)).task

    async def retry(self, id: str, *, copy: bool = False, reason: str = "") -> task_pb2.Task:
        """Run a FAILED, CANCELED or EXPIRED task again: a new attempt of it, or (copy) a new task with its spec.

        Returns the task, QUEUED again, or the copy (its retry_of names the original).
        FailedPreconditionError names the state of a task in another one. A copy carries an
        idempotency key made here, so a retry of this call after a lost reply answers the same copy.
        """
        request = coordinator_pb2.RetryTaskRequest(
            id=id,
            mode=coordinator_pb2.RETRY_MODE_COPY if copy else coordinator_pb2.RETRY_MODE_NEW_ATTEMPT,
            reason=reason,
            idempotency_key=new_idempotency_key() if copy else "",
        )
        return (await self._unary(lambda s: s.RetryTask, request)).task

    async def pause_queue(self, queue: str) -> None:
        """Pause a queue, durably: it accepts tasks and starts none until resumed (running ones finish)."""
        request = coordinator_pb2.SetQueuePausedRequest(queue=queue, paused=True)
        await self._unary(lambda s: s.SetQueuePaused, request)

    async def resume_queue(self, queue: str) -> None:
        """Resume a paused queue; resuming one that is not paused changes nothing."""
        request = coordinator_pb2.SetQueuePausedRequest(queue=queue, paused=False)
        await self._unary(lambda s: s.SetQueuePaused, request)

    async def cancel_many(
        self, task_filter: coordinator_pb2.TaskFilter, *, dry_run: bool = False, reason: str = "", limit: int = 0
    ) -> coordinator_pb2.CancelTasksResponse:
        """Cancel the unfinished tasks the filter matches (at most limit, default 10000; `more` says if
        more remain), or with dry_run only count them. Answers matched and changed."""
        request = coordinator_pb2.CancelTasksRequest(filter=task_filter, dry_run=dry_run, reason=reason, limit=limit)
        return await self._unary(lambda s: s.CancelTasks, request)

    async def retry_many(
        self,
        task_filter: coordinator_pb2.TaskFilter,
        *,
        copy: bool = False,
        dry_run: bool = False,
        reason: str = "",
        limit: int = 0,
    ) -> coordinator_pb2.RetryTasksResponse:
        """Retry the FAILED, CANCELED and EXPIRED tasks the filter matches (at most limit, default 10000),
        or with dry_run only count them. Answers matched, changed and whether more remain."""
        request = coordinator_pb2.RetryTasksRequest(
            filter=task_filter,
            dry_run=dry_run,
            reason=reason,
            limit=limit,
            mode=coordinator_pb2.RETRY_MODE_COPY if copy else coordinator_pb2.RETRY_MODE_NEW_ATTEMPT,
        )
        return await self._unary(lambda s: s.RetryTasks, request)

    async def update_priority(self, id: str, priority: int) -> task_pb2.Task:
        """Change the priority of a PENDING or QUEUED task, durably; the next dispatch uses it.

        Returns the updated task. FailedPreconditionError when the task has started or finished,
        NotFoundError when there is no such task. Setting the same priority again changes nothing,
        so a retry on UNAVAILABLE is safe.
        """
        request = coordinator_pb2.UpdateTaskPriorityRequest(id=id, priority=priority)
        return (await self._unary(lambda s: s.UpdateTaskPriority, request)).task

    async def watch(
        self,
        ids: Iterable[str] = (),
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        skip_initial: bool = False,
        include_result_json: bool = False,
        after_revision: int = 0,
    ) -> AsyncGenerator[task_pb2.TaskEvent, None]:
        """State changes of the given tasks (or of every task matching the filters): the current
        state of each first (`event.initial`), unless `skip_initial`, then every change.

        `after_revision` resumes a stream on any replica: pass the last `event.revision` seen to
        get every later change and no snapshot, with no gap and no duplicate. When etcd has
        compacted that revision away, a fresh snapshot (`event.initial`) comes first instead.

        Runs until the caller stops iterating (close it with `contextlib.aclosing` or break and
        let it be collected; the stream is cancelled then). Opening the stream tries the replicas
        as unary calls do, for up to `timeout` seconds; a stream that breaks after delivering
        events raises UnavailableError; `TaskHandle.watch` is the variant that reconnects and resumes.
        """
        request = coordinator_pb2.WatchTasksRequest(
            ids=builtins.list(ids),
            queue=queue,
            states=builtins.list(states),
            type=type,
            tags=builtins.list(tags),
            skip_initial=skip_initial,
            include_result_json=include_result_json,
            after_revision=after_revision,
            max_events=WATCH_MAX_EVENTS,
        )
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # `timeout` seconds after the first failure to open it
        waits = 0
        while True:
            address = await self._endpoints.target()
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._endpoints.channel(address))
            call = stub.WatchTasks(request, metadata=_trace_metadata())
            received = False
            try:
                with _herder_errors():
                    async for response in call:
                        received = True
                        # A response without an event only flags the snapshot that follows (compaction).
                        for event in response.events:
                            yield event
                        if response.HasField("event"):
                            yield response.event
                return
            except errors.UnavailableError as exc:
                redirected = self._endpoints.failed(address, exc)
                deadline = deadline if deadline is not None else loop.time() + self._timeout
                if received or loop.time() >= deadline:
                    raise
                if not redirected:
                    waits += 1
                    await asyncio.sleep(min(self.retry_backoff.delay(waits), max(deadline - loop.time(), 0)))
            finally:
                call.cancel()

    # --- task types and queues ---

    async def register_task_type(
        self,
        name: str,
        input_class: MessageType | str,
        output_class: MessageType | str,
        description: str = "",
        *,
        descriptors: descriptor_pb2.FileDescriptorSet | None = None,
        force: bool = False,
    ) -> task_pb2.TaskType:
        """Register a task type with its input and output messages and their descriptors, or a new
        version of it; returns the type as registered (`version`, `registered_by`, ...). No worker
        needs to run: tasks of the type are accepted (and wait) from now on.

        Give the generated message classes (their descriptors are sent along), or their full names
        (`"images.v1.ResizeRequest"`) with the `descriptors` that define them: a set from
        `herder.clients.proto_sources` (`.proto` files, `buf build -o FILE`). Raises
        InvalidArgumentError, naming the field, when the coordinator refuses the contract.

        Registering the same messages again changes nothing (an empty description keeps the registered
        one), so a retry on UNAVAILABLE is safe. Messages that are not wire- and JSON-compatible with
        the registered version raise FailedPreconditionError with a violation per breaking change,
        unless `force` (logged by the coordinator; workers of earlier versions are then refused).
        """
        if isinstance(input_class, str) or isinstance(output_class, str):
            if not (isinstance(input_class, str) and isinstance(output_class, str)) or descriptors is None:
                raise TypeError("message names need `descriptors`, and both input and output given as names")
            task_type = task_pb2.TaskType(
                name=name,
                input_type=input_class,
                output_type=output_class,
                descriptors=descriptors,
                description=description,
            )
        else:
            task_type = task_type_for(name, input_class, output_class, description=description)
        request = coordinator_pb2.RegisterTaskTypeRequest(task_type=task_type, force=force)
        # Names this process as who registered the version (else the coordinator records its address).
        response = await self._unary(lambda s: s.RegisterTaskType, request, caller_metadata("client"))
        return response.task_type

    async def task_types(self) -> builtins.list[task_pb2.TaskType]:
        response = await self._unary(lambda s: s.ListTaskTypes, coordinator_pb2.ListTaskTypesRequest())
        return builtins.list(response.task_types)

    async def get_task_type(self, name: str, *, include_versions: bool = True) -> task_pb2.TaskType:
        """The registered type called `name`, with its kept versions (newest first, each with its
        descriptors) unless `include_versions` is false. Raises NotFoundError when it is not registered."""
        request = coordinator_pb2.ListTaskTypesRequest(names=[name], include_versions=include_versions)
        response = await self._unary(lambda s: s.ListTaskTypes, request)
        for task_type in response.task_types:
            if task_type.name == name:
                return task_type
        raise errors.NotFoundError(f"task type {name} is not registered")

    async def unpack_result(self, task: task_pb2.Task, output_type: type[M] | None = None) -> Message:
        """The task's result as a message: `output_type` when given, else the generated class of its
        type when imported, else a class built from the descriptors its task type was registered with,
        so it prints its fields rather than an Any's bytes. The Any itself only when the type is not
        registered any more (or its descriptors do not define the message)."""
        value = task.result
        found = unpack(value, output_type)
        if not isinstance(found, any_pb2.Any) or not value.type_url:
            return found
        try:
            descriptor = self._registered_pool.FindMessageTypeByName(value.TypeName())
        except KeyError:
            try:
                task_type = await self.get_task_type(task.spec.type, include_versions=False)
            except errors.NotFoundError:
                return found
            add_files(self._registered_pool, task_type.descriptors.file)
            try:
                descriptor = self._registered_pool.FindMessageTypeByName(value.TypeName())
            except KeyError:
                return found
        result = message_factory.GetMessageClass(descriptor)()
        value.Unpack(result)
        return result

    async def queues(self) -> builtins.list[coordinator_pb2.QueueStats]:
        """Every queue with its backlog by state, the tasks a limit holds back, its limit and retention,
        finished counts, the oldest waiting task, wait time p50/p99 and dispatch rate."""
        response = await self._unary(lambda s: s.ListQueues, coordinator_pb2.ListQueuesRequest())
        return builtins.list(response.queues)

    # --- limits ---

    async def set_limit(
        self,
        scope: str | LimitScope,
        name: str = "",
        *,
        max_running: int | None = None,
        weight: int | None = None,
        retention: Seconds | None = None,
    ) -> coordinator_pb2.Limit:
        """Set the scheduling settings of one scope and return them as stored; durable, in effect
        for the next dispatch.

        `scope` is "global" (no name), "queue" (a queue's name) or "key" (a concurrency key).
        `max_running` caps the tasks assigned or running at once (0: no limit); `weight` is a key's
        share of its queue in tasks per round (0 means 1); `retention` (seconds or timedelta) is how
        long a queue's finished tasks are kept (0: the coordinator's default).

        The coordinator's SetLimit replaces the whole limit of a scope and name, so this method
        merges: a field left None keeps its current value, read with ListLimits first (skipped when
        every field the scope uses is given). The read and the write are two calls, so two callers
        changing different fields of one limit at the same moment can lose one change; give every
        field to write the limit in one call. SetLimit stores the same limit again when retried on
        UNAVAILABLE. Invalid values raise InvalidArgumentError naming the
        field (`limit.max_running`, `limit.weight`, `limit.retention`, `limit.name`, `limit.scope`)
        and change nothing.
        """
        wanted = parse_scope(scope)
        given = {
            field_name
            for field_name, value in (("max_running", max_running), ("weight", weight), ("retention", retention))
            if value is not None
        }
        violations: builtins.list[tuple[str, str]] = []
        if not given:
            violations.append(("limit", "give max_running, weight or retention"))
        if max_running is not None and not -_INT64_MAX - 1 <= max_running <= _INT64_MAX:
            violations.append(("limit.max_running", "must fit in 64 bits"))
        if weight is not None and not 0 <= weight <= _UINT32_MAX:
            violations.append(("limit.weight", f"must be between 0 and {_UINT32_MAX}"))
        retention_delta = _bounded_timedelta(retention) if retention is not None else None
        if retention is not None and retention_delta is None:
            violations.append(("limit.retention", "must be a finite number of seconds a Duration can hold"))
        if violations:
            raise errors.bad_request("invalid limit", violations)
        limit = coordinator_pb2.Limit(scope=wanted, name=name)
        if not _SCOPE_FIELDS[wanted] <= given:
            for current in await self.limits():
                if current.scope == wanted and current.name == name:
                    limit.CopyFrom(current)
                    break
        if max_running is not None:
            limit.max_running = max_running
        if weight is not None:
            limit.weight = weight
        if retention_delta is not None:
            limit.retention.FromTimedelta(retention_delta)
        response = await self._unary(lambda s: s.SetLimit, coordinator_pb2.SetLimitRequest(limit=limit))
        return response.limit

    async def limits(self) -> builtins.list[coordinator_pb2.Limit]:
        """Every limit set (global, per queue, per concurrency key) with its weight and retention."""
        response = await self._unary(lambda s: s.ListLimits, coordinator_pb2.ListLimitsRequest())
        return builtins.list(response.limits)

    # --- cluster ---

    async def nodes(self) -> builtins.list[coordinator_pb2.Node]:
        response = await self._unary(lambda s: s.ListNodes, coordinator_pb2.ListNodesRequest())
        return builtins.list(response.nodes)

    async def cluster_status(self) -> coordinator_pb2.GetClusterStatusResponse:
        return await self._unary(lambda s: s.GetClusterStatus, coordinator_pb2.GetClusterStatusRequest())

    # --- locks ---

    def lock(self, name: str, *, ttl: Seconds = 30.0, wait: Seconds = 60.0, owner: str = "") -> Lock:
        """A distributed lock, held inside `async with client.lock(name) as lock:`.

        `lock.token` is its fencing token: send it with every write the lock guards. Entry waits
        up to `wait` seconds (0: try once) and raises LockHeldError if another holder keeps it.
        The lock is refreshed about every ttl/3; if it is lost (released or revoked behind its
        back, or no refresh succeeds before the TTL runs out) the body is CANCELLED and the
        `async with` raises LockLostError. Exit releases it, shielded from cancellation.
        Any coordinator replica serves locks, leader or not: an Acquire that cannot connect, and
        every failed refresh, moves on to the next address given.
        """
        return Lock(
            self.channel,
            name,
            ttl=ttl,
            wait=wait,
            owner=owner or default_owner(),
            timeout=self._timeout,
            next_replica=lambda error: self._endpoints.failed(self._endpoints.current, error),
            replicas=self._endpoints.size,
        )

    # --- plumbing ---

    def _stub(self) -> CoordinatorServiceAsyncStub:
        return coordinator_pb2_grpc.CoordinatorServiceStub(self.channel())

    def channel(self) -> grpc.aio.Channel:
        """The channel to the coordinator this client talks to now (opened on first use)."""
        return self._endpoints.channel()

    async def _unary(
        self,
        method: Callable[[CoordinatorServiceAsyncStub], grpc.aio.UnaryUnaryMultiCallable[Req, Resp]],
        request: Req,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Resp:
        async def attempt(channel: grpc.aio.Channel, timeout: float) -> Resp:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            with _herder_errors():
                return await method(stub)(request, timeout=timeout, metadata=_trace_metadata() + metadata)

        return await self._endpoints.call(attempt, timeout=self._timeout, backoff=self.retry_backoff)


class TaskHandle:
    """A submitted task: its id, the last state seen, and ways to wait for it or cancel it."""

    def __init__(self, client: Client, task: task_pb2.Task, *, created: bool = True) -> None:
        self._client = client
        self._task = task
        self.created = created

    def __repr__(self) -> str:
        return f"TaskHandle(id={self.id!r}, state={state_name(self._task.state)})"

    @property
    def id(self) -> str:
        return self._task.id

    @property
    def task(self) -> task_pb2.Task:
        """The task as last seen by this handle (submit, refresh, watch or result)."""
        return self._task

    async def refresh(self, *, include_result_json: bool = False) -> task_pb2.Task:
        """Fetch the task again and remember it."""
        self._task = await self._client.get(self.id, include_result_json=include_result_json)
        return self._task

    async def watch(self) -> AsyncGenerator[task_pb2.TaskEvent, None]:
        """The task's events, from its current state until it reaches a terminal state.

        A stream broken by a coordinator restart or leader change is re-opened (see
        `WatchReconnect`), on any replica, resuming after the last revision seen: no event is
        missed or repeated (after a compaction the current state comes again, if newer). Raises the last error when
        the stream stays broken for `give_up_after` seconds; any other error is raised at once.
        Closing or cancelling the iteration cancels the stream.
        """
        settings = self._client.watch_reconnect
        last_revision = 0
        failures = 0
        failing_since: float | None = None
        while True:
            try:
                async with contextlib.aclosing(self._client.watch([self.id], after_revision=last_revision)) as events:
                    async for event in events:
                        failures, failing_since = 0, None
                        if event.revision and event.revision <= last_revision:
                            continue
                        last_revision = max(last_revision, event.revision)
                        self._task = event.task
                        yield event
                        if is_terminal(event.task.state):
                            return
                failure: errors.HerderError = errors.UnavailableError(f"the watch of task {self.id} keeps ending")
            # Transient: a restart or leader change (UNAVAILABLE), a server shutting streams down
            # (CANCELLED), a watcher the coordinator dropped for lagging (RESOURCE_EXHAUSTED).
            except (errors.UnavailableError, errors.CancelledError, errors.ResourceExhaustedError) as exc:
                failure = exc
            now = time.monotonic()
            failing_since = failing_since if failing_since is not None else now
            if now - failing_since >= settings.give_up_after:
                raise failure
            failures += 1
            await asyncio.sleep(settings.backoff.delay(failures))

    async def wait(self, timeout: float | None = None) -> task_pb2.Task:
        """The task once it reached a terminal state (whichever it is); TimeoutError after `timeout`
        seconds. Cancelling the wait cancels only the wait, not the task."""
        if not is_terminal(self._task.state):
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self.watch()) as events:
                    async for _ in events:
                        pass
        if self._task.state == task_pb2.TASK_STATE_SUCCEEDED and not self._task.HasField("result"):
            await self.refresh()
        return self._task

    @overload
    async def result(self, timeout: float | None = None, output_type: None = None) -> Message: ...
    @overload
    async def result(self, timeout: float | None, output_type: type[M]) -> M: ...
    @overload
    async def result(self, timeout: float | None = None, *, output_type: type[M]) -> M: ...

    async def result(self, timeout: float | None = None, output_type: type[M] | None = None) -> Message:
        """Wait (watching, not polling) for the task to finish and return its output message.

        The output is unpacked into `output_type` when given, else into the generated class
        of its type when imported, else into a class built from its task type's registered
        descriptors (see `Client.unpack_result`). Raises TaskFailedError when the
        task ends FAILED, CANCELED or EXPIRED, and TimeoutError after `timeout` seconds.
        """
        task = await self.wait(timeout)
        if task.state != task_pb2.TASK_STATE_SUCCEEDED:
            raise _task_failed(task)
        return await self._client.unpack_result(task, output_type)

    async def cancel(self, reason: str = "") -> task_pb2.Task:
        """Ask the coordinator to cancel the task; see `Client.cancel`."""
        self._task = await self._client.cancel(self.id, reason)
        return self._task


def _give_key(spec: task_pb2.TaskSpec) -> bool:
    """Give a spec without an idempotency key a unique one; True when it did."""
    if spec.idempotency_key:
        return False
    spec.idempotency_key = new_idempotency_key()
    return True


def _task_failed(task: task_pb2.Task) -> errors.TaskFailedError:
    state = state_name(task.state)
    detail = ": ".join(part for part in (task.error.type, task.error.message) if part)
    message = f"task {task.id} {state}" + (f": {detail}" if detail else "")
    return errors.TaskFailedError(
        message,
        task_id=task.id,
        state=state,
        error_type=task.error.type,
        error_message=task.error.message,
        details=task.error.details,
        attempt_errors=tuple(task.attempt_errors),
    )


def _trace_metadata() -> tuple[tuple[str, str], ...]:
    """The caller's trace context (W3C traceparent) as call metadata, so a task joins the caller's trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((key.lower(), value) for key, value in carrier.items())


def _timedelta(value: Seconds) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def _bounded_timedelta(value: Seconds) -> timedelta | None:
    """The value as a timedelta, or None when it is not finite or outside a protobuf Duration's range."""
    if not isinstance(value, timedelta) and not math.isfinite(value):
        return None
    try:
        delta = _timedelta(value)
    except OverflowError:
        return None
    return delta if abs(delta.total_seconds()) <= _DURATION_MAX_SECONDS else None


def _duration(value: Seconds) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(_timedelta(value))
    return duration


def timestamp_to_datetime(value: timestamp_pb2.Timestamp) -> datetime | None:
    """A Timestamp as an aware UTC datetime; None when unset (zero)."""
    if not value.seconds and not value.nanos:
        return None
    return value.ToDatetime(tzinfo=UTC)


class SyncClient:
    """The same client for synchronous code: an asyncio `Client` on its own loop in a daemon thread.

    Methods block until done and return plain values; `submit` returns a `SyncTaskHandle`.
    KeyboardInterrupt while a call blocks cancels that call. Close it (or use `with`) to stop the thread.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        timeout: float = 10.0,
        watch_reconnect: WatchReconnect | None = None,
        retry_backoff: Backoff | None = None,
    ) -> None:
        # Built first: a bad address raises before a thread is started.
        client = Client(address, timeout=timeout, watch_reconnect=watch_reconnect, retry_backoff=retry_backoff)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="herder-sync-client", daemon=True)
        self._thread.start()
        self._client = client
        self._closed = False

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._client.addresses

    @property
    def client(self) -> Client:
        """The asyncio client underneath (runs on this wrapper's own loop)."""
        return self._client

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels and stop the loop thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the client's loop and wait for it (cancelled on KeyboardInterrupt)."""
        if self._closed:
            coroutine.close()
            raise errors.FailedPreconditionError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def submit(
        self,
        type: str,
        payload: Message | None = None,
        *,
        json: str | Mapping[str, Any] | None = None,
        queue: str = "",
        priority: int = 0,
        idempotency_key: str = "",
        concurrency_key: str = "",
        delay: Seconds | None = None,
        not_before: datetime | None = None,
        ttl: Seconds | None = None,
        timeout: Seconds | None = None,
        retry: Retry | task_pb2.RetryPolicy | None = None,
        tags: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        resources: task_pb2.Resources | None = None,
    ) -> SyncTaskHandle:
        """Submit one task; see `Client.submit`."""
        handle = self.run(
            self._client.submit(
                type,
                payload,
                json=json,
                queue=queue,
                priority=priority,
                idempotency_key=idempotency_key,
                concurrency_key=concurrency_key,
                delay=delay,
                not_before=not_before,
                ttl=ttl,
                timeout=timeout,
                retry=retry,
                tags=tags,
                metadata=metadata,
                resources=resources,
            )
        )
        return SyncTaskHandle(self, handle)

    def submit_many(self, specs: Iterable[task_pb2.TaskSpec]) -> builtins.list[SyncTaskHandle | errors.HerderError]:
        results = self.run(self._client.submit_many(specs))
        return [r if isinstance(r, errors.HerderError) else SyncTaskHandle(self, r) for r in results]

    def get(self, id: str, *, include_result_json: bool = False) -> task_pb2.Task:
        return self.run(self._client.get(id, include_result_json=include_result_json))

    def handle(self, id: str) -> SyncTaskHandle:
        return SyncTaskHandle(self, self.run(self._client.handle(id)))

    def list(
        self,
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        page_size: int = 0,
        page_token: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        newest_first: bool = False,
    ) -> tuple[builtins.list[task_pb2.Task], str]:
        return self.run(
            self._client.list(
                queue=queue,
                states=states,
                type=type,
                tags=tags,
                page_size=page_size,
                page_token=page_token,
                created_after=created_after,
                created_before=created_before,
                newest_first=newest_first,
            )
        )

    def iter_tasks(
        self,
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        page_size: int = 0,
    ) -> Iterator[task_pb2.Task]:
        return self._iterate(
            self._client.iter_tasks(queue=queue, states=states, type=type, tags=tags, page_size=page_size)
        )

    def cancel(self, id: str, reason: str = "") -> task_pb2.Task:
        return self.run(self._client.cancel(id, reason))

    def update_priority(self, id: str, priority: int) -> task_pb2.Task:
        return self.run(self._client.update_priority(id, priority))

    def retry(self, id: str, *, copy: bool = False, reason: str = "") -> task_pb2.Task:
        return self.run(self._client.retry(id, copy=copy, reason=reason))

    def pause_queue(self, queue: str) -> None:
        self.run(self._client.pause_queue(queue))

    def resume_queue(self, queue: str) -> None:
        self.run(self._client.resume_queue(queue))

    def cancel_many(
        self, task_filter: coordinator_pb2.TaskFilter, *, dry_run: bool = False, reason: str = "", limit: int = 0
    ) -> coordinator_pb2.CancelTasksResponse:
        return self.run(self._client.cancel_many(task_filter, dry_run=dry_run, reason=reason, limit=limit))

    def retry_many(
        self,
        task_filter: coordinator_pb2.TaskFilter,
        *,
        copy: bool = False,
        dry_run: bool = False,
        reason: str = "",
        limit: int = 0,
    ) -> coordinator_pb2.RetryTasksResponse:
        return self.run(self._client.retry_many(task_filter, copy=copy, dry_run=dry_run, reason=reason, limit=limit))

    def watch(
        self,
        ids: Iterable[str] = (),
        *,
        queue: str = "",
        states: Iterable[State] = (),
        type: str = "",
        tags: Iterable[str] = (),
        skip_initial: bool = False,
        include_result_json: bool = False,
        after_revision: int = 0,
    ) -> Iterator[task_pb2.TaskEvent]:
        """See `Client.watch`; the stream is cancelled when the iterator is closed."""
        return self._iterate(
            self._client.watch(
                ids,
                queue=queue,
                states=states,
                type=type,
                tags=tags,
                skip_initial=skip_initial,
                include_result_json=include_result_json,
                after_revision=after_revision,
            )
        )

    def register_task_type(
        self,
        name: str,
        input_class: MessageType | str,
        output_class: MessageType | str,
        description: str = "",
        *,
        descriptors: descriptor_pb2.FileDescriptorSet | None = None,
        force: bool = False,
    ) -> task_pb2.TaskType:
        """See `Client.register_task_type`."""
        return self.run(
            self._client.register_task_type(
                name, input_class, output_class, description, descriptors=descriptors, force=force
            )
        )

    def task_types(self) -> builtins.list[task_pb2.TaskType]:
        return self.run(self._client.task_types())

    def get_task_type(self, name: str, *, include_versions: bool = True) -> task_pb2.TaskType:
        return self.run(self._client.get_task_type(name, include_versions=include_versions))

    def queues(self) -> builtins.list[coordinator_pb2.QueueStats]:
        return self.run(self._client.queues())

    def set_limit(
        self,
        scope: str | LimitScope,
        name: str = "",
        *,
        max_running: int | None = None,
        weight: int | None = None,
        retention: Seconds | None = None,
    ) -> coordinator_pb2.Limit:
        """See `Client.set_limit`: fields left None keep their current values (read first)."""
        return self.run(
            self._client.set_limit(scope, name, max_running=max_running, weight=weight, retention=retention)
        )

    def limits(self) -> builtins.list[coordinator_pb2.Limit]:
        return self.run(self._client.limits())

    def nodes(self) -> builtins.list[coordinator_pb2.Node]:
        return self.run(self._client.nodes())

    def cluster_status(self) -> coordinator_pb2.GetClusterStatusResponse:
        return self.run(self._client.cluster_status())

    @contextlib.contextmanager
    def lock(self, name: str, *, ttl: Seconds = 30.0, wait: Seconds = 60.0, owner: str = "") -> Iterator[Lock]:
        """A distributed lock, held inside `with client.lock(name) as lock:` (see `Client.lock`).

        Refreshed in the background on the client's loop thread. Synchronous code cannot be
        cancelled, so the body is NOT interrupted when the lock is lost: LockLostError is raised
        at exit instead; check `lock.lost.is_set()` before writes if the body runs long.
        """
        held = self._client.lock(name, ttl=ttl, wait=wait, owner=owner)
        self.run(held.start(cancel_body=False))
        try:
            yield held
        finally:
            self.run(held.stop())

    def _iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await anext(iterator)

        async def close() -> None:
            close_fn: Callable[[], Awaitable[None]] | None = getattr(iterator, "aclose", None)
            if close_fn is not None:
                await close_fn()

        try:
            while True:
                try:
                    yield self.run(step())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self.run(close())


class SyncTaskHandle:
    """`TaskHandle` for synchronous code; its methods block."""

    def __init__(self, client: SyncClient, handle: TaskHandle) -> None:
        self._client = client
        self._handle = handle

    def __repr__(self) -> str:
        return repr(self._handle).replace("TaskHandle", "SyncTaskHandle", 1)

    @property
    def id(self) -> str:
        return self._handle.id

    @property
    def task(self) -> task_pb2.Task:
        return self._handle.task

    @property
    def created(self) -> bool:
        return self._handle.created

    def refresh(self, *, include_result_json: bool = False) -> task_pb2.Task:
        return self._client.run(self._handle.refresh(include_result_json=include_result_json))

    def watch(self) -> Iterator[task_pb2.TaskEvent]:
        return self._client._iterate(self._handle.watch())

    def wait(self, timeout: float | None = None) -> task_pb2.Task:
        return self._client.run(self._handle.wait(timeout))

    @overload
    def result(self, timeout: float | None = None, output_type: None = None) -> Message: ...
    @overload
    def result(self, timeout: float | None, output_type: type[M]) -> M: ...
    @overload
    def result(self, timeout: float | None = None, *, output_type: type[M]) -> M: ...

    def result(self, timeout: float | None = None, output_type: type[M] | None = None) -> Message:
        """See `TaskHandle.result`: blocks until the task finishes or `timeout` seconds pass."""
        return self._client.run(self._handle.result(timeout, output_type))

    def cancel(self, reason: str = "") -> task_pb2.Task:
        return self._client.run(self._handle.cancel(reason))


__all__ = [
    "AUTO_KEY_PREFIX",
    "DEFAULT_ADDRESS",
    "TERMINAL_STATES",
    "Client",
    "LimitScope",
    "Retry",
    "State",
    "SyncClient",
    "SyncTaskHandle",
    "TaskHandle",
    "WatchReconnect",
    "is_terminal",
    "parse_scope",
    "parse_state",
    "scope_name",
    "state_name",
    "task_spec",
    "timestamp_to_datetime",
    "unpack",
]
