"""Dispatch: queued tasks go to free session slots, in the order the scheduler picks them.

An assignment changes memory at once (so one pass never gives a slot twice)
and is sent to its worker only once committed, and only if its session still
holds that attempt. The worker then has ack_timeout to acknowledge it;
otherwise the task is re-queued at once, using up none of its attempts, and
the worker is quarantined. However many changes ask for a pass, at most one
is scheduled at a time.

Placement (server/placement.py): a pass offers tasks to sessions round by round, one task per
session per round, least loaded first (re-sorted each round), so work spreads; a session under
memory pressure is offered nothing, and each is offered only requests that fit what it has free.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from herder.clients.outcomes import ACK_TIMEOUT
from herder.server import metrics, placement
from herder.server.entries import Entry, S
from herder.server.horizon import stamp_now, timestamp_seconds
from herder.server.sessions import Session

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

log = logging.getLogger(__name__)


class Dispatcher:
    """Dispatch for one NamespaceLeader; a pass it schedules runs guarded, failing the leader if it raises."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader
        self._scheduled = False

    def schedule(self) -> None:
        """Run a pass soon: something may have freed a slot or queued a task."""
        if not self._scheduled and not self._leader.stopped.is_set():
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._leader.guarded, "dispatch", self.dispatch)

    def dispatch(self) -> None:
        """Assign what the scheduler picks to free slots, until either runs out."""
        leader = self._leader
        self._scheduled = False
        if leader.deposed or not leader.scheduler:
            return
        settings = leader.settings.placement
        request_of = leader.scheduler.request
        rooms = [placement.room(s, request_of, settings) for s in leader.workers.sessions.values() if s.free > 0]
        rooms = [r for r in rooms if not r.pressure]
        # Equally loaded sessions take turns being first (the sort below is stable).
        random.shuffle(rooms)
        while rooms and leader.scheduler:
            rooms.sort(key=placement.Room.load)
            still_free = []
            for room in rooms:
                if self._offer(room):
                    still_free.append(room)
            rooms = still_free

    def offer(self, session: Session) -> None:
        """Soon, give this one session what fits it (its heartbeat says it may take more now)."""
        asyncio.get_running_loop().call_soon(self._leader.guarded, "dispatch", self._offer_all, session)

    def _offer_all(self, session: Session) -> None:
        leader = self._leader
        if leader.deposed or session.closed or session.id not in leader.workers.sessions:
            return
        room = placement.room(session, leader.scheduler.request, leader.settings.placement)
        if not room.pressure:
            while leader.scheduler and self._offer(room):
                pass

    def _offer(self, room: placement.Room) -> bool:
        """Assign the session one task that fits it, if any; whether it got one and has a slot left."""
        leader = self._leader
        session = room.session
        if session.free <= 0:
            return False
        task_id = leader.scheduler.pick(session.task_types, room.fits)
        if task_id is None:
            return False
        room.take(leader.scheduler.request(task_id))
        self._assign(leader.entries[task_id], session)
        return session.free > 0

    def _assign(self, entry: Entry, session: Session) -> None:
        task = entry.task
        previous = task.state
        task.state = S.TASK_STATE_ASSIGNED
        task.attempt += 1
        task.worker_id = session.worker_id
        task.session_id = session.id
        stamp_now(task.assign_time)
        task.ClearField("progress")
        task.waiting_reason = ""
        entry.session = session
        session.held[task.id] = task.attempt
        now = time.time()
        leader = self._leader
        waited = now - timestamp_seconds(task.queue_time)
        leader.book.dispatched(task.spec.queue, waited)
        if metrics.instruments is not None:
            metrics.instruments.queue_wait.record(max(waited, 0.0), task.spec.queue)
        leader.timers.expiry.discard(task.id)
        leader.timers.arm_timeout(entry, now)
        if not entry.fresh:
            self.send_assignment_after(leader.write(entry, previous), entry, session)

    def send_assignment_after(self, written: asyncio.Future[int], entry: Entry, session: Session) -> None:
        """Once the assignment is committed, send it and start the acknowledgement window."""
        task_id, attempt = entry.task.id, entry.task.attempt

        def send(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            if session.held.get(task_id) != attempt or session.closed:
                return
            session.send_assignment(entry.committed)
            leader = self._leader
            leader.timers.await_ack(entry, time.time() + leader.settings.sessions.ack_timeout)

        written.add_done_callback(send)

    def ack_expired(self, entry: Entry, attempt: int) -> None:
        """The ack window of this attempt passed (Timers): re-queue it unless it was acknowledged meanwhile."""
        task = entry.task
        session = entry.session
        if task.attempt != attempt or task.state != S.TASK_STATE_ASSIGNED or session is None:
            return
        log.info("task %s attempt %d not acknowledged by %s; re-queued", task.id, attempt, session.worker_id)
        leader = self._leader
        leader.workers.quarantine(session.worker_id, f"assignment {task.id} attempt {attempt} not acknowledged")
        # The worker never started it: re-queued at once, using up none of the task's attempts. The
        # history shows it (bounded: a worker is quarantined after each, so these come rarely).
        if len(task.attempt_errors) < leader.input_limits.max_attempts_limit:
            task.attempt_errors.add(
                type=ACK_TIMEOUT, message=f"not acknowledged by {session.worker_id}", retryable=True
            )
        requeued = leader.requeue(entry)
        leader.cancel_after(requeued, session, task.id, attempt, "not acknowledged")
