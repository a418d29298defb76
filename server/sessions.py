"""Worker sessions: one per Connect stream, holding the attempts sent to that worker."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from herder.clients.proto.v1 import coordinator_pb2


@dataclass(frozen=True, slots=True)
class SessionSettings:
    """heartbeat_interval: how often workers send heartbeats.
    heartbeat_timeout: a session without heartbeats (or with a closed stream) this long loses its attempts.
    ack_timeout: how long a worker has to acknowledge an assignment before it is re-queued.
    """

    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    ack_timeout: float = 5.0


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
    # task id -> attempt, for every attempt this session was sent and has not finished.
    held: dict[str, int] = field(default_factory=dict)
    outbox: asyncio.Queue[coordinator_pb2.ConnectResponse | None] = field(default_factory=asyncio.Queue)

    @property
    def free(self) -> int:
        if self.draining or self.closed:
            return 0
        return self.slots - len(self.held)

    def send(self, message: coordinator_pb2.ConnectResponse) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def end(self) -> None:
        """Close the stream from the coordinator's side."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)

    def beat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.last_heartbeat_wall = time.time()
