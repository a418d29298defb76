"""Worker sessions: one per Connect stream, holding the attempts sent to that worker."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field

from herder.clients.proto.v1 import coordinator_pb2, supervisor_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """heartbeat_interval: how often workers send heartbeats.
    heartbeat_timeout: a session without heartbeats (or with a closed stream) this long loses its attempts.
    ack_timeout: how long a worker has to acknowledge an assignment before it is re-queued.
    max_sessions: worker sessions served at once (each keeps its hello: at most about 100 KB).
    """

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    ack_timeout: float = 5.0
    # Worker sessions served at once; one more Connect is refused with RESOURCE_EXHAUSTED.
    max_sessions: int = 1000


# Messages waiting for a worker that does not read its stream (five times the most slots a worker
# can have): past this the session is ended.
MAX_PENDING_MESSAGES = 50_000


@dataclass(eq=False)
class Session:
    worker_id: str
    task_types: frozenset[str]
    slots: int
    labels: dict[str, str]
    address: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    connect_time: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_heartbeat_wall: float = field(default_factory=time.time)
    draining: bool = False
    closed: bool = False
    # Why the coordinator ended the session, when it did (the status its stream ends with).
    end_reason: str = ""
    # Monotonic time until which the worker gets no assignments (see Workers.quarantine in workers.py).
    quarantined_until: float = 0.0
    # The last valid resource sample its heartbeats carried (ListNodes shows it).
    resources: supervisor_pb2.ResourceSample | None = None
    # (cpu_millis, memory_bytes) its hello offers to resource requests; 0 where its samples say.
    capacity: tuple[int, int] = (0, 0)
    # Kinds of bad input already logged for this session: one line each, not one per message.
    _warned: set[str] = field(default_factory=set)
    # task id -> attempt, for every attempt this session was sent and has not finished.
    held: dict[str, int] = field(default_factory=dict)
    # What waits to be written; the writer batches assignments and result acks into one message each.
    _assignments: list[bytes] = field(default_factory=list)
    _result_acks: list[coordinator_pb2.ResultAck] = field(default_factory=list)
    _others: list[coordinator_pb2.ConnectResponse] = field(default_factory=list)
    # One heartbeat ack answers every heartbeat since the last one sent.
    _heartbeat_ack_due: bool = False
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free(self) -> int:
        if self.draining or self.closed:
            return 0
        if self.quarantined_until and time.monotonic() < self.quarantined_until:
            return 0
        return self.slots - len(self.held)

    def warn(self, kind: str, text: str) -> None:
        """Log something wrong with what this worker sent, once per kind for the session's life."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("session %s of worker %s: %s (logged once per session)", self.id, self.worker_id, text)

    def send_assignment(self, record: bytes) -> None:
        """Queue a serialized Task (as committed) to be sent as an assignment."""
        if not self.closed:
            self._assignments.append(record)
            self._ready.set()

    def send_result_ack(self, ref: coordinator_pb2.AttemptRef, accepted: bool, reason: str = "") -> None:
        if not self.closed and self._room():
            self._result_acks.append(coordinator_pb2.ResultAck(ref=ref, accepted=accepted, reason=reason))
            self._ready.set()

    def send(self, message: coordinator_pb2.ConnectResponse) -> None:
        """Queue any other message (a cancel); sent after pending assignments and acks."""
        if not self.closed and self._room():
            self._others.append(message)
            self._ready.set()

    def ack_heartbeat(self) -> None:
        if not self.closed:
            self._heartbeat_ack_due = True
            self._ready.set()

    def _room(self) -> bool:
        """False (and the session ended) once a worker that does not read has too much waiting for it."""
        if len(self._result_acks) + len(self._others) < MAX_PENDING_MESSAGES:
            return True
        log.warning(
            "session %s of worker %s: %d messages wait unread; ending the session",
            self.id,
            self.worker_id,
            MAX_PENDING_MESSAGES,
        )
        self.end()
        return False

    async def next_messages(self) -> list[coordinator_pb2.ConnectResponse]:
        """Wait for something to send; everything pending, batched. Empty once the session ended."""
        while not self._ready.is_set():
            await self._ready.wait()
        self._ready.clear()
        if self.closed:
            return []
        messages = []
        if self._assignments:
            message = coordinator_pb2.ConnectResponse()
            tasks = message.assignments.tasks
            for record in self._assignments:
                tasks.add().MergeFromString(record)
            self._assignments.clear()
            messages.append(message)
        if self._result_acks:
            message = coordinator_pb2.ConnectResponse()
            message.result_acks.acks.extend(self._result_acks)
            self._result_acks.clear()
            messages.append(message)
        messages.extend(self._others)
        self._others.clear()
        if self._heartbeat_ack_due:
            self._heartbeat_ack_due = False
            messages.append(coordinator_pb2.ConnectResponse(heartbeat_ack=coordinator_pb2.HeartbeatAck()))
        return messages

    def end(self, reason: str = "") -> None:
        """Close the stream from the coordinator's side; a `reason` ends it with UNAVAILABLE saying so."""
        if not self.closed:
            self.closed = True
            self.end_reason = reason
            self._ready.set()

    def beat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.last_heartbeat_wall = time.time()
