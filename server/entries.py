"""What the leader keeps for each unfinished task, and the task states by phase.

An Entry's `task` is the leader's latest state of it; `committed` and
`revision` are what etcd holds, set only once a write lands. The session,
timers and flags on it are memory only, never stored: a new leader derives
them again (recovery.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from herder.clients.proto.v1 import task_pb2
from herder.server.sessions import Session


class S:
    """task_pb2.TaskState's values as plain class attributes: an attribute of the enum wrapper is a
    Python-level __getattr__ (~0.4 us), and the leader looks states up several times per task."""

    TASK_STATE_UNSPECIFIED = task_pb2.TASK_STATE_UNSPECIFIED
    TASK_STATE_PENDING = task_pb2.TASK_STATE_PENDING
    TASK_STATE_QUEUED = task_pb2.TASK_STATE_QUEUED
    TASK_STATE_ASSIGNED = task_pb2.TASK_STATE_ASSIGNED
    TASK_STATE_RUNNING = task_pb2.TASK_STATE_RUNNING
    TASK_STATE_SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
    TASK_STATE_FAILED = task_pb2.TASK_STATE_FAILED
    TASK_STATE_CANCELED = task_pb2.TASK_STATE_CANCELED
    TASK_STATE_EXPIRED = task_pb2.TASK_STATE_EXPIRED
    Name = staticmethod(task_pb2.TaskState.Name)
    values = staticmethod(task_pb2.TaskState.values)


TERMINAL = frozenset({S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED, S.TASK_STATE_CANCELED, S.TASK_STATE_EXPIRED})
ACTIVE = frozenset({S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING})
WAITING = frozenset({S.TASK_STATE_PENDING, S.TASK_STATE_QUEUED})


@dataclass(eq=False, slots=True)
class Entry:
    """A task the leader tracks: its latest state and the record last committed for it.

    A task that waits (QUEUED or PENDING) with nothing left to write keeps only its committed
    record; the message is parsed again when something touches it. That is most of a backlog's
    memory: a parsed Task costs about four times its record.
    """

    _task: task_pb2.Task | None
    committed: bytes = b""
    revision: int = 0
    session: Session | None = None
    # The attempt sent and not acknowledged yet (0: none); its deadline is in Timers.acks.
    ack_attempt: int = 0
    # Monotonic time after which an attempt no session holds is re-queued.
    orphan_deadline: float = 0.0
    # The attempt whose timeout is armed.
    timeout_attempt: int = 0
    # RUNNING in memory, its record not written yet (NamespaceLeader.attempt_started); its due time is in Timers.starts.
    start_unwritten: bool = False
    # A progress write is on its way; later updates wait for it and go in one write.
    progress_writing: bool = False
    progress_dirty: bool = False
    # Created by a submit that has not written it yet: dispatch may assign it in memory,
    # and the submit's one write then stores it already assigned.
    fresh: bool = False
    # Writes submitted and not yet committed.
    writes_pending: int = 0
    # The submit's write, until it lands: readers of a task not yet committed wait for it.
    first_write: asyncio.Future[int] | None = None

    @property
    def task(self) -> task_pb2.Task:
        if self._task is None:
            self._task = task_pb2.Task.FromString(self.committed)
        return self._task

    def rest(self) -> None:
        """Drop the parsed message of a waiting task whose every change is committed."""
        if self.writes_pending == 0 and self._task is not None and self._task.state in WAITING:
            self._task = None
