"""CoordinatorService: the gRPC edge. It validates, converts and hands work to the namespace leader.

On a follower, reads of stored records are answered from etcd (reads.py), reads of the leader's
live state are forwarded to it (forwarding.py), and writes and worker sessions are redirected.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from herder.clients import errors
from herder.clients.errors import CLIENT_METADATA_KEY
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2
from herder.server import keys, placement, validation, verbs
from herder.server.contracts import hello_versions_refused, resolve_payload
from herder.server.entries import TERMINAL
from herder.server.forwarding import Forwarder, is_forwarded
from herder.server.horizon import set_timestamp, timestamp_seconds
from herder.server.leader import NamespaceLeader
from herder.server.reads import StoredReads
from herder.server.unary import unary as _unary
from herder.server.watchers import TaskFilter
from herder.server.watching import Watching

log = logging.getLogger(__name__)

# The longest a request holds the event loop between yields while checking a batch.
_TURN = 0.01
# Acknowledgements or results in one Connect message: a worker has at most this many slots.
MAX_ITEMS_PER_MESSAGE = validation.MAX_SLOTS

_TRACE_HEADERS = ("traceparent", "tracestate")
# How long a follower's GetClusterStatus waits for the leader's session and task counts.
_LEADER_COUNTS_TIMEOUT = 1.0

M = TypeVar("M", bound=Message)


def _caller(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Who calls, as recorded with a task type version: its x-herder-client metadata, else its peer."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_METADATA_KEY and isinstance(value, str) and value.isprintable() and value:
            return value[:128]
    return str(context.peer() or "")


def _trace_context(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """The caller's W3C trace context from the call's metadata."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in _TRACE_HEADERS and isinstance(value, str) and len(value) <= 512:
            found[key] = value
    return found


def _created(
    request: coordinator_pb2.ListTasksRequest | coordinator_pb2.TaskFilter,
) -> tuple[float | None, float | None]:
    """The created-time bounds a request sets: (after, before), None where unset."""
    after = timestamp_seconds(request.created_after) if request.HasField("created_after") else None
    before = timestamp_seconds(request.created_before) if request.HasField("created_before") else None
    return after, before


def _task_filter(message: coordinator_pb2.TaskFilter) -> TaskFilter:
    return TaskFilter(
        queue=message.queue,
        states=frozenset(message.states),
        type=message.type,
        tags=frozenset(message.tags),
        created_after=_created(message)[0],
        created_before=_created(message)[1],
    )


def _mode(mode: int) -> list[errors.FieldViolation]:
    if mode not in coordinator_pb2.RetryMode.values():
        return [errors.FieldViolation("mode", f"is not a known retry mode ({mode})")]
    return []


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Any) -> None:
        # herder.server.app.Coordinator; typed loosely to keep the import one-way.
        self._coordinator = coordinator
        self._limits: validation.Limits = coordinator.limits
        self._stored = StoredReads(coordinator.etcd, coordinator.prefix)
        self._watching = Watching(coordinator, coordinator.config.watch, self._limits, self._stored)

    def _leading(self) -> NamespaceLeader | None:
        """The namespace leader while this replica leads, else None (a follower)."""
        leader: NamespaceLeader | None = self._coordinator.leader
        return None if leader is None or leader.deposed else leader

    def _leader(self) -> NamespaceLeader:
        leader = self._leading()
        if leader is None:
            raise errors.NotLeaderError(
                self._coordinator.not_leader_message(), leader_address=self._coordinator.leader_address()
            )
        return leader

    async def _forward(
        self, method: str, request: Message, response_type: type[M], context: grpc.aio.ServicerContext[Any, Any]
    ) -> M:
        """A follower's answer for the leader's live state: the leader's own, asked over gRPC."""
        forwarder: Forwarder = self._coordinator.forwarder
        return await forwarder.forward(method, request, response_type, context, self._coordinator.leader_address())

    def _stepped_down(self) -> grpc.Status:
        """The status a stream ends with when this coordinator stops leading in the middle of it."""
        error = errors.NotLeaderError("the coordinator stepped down", leader_address=self._coordinator.leader_address())
        return errors.to_status(error)

    def _prepare(self, leader: NamespaceLeader, spec: task_pb2.TaskSpec, prefix: str) -> list[errors.FieldViolation]:
        violations = validation.validate_spec(spec, self._limits, prefix)
        if not violations:
            violations = resolve_payload(
                spec,
                leader.registry,
                accept_unregistered=leader.settings.accept_unregistered_types,
                prefix=prefix,
            )
        return violations

    @_unary
    async def SubmitTask(
        self, request: coordinator_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.SubmitTaskResponse:
        leader = self._leader()
        self._coordinator.overload.check()
        spec = request.spec
        # Fields this version does not know would be stored and grow the record unseen: dropped here.
        spec.DiscardUnknownFields()
        validation.raise_if(self._prepare(leader, spec, "spec"), "invalid task spec")
        versions = [leader.registry.version(spec.type)]
        [(task, created)] = await leader.submit([spec], _trace_context(context), type_versions=versions)
        return coordinator_pb2.SubmitTaskResponse(task=task, created=created)

    @_unary
    async def SubmitTasks(
        self, request: coordinator_pb2.SubmitTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.SubmitTasksResponse:
        leader = self._leader()
        self._coordinator.overload.check()
        validation.raise_if(validation.validate_batch_size(len(request.specs), "specs", self._limits), "invalid batch")
        request.DiscardUnknownFields()
        results = [coordinator_pb2.SubmitTaskResult() for _ in request.specs]
        accepted: list[tuple[int, task_pb2.TaskSpec]] = []
        # The type version each accepted spec was checked against (a registration may land between turns).
        versions: list[int] = []
        turn = time.monotonic()
        for i, spec in enumerate(request.specs):
            if time.monotonic() - turn > _TURN:
                # A batch of large JSON payloads can take seconds to check: the loop (and the lease
                # keep-alive with it) must not wait for all of it.
                await asyncio.sleep(0)
                turn = time.monotonic()
            violations = self._prepare(leader, spec, f"specs[{i}]")
            if violations:
                status = errors.to_status_proto(errors.InvalidArgumentError("invalid task spec", violations=violations))
                results[i].code = status.code
                results[i].message = status.message
                results[i].details.extend(status.details)
            else:
                accepted.append((i, spec))
                versions.append(leader.registry.version(spec.type))
        stored = await leader.submit([spec for _, spec in accepted], _trace_context(context), type_versions=versions)
        for (i, _), (task, created) in zip(accepted, stored, strict=True):
            results[i].task.CopyFrom(task)
            results[i].created = created
        return coordinator_pb2.SubmitTasksResponse(results=results)

    def _render(self, task: task_pb2.Task, include_json: bool) -> task_pb2.Task:
        return self._stored.render(task, include_json, self._coordinator.leader)

    @_unary
    async def GetTask(
        self, request: coordinator_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetTaskResponse:
        validation.raise_if(validation.validate_id(request.id, "id", self._limits), "invalid task id")
        leader = self._leading()
        if leader is None:
            task = await self._stored.get(request.id, request.include_result_json)
            return coordinator_pb2.GetTaskResponse(task=task)
        task = await leader.get(request.id)
        return coordinator_pb2.GetTaskResponse(task=self._render(task, request.include_result_json))

    @_unary
    async def ListTasks(
        self, request: coordinator_pb2.ListTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListTasksResponse:
        violations = validation.validate_page_size(request.page_size, "page_size", self._limits)
        violations += validation.validate_filter((), request.states, request.tags, self._limits)
        start = b""
        if request.page_token:
            try:
                start = base64.b64decode(request.page_token.encode(), altchars=b"-_", validate=True)
                start[len(keys.tasks_prefix(self._coordinator.prefix)) :].decode()
            except (ValueError, TypeError):
                start = b"\xff"
            if not start.startswith(keys.tasks_prefix(self._coordinator.prefix)):
                violations.append(errors.FieldViolation("page_token", "is not a token from an earlier page"))
        violations += validation.validate_created(
            request.created_after if request.HasField("created_after") else None,
            request.created_before if request.HasField("created_before") else None,
        )
        if request.order not in coordinator_pb2.TaskOrder.values():
            violations.append(errors.FieldViolation("order", f"is not a known order ({request.order})"))
        validation.raise_if(violations, "invalid listing request")
        task_filter = TaskFilter(
            queue=request.queue,
            states=frozenset(request.states),
            type=request.type,
            tags=frozenset(request.tags),
            created_after=_created(request)[0],
            created_before=_created(request)[1],
        )
        newest_first = request.order == coordinator_pb2.TASK_ORDER_NEWEST_FIRST
        leader = self._leading()
        page_size = request.page_size or self._limits.default_page_size
        tasks_prefix = keys.tasks_prefix(self._coordinator.prefix)
        if leader is not None and task_filter.states and not task_filter.states & TERMINAL:
            # Only unfinished tasks asked for: the leader holds every one of them (a follower reads etcd).
            after = start[len(tasks_prefix) :].decode() if start else ""
            found, more = await leader.list_unfinished(task_filter, after, page_size, newest_first)
            last_key = keys.task(self._coordinator.prefix, found[-1].id) if found else b""
        else:
            found, more, last_key = await self._stored.tasks(start, task_filter, page_size, newest_first)
        token = base64.urlsafe_b64encode(last_key).decode() if more and last_key else ""
        return coordinator_pb2.ListTasksResponse(
            tasks=[self._render(task, False) for task in found], next_page_token=token
        )

    @_unary
    async def CancelTask(
        self, request: coordinator_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CancelTaskResponse:
        violations = validation.validate_id(request.id, "id", self._limits)
        if len(request.reason) > 1024:
            violations.append(errors.FieldViolation("reason", "must be at most 1024 characters"))
        validation.raise_if(violations, "invalid cancel request")
        task = await self._leader().cancel(request.id, request.reason)
        return coordinator_pb2.CancelTaskResponse(task=task)

    @_unary
    async def RetryTask(
        self, request: coordinator_pb2.RetryTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.RetryTaskResponse:
        violations = validation.validate_id(request.id, "id", self._limits)
        violations += validation.validate_reason(request.reason)
        violations += _mode(request.mode)
        if len(request.idempotency_key) > self._limits.max_id_length:
            violations.append(
                errors.FieldViolation("idempotency_key", f"must be at most {self._limits.max_id_length} characters")
            )
        elif request.idempotency_key and request.mode != coordinator_pb2.RETRY_MODE_COPY:
            violations.append(errors.FieldViolation("idempotency_key", "applies to RETRY_MODE_COPY only"))
        validation.raise_if(violations, "invalid retry request")
        leader = self._leader()
        self._coordinator.overload.check()
        task = await leader.verbs.retry(request.id, request.mode, request.reason, request.idempotency_key)
        return coordinator_pb2.RetryTaskResponse(task=self._render(task, False))

    @_unary
    async def SetQueuePaused(
        self, request: coordinator_pb2.SetQueuePausedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.SetQueuePausedResponse:
        validation.raise_if(validation.validate_name(request.queue, "queue", self._limits), "invalid queue")
        await self._leader().set_paused(request.queue, request.paused)
        return coordinator_pb2.SetQueuePausedResponse(queue=request.queue, paused=request.paused)

    @_unary
    async def CancelTasks(
        self, request: coordinator_pb2.CancelTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.CancelTasksResponse:
        violations = validation.validate_task_filter(request.filter, verbs.UNFINISHED, self._limits)
        violations += validation.validate_bulk_limit(request.limit, verbs.MAX_BULK)
        violations += validation.validate_reason(request.reason)
        validation.raise_if(violations, "invalid bulk cancel")
        outcome = await self._leader().verbs.cancel_many(
            _task_filter(request.filter), request.reason, request.limit or verbs.MAX_BULK, request.dry_run
        )
        return coordinator_pb2.CancelTasksResponse(matched=outcome.matched, changed=outcome.changed, more=outcome.more)

    @_unary
    async def RetryTasks(
        self, request: coordinator_pb2.RetryTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.RetryTasksResponse:
        violations = validation.validate_task_filter(request.filter, verbs.RETRYABLE, self._limits)
        violations += validation.validate_bulk_limit(request.limit, verbs.MAX_BULK)
        violations += validation.validate_reason(request.reason)
        violations += _mode(request.mode)
        validation.raise_if(violations, "invalid bulk retry")
        outcome = await self._leader().verbs.retry_many(
            _task_filter(request.filter),
            request.mode,
            request.reason,
            request.limit or verbs.MAX_BULK,
            request.dry_run,
        )
        return coordinator_pb2.RetryTasksResponse(matched=outcome.matched, changed=outcome.changed, more=outcome.more)

    @_unary
    async def UpdateTaskPriority(
        self, request: coordinator_pb2.UpdateTaskPriorityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.UpdateTaskPriorityResponse:
        violations = validation.validate_id(request.id, "id", self._limits)
        if abs(request.priority) > self._limits.max_abs_priority:
            violations.append(
                errors.FieldViolation(
                    "priority", f"must be between -{self._limits.max_abs_priority} and {self._limits.max_abs_priority}"
                )
            )
        validation.raise_if(violations, "invalid priority update")
        task = await self._leader().update_priority(request.id, request.priority)
        return coordinator_pb2.UpdateTaskPriorityResponse(task=self._render(task, False))

    @_unary
    async def ListQueues(
        self, request: coordinator_pb2.ListQueuesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListQueuesResponse:
        leader = self._leading()
        if leader is None:
            return await self._forward("ListQueues", request, coordinator_pb2.ListQueuesResponse, context)
        return coordinator_pb2.ListQueuesResponse(queues=leader.queue_stats())

    @_unary
    async def SetLimit(
        self, request: coordinator_pb2.SetLimitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.SetLimitResponse:
        request.DiscardUnknownFields()
        validation.raise_if(validation.validate_limit(request.limit, self._limits), "invalid limit")
        stored = await self._leader().set_limit(request.limit)
        return coordinator_pb2.SetLimitResponse(limit=stored)

    @_unary
    async def ListLimits(
        self, request: coordinator_pb2.ListLimitsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListLimitsResponse:
        leader = self._leading()
        if leader is None:
            return coordinator_pb2.ListLimitsResponse(limits=await self._stored.limits())
        ordered = sorted(leader.limits.items(), key=lambda item: item[0])
        return coordinator_pb2.ListLimitsResponse(limits=[limit for _, limit in ordered])

    @_unary
    async def RegisterTaskType(
        self, request: coordinator_pb2.RegisterTaskTypeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.RegisterTaskTypeResponse:
        leader = self._leader()
        request.DiscardUnknownFields()
        task_type = request.task_type
        # Versions and their history are the coordinator's to set: what a caller sends there is ignored.
        task_type.ClearField("versions")
        violations = validation.validate_task_type(task_type, self._limits, "task_type")
        validation.raise_if(violations, "invalid task type")
        stored, created = await leader.register_type(task_type, force=request.force, registered_by=_caller(context))
        if created:
            self._coordinator.reflection.invalidate()
        return coordinator_pb2.RegisterTaskTypeResponse(task_type=stored, new_version=created)

    @_unary
    async def ListTaskTypes(
        self, request: coordinator_pb2.ListTaskTypesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListTaskTypesResponse:
        names = frozenset(request.names)
        task_types = [t for t in await self._stored.types() if not names or t.name in names]
        if request.include_versions:
            for task_type in task_types:
                task_type.versions.extend(await self._stored.versions(task_type))
        return coordinator_pb2.ListTaskTypesResponse(task_types=task_types)

    @_unary
    async def ListNodes(
        self, request: coordinator_pb2.ListNodesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.ListNodesResponse:
        leader = self._leading()
        if leader is None:
            return await self._forward("ListNodes", request, coordinator_pb2.ListNodesResponse, context)
        nodes = []
        for session in leader.workers.sessions.values():
            node = coordinator_pb2.Node(
                worker_id=session.worker_id,
                session_id=session.id,
                task_types=sorted(session.task_types),
                slots=session.slots,
                running=len(session.held),
                address=session.address,
                labels=session.labels,
            )
            set_timestamp(node.connect_time, session.connect_time)
            set_timestamp(node.last_heartbeat_time, session.last_heartbeat_wall)
            quarantine = leader.workers.quarantined.get(session.worker_id)
            if quarantine is not None:
                until, node.quarantine_reason = quarantine
                set_timestamp(node.quarantined_until, time.time() + max(until - time.monotonic(), 0.0))
            if session.resources is not None:
                node.resources.CopyFrom(session.resources)
            room = placement.room(session, leader.scheduler.request, leader.settings.placement)
            node.capacity.cpu_millis = room.capacity_cpu or 0
            node.capacity.memory_bytes = room.capacity_memory or 0
            node.free.cpu_millis = max(room.cpu or 0, 0)
            node.free.memory_bytes = max(room.memory or 0, 0)
            node.memory_pressure = room.pressure
            node.alerts.extend(session.alerts)
            nodes.append(node)
        return coordinator_pb2.ListNodesResponse(nodes=nodes)

    @_unary
    async def GetClusterStatus(
        self, request: coordinator_pb2.GetClusterStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> coordinator_pb2.GetClusterStatusResponse:
        if is_forwarded(context) and self._leading() is not None:
            # A follower asks only for the counts in the leader's memory: no etcd reads for it.
            counts = coordinator_pb2.GetClusterStatusResponse()
            self._coordinator.fill_counts(counts)
            return counts
        status: coordinator_pb2.GetClusterStatusResponse = await self._coordinator.cluster_status()
        if self._leading() is None:
            # Sessions and task counts live in the leader's memory: asked for briefly, so that status
            # still answers at once while the leader is unreachable (they stay 0 then).
            forwarder: Forwarder = self._coordinator.forwarder
            leader = await forwarder.ask(
                "GetClusterStatus",
                request,
                coordinator_pb2.GetClusterStatusResponse,
                context,
                status.leader_address,
                _LEADER_COUNTS_TIMEOUT,
            )
            if leader is not None:
                status.sessions = leader.sessions
                status.tasks_pending = leader.tasks_pending
                status.tasks_queued = leader.tasks_queued
                status.tasks_running = leader.tasks_running
        return status

    async def WatchTasks(  # type: ignore[override]
        self, request: coordinator_pb2.WatchTasksRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        # Served on every replica from its etcd-fed task feed (watching.py), leader or not.
        await self._watching.serve(request, context)

    # Connect uses the context's read/write API, not a generator, so its reader and writer run apart.
    async def Connect(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[coordinator_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        try:
            leader = self._leader()
            try:
                first = await asyncio.wait_for(context.read(), 30)
            except TimeoutError:
                raise errors.InvalidArgumentError("no hello within 30s") from None
            if first is grpc.aio.EOF or first.WhichOneof("message") != "hello":
                raise errors.InvalidArgumentError("the first message on Connect must be a hello")
            hello = first.hello
            violations = []
            if not hello.worker_id or len(hello.worker_id) > self._limits.max_id_length:
                violations.append(errors.FieldViolation("hello.worker_id", "must be 1 to 128 characters"))
            if not hello.task_types:
                violations.append(errors.FieldViolation("hello.task_types", "must name at least one task type"))
            if not 1 <= hello.slots <= validation.MAX_SLOTS:
                violations.append(errors.FieldViolation("hello.slots", f"must be between 1 and {validation.MAX_SLOTS}"))
            violations += validation.validate_hello_extras(hello, self._limits)
            validation.raise_if(violations, "invalid hello")
            outdated = hello_versions_refused(hello, leader.registry)
            if outdated:
                raise errors.FailedPreconditionError(
                    f"worker {hello.worker_id} serves task type versions that were since changed incompatibly;"
                    " rebuild it with the registered messages (herder types get NAME shows them)",
                    violations=outdated,
                )
            session, welcome = leader.workers.open_session(hello, context.peer())
        except errors.HerderError as exc:
            await context.abort_with_status(errors.to_status(exc))
            return
        reader = asyncio.create_task(self._read(leader, session, context))
        refused: errors.HerderError | None = None
        try:
            await context.write(coordinator_pb2.ConnectResponse(welcome=welcome))
            while messages := await session.next_messages():
                for message in messages:
                    await context.write(message)
        finally:
            reader.cancel()
            try:
                # What ended the reader (an undecodable message) ends the call, after the session closes.
                with contextlib.suppress(asyncio.CancelledError):
                    refused = await reader
            finally:
                leader.workers.close_session(session)
        if refused is not None:
            await context.abort_with_status(errors.to_status(refused))
        if leader.deposed:
            await context.abort_with_status(self._stepped_down())
        if session.end_reason:
            await context.abort_with_status(errors.to_status(errors.UnavailableError(session.end_reason)))

    async def _read(
        self, leader: NamespaceLeader, session: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> errors.HerderError | None:
        """Apply what the worker sends until its stream ends; the error that ends a session it broke."""
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    break
                kind = message.WhichOneof("message")
                if kind in ("ack", "results"):
                    items = message.ack.refs if kind == "ack" else message.results.results
                    if len(items) > MAX_ITEMS_PER_MESSAGE:
                        raise errors.InvalidArgumentError(
                            f"one {kind} message carries {len(items)} items, at most {MAX_ITEMS_PER_MESSAGE}"
                            " (the most slots a worker can have)"
                        )
                    for item in items:
                        if session.closed:
                            break
                        if kind == "ack":
                            leader.reports.acknowledge(session, item)
                        else:
                            leader.reports.result(session, item)
                elif kind == "progress":
                    leader.reports.progress(session, message.progress)
                elif kind == "heartbeat":
                    leader.workers.heartbeat(session, message.heartbeat)
                else:
                    session.warn(f"unexpected {kind}", f"sent an unexpected {kind or 'empty message'}; ignored")
                    continue
                if kind != "heartbeat":
                    session.beat()
        except errors.HerderError as exc:
            log.info("session %s of worker %s ended: %s", session.id, session.worker_id, exc.message)
            return exc
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            log.info("session %s stream failed: %s", session.id, exc)
        finally:
            session.end()
        return None
