"""The leader's timers: delays and backoffs ending, unstarted tasks expiring, attempts timing out,
assignments left unacknowledged, RUNNING records written late.

A timer is a due time for a task id, in memory only: a new leader arms them
again from the stored tasks (recovery.py). One that fires acts only if the
task is still as it was when armed (still PENDING, still unstarted, still on
that attempt), and then through the leader's own transitions, which write
before anything is told.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from herder.clients.outcomes import EXPIRED, TIMEOUT
from herder.clients.proto.v1 import task_pb2
from herder.server import metrics
from herder.server.deadlines import Deadlines
from herder.server.entries import ACTIVE, TERMINAL, Entry, S
from herder.server.horizon import clamp_delay, duration_seconds

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

log = logging.getLogger(__name__)

# Timers of each kind handled before the loop lets everything else run.
TURN = 500
# RUNNING writes wait up to this much past their due time, so the loop wakes for them at most ~100
# times a second however many long attempts start (each is one record, not worth a wake-up alone).
START_SLACK = 0.01


class Timers:
    """The timers of one NamespaceLeader; `run()` is its supervised timer loop."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader
        # PENDING tasks by run time; unstarted tasks by expiry (ttl); attempts by timeout.
        self.delayed = Deadlines()
        self.expiry = Deadlines()
        self.timeouts = Deadlines()
        # Assignments sent and not acknowledged, by when their ack window ends: one heap instead of an
        # event-loop timer per assignment, and a later deadline never wakes the timer loop.
        self.acks = Deadlines()
        # Acknowledged attempts whose RUNNING record is written when due, unless a write carried it
        # first: (due, entry, attempt) in acknowledgement order, which one fixed delay makes due order.
        self.starts: deque[tuple[float, Entry, int]] = deque()
        self.wakeup = asyncio.Event()
        # When the timer loop wakes next by itself (inf: not before something is pushed).
        self._next_wake = float("inf")

    def delay(self, due: float, task_id: str) -> None:
        """Re-queue a PENDING task at `due` (seconds since the epoch)."""
        self.delayed.push(due, task_id)
        self.wakeup.set()

    def expire(self, due: float, task_id: str) -> None:
        """Expire the task at `due` unless it has started by then."""
        self.expiry.push(due, task_id)
        self.wakeup.set()

    def arm_timeout(self, entry: Entry, started: float) -> None:
        """Fail the current attempt if it is still running `spec.timeout` after it was assigned."""
        task = entry.task
        if task.spec.HasField("timeout") and duration_seconds(task.spec.timeout) > 0:
            entry.timeout_attempt = task.attempt
            self.timeouts.push(started + clamp_delay(duration_seconds(task.spec.timeout)), task.id)
            self.wakeup.set()

    def await_ack(self, entry: Entry, due: float) -> None:
        """Re-queue the entry's current attempt (and quarantine its worker) unless acknowledged by `due`."""
        entry.ack_attempt = entry.task.attempt
        self.acks.push(due, entry.task.id)
        if due < self._next_wake:
            self.wakeup.set()

    def acknowledged(self, entry: Entry) -> None:
        """The attempt's ack came (or it is no longer waiting for one)."""
        if entry.ack_attempt:
            entry.ack_attempt = 0
            self.acks.discard(entry.task.id)

    def write_start(self, entry: Entry, due: float) -> None:
        """Write the entry's RUNNING record at `due` unless a write has carried it by then."""
        self.starts.append((due, entry, entry.task.attempt))
        if due + START_SLACK < self._next_wake:
            self.wakeup.set()

    def _next_start(self) -> float | None:
        """When the earliest RUNNING write still waiting is due; those already carried are dropped."""
        starts = self.starts
        while starts:
            due, entry, attempt = starts[0]
            if entry.start_unwritten and entry.task.attempt == attempt:
                return due
            starts.popleft()
        return None

    def discard(self, task_id: str) -> None:
        """Disarm every timer of the task but its ack window (see acknowledged)."""
        self.delayed.discard(task_id)
        self.expiry.discard(task_id)
        self.timeouts.discard(task_id)

    async def run(self) -> None:
        """Delays and backoffs ending, unstarted tasks expiring, attempts timing out."""
        leader = self._leader
        timers = (self.delayed, self.expiry, self.timeouts, self.acks)
        while True:
            self.wakeup.clear()
            start = self._next_start()
            dues = [due for due in (t.next_due() for t in timers) if due is not None]
            if start is not None:
                dues.append(start + START_SLACK)
            if not dues:
                self._next_wake = float("inf")
                await self.wakeup.wait()
                continue
            self._next_wake = min(dues)
            wait = self._next_wake - time.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), wait)
                continue
            self._next_wake = float("-inf")  # handling what is due: anything pushed meanwhile is seen next turn
            now = time.time()
            for task_id in self.delayed.pop_due(now, TURN):
                entry = leader.entries.get(task_id)
                if entry is not None and entry.task.state == S.TASK_STATE_PENDING:
                    leader.requeue(entry)
            for task_id in self.expiry.pop_due(now, TURN):
                entry = leader.entries.get(task_id)
                if entry is not None and entry.task.attempt == 0 and entry.task.state not in TERMINAL | ACTIVE:
                    error = task_pb2.TaskError(type=EXPIRED, message="not started within its ttl")
                    leader.finish(entry, S.TASK_STATE_EXPIRED, error=error)
            for task_id in self.timeouts.pop_due(now, TURN):
                entry = leader.entries.get(task_id)
                if entry is not None and entry.task.state in ACTIVE and entry.task.attempt == entry.timeout_attempt:
                    self._time_out(entry)
            for task_id in self.acks.pop_due(now, TURN):
                entry = leader.entries.get(task_id)
                if entry is not None and entry.ack_attempt:
                    attempt, entry.ack_attempt = entry.ack_attempt, 0
                    leader.dispatcher.ack_expired(entry, attempt)
            for _ in range(TURN):
                due = self._next_start()
                if due is None or due > now:
                    break
                _, entry, _ = self.starts.popleft()
                if leader.entries.get(entry.task.id) is entry:
                    leader.write(entry, S.TASK_STATE_RUNNING)
            # Thousands due at once are handled a turn at a time: the loop (and the lease keep-alive
            # with it) runs in between.
            await asyncio.sleep(0)

    def _time_out(self, entry: Entry) -> None:
        task = entry.task
        limit = duration_seconds(task.spec.timeout)
        session, attempt = entry.session, task.attempt
        log.info("task %s attempt %d timed out after %.3gs", task.id, attempt, limit)
        if metrics.instruments is not None:
            metrics.instruments.timeouts.add(task.spec.queue, task.spec.type)
        error = task_pb2.TaskError(type=TIMEOUT, message=f"attempt {attempt} ran longer than {limit:g}s")
        failed = self._leader.attempt_failed(entry, error)
        if session is not None:
            self._leader.cancel_after(failed, session, task.id, attempt, "timed out")
