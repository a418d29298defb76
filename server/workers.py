"""The leader's workers: their live sessions, the attempts no session holds, and quarantines.

An active attempt is held by at most one session. When its session ends (the
stream closed, or heartbeats stopped) the attempt becomes an orphan for
heartbeat_timeout: the same worker may reconnect and re-claim it, and only
past that deadline is it failed as WORKER_LOST. A worker in quarantine gets no
assignments on any of its sessions, new ones included, until the quarantine ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from herder.clients import alerts, errors, resources
from herder.clients.outcomes import WORKER_LOST
from herder.clients.proto.v1 import coordinator_pb2, supervisor_pb2, task_pb2
from herder.server import placement
from herder.server.entries import ACTIVE, Entry, S
from herder.server.horizon import stamp_now
from herder.server.sessions import Session

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader

log = logging.getLogger(__name__)


class Workers:
    """The sessions of one NamespaceLeader; `run()` is its supervised liveness loop."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader
        self.sessions: dict[str, Session] = {}
        # Attempts no session holds, waiting for their worker to re-claim them.
        self._orphans: dict[str, Entry] = {}
        # Workers that let assignments go unacknowledged: worker id -> (monotonic end, reason).
        self.quarantined: dict[str, tuple[float, str]] = {}

    def open_session(self, hello: coordinator_pb2.WorkerHello, peer: str) -> tuple[Session, coordinator_pb2.Welcome]:
        leader = self._leader
        leader.check()
        settings = leader.settings.sessions
        if len(self.sessions) >= settings.max_sessions:
            raise errors.ResourceExhaustedError(
                f"this coordinator already serves {len(self.sessions)} worker sessions, its limit"
                f" (--max-sessions / HERDER_MAX_SESSIONS = {settings.max_sessions})"
            )
        session = Session(
            worker_id=hello.worker_id,
            task_types=frozenset(hello.task_types),
            slots=hello.slots,
            labels=dict(hello.labels),
            address=hello.address or peer,
            capacity=(hello.capacity.cpu_millis, hello.capacity.memory_bytes),
        )
        welcome = coordinator_pb2.Welcome(session_id=session.id)
        welcome.heartbeat_interval.FromNanoseconds(int(settings.heartbeat_interval * 1e9))
        welcome.heartbeat_timeout.FromNanoseconds(int(settings.heartbeat_timeout * 1e9))
        welcome.ack_timeout.FromNanoseconds(int(settings.ack_timeout * 1e9))
        limits = leader.input_limits
        welcome.max_result_bytes = limits.max_result_bytes
        welcome.max_error_bytes = limits.max_error_bytes
        welcome.max_progress_bytes = limits.max_progress_bytes
        quarantine = self.quarantined.get(hello.worker_id)
        if quarantine is not None:
            session.quarantined_until = quarantine[0]
        for ref in hello.running:
            entry = leader.entries.get(ref.task_id)
            if (
                entry is None
                or entry.task.attempt != ref.attempt
                or entry.task.state not in ACTIVE
                or entry.task.worker_id != hello.worker_id
            ):
                welcome.rejected.append(ref)
                continue
            previous = entry.task.state
            if entry.session is not None and entry.session.held.get(ref.task_id) == ref.attempt:
                del entry.session.held[ref.task_id]
            self._leader.timers.acknowledged(entry)
            entry.session = session
            self.adopt(entry)
            session.held[ref.task_id] = ref.attempt
            entry.task.session_id = session.id
            if previous == S.TASK_STATE_ASSIGNED:
                entry.task.state = S.TASK_STATE_RUNNING
                stamp_now(entry.task.start_time)
            leader.write(entry, previous)
            welcome.reclaimed.append(ref)
        self.sessions[session.id] = session
        log.info(
            "session %s: worker %s, %d slots, types %s, re-claimed %d",
            session.id,
            session.worker_id,
            session.slots,
            sorted(session.task_types),
            len(welcome.reclaimed),
        )
        leader.dispatcher.schedule()
        return session, welcome

    def heartbeat(self, session: Session, beat: coordinator_pb2.Heartbeat) -> None:
        session.beat()
        if beat.HasField("resources"):
            # A broken sampler must not cost the worker its session: keep the last good sample.
            problem = resources.validate(beat.resources)
            if problem:
                session.warn("resources", f"resource sample dropped: {problem}")
            else:
                first = session.resources is None
                pressed = first or placement.under_pressure(session, self._leader.settings.placement)
                session.resources = supervisor_pb2.ResourceSample()
                session.resources.CopyFrom(beat.resources)  # not a view keeping the request alive
                # What it can take may have grown: its first sample, pressure gone, or memory freed
                # for a request that waits. Offered to this session alone, so a heartbeat costs one pick.
                scheduler = self._leader.scheduler
                if session.free > 0 and scheduler and (pressed or scheduler.requested):
                    self._leader.dispatcher.offer(session)
        self._store_alerts(session, beat)
        if beat.draining and not session.draining:
            session.draining = True
            log.info("session %s is draining", session.id)
        session.ack_heartbeat()

    def _store_alerts(self, session: Session, beat: coordinator_pb2.Heartbeat) -> None:
        """Keep the heartbeat's active alerts (each heartbeat carries all of them); bad ones are dropped."""
        kept = []
        for alert in beat.alerts[: alerts.MAX_HEARTBEAT_ALERTS]:
            problem = alerts.validate(alert)
            if problem:
                session.warn("alerts", f"alert dropped: {problem}")
                continue
            copy = supervisor_pb2.Alert()
            copy.CopyFrom(alert)  # not a view keeping the request alive
            kept.append(copy)
        if len(beat.alerts) > alerts.MAX_HEARTBEAT_ALERTS:
            session.warn(
                "alerts-count", f"{len(beat.alerts)} alerts, only the first {alerts.MAX_HEARTBEAT_ALERTS} kept"
            )
        session.alerts = kept

    def close_session(self, session: Session) -> None:
        """The stream ended: its attempts wait heartbeat_timeout for the worker to re-claim them."""
        session.end()
        if self.sessions.pop(session.id, None) is None:
            return
        deadline = time.monotonic() + self._leader.settings.sessions.heartbeat_timeout
        for task_id, attempt in list(session.held.items()):
            entry = self._leader.entries.get(task_id)
            if entry is not None and entry.session is session and entry.task.attempt == attempt:
                self._leader.timers.acknowledged(entry)
                entry.session = None
                self.orphan(entry, deadline)
        session.held.clear()
        log.info("session %s of worker %s closed", session.id, session.worker_id)

    def end_all(self) -> None:
        """End every session (the leader stops); their attempts are left to the next leader."""
        for session in list(self.sessions.values()):
            session.end()
        self.sessions.clear()

    async def run(self) -> None:
        settings = self._leader.settings.sessions
        while True:
            await asyncio.sleep(min(settings.heartbeat_interval / 2, 0.5))
            now = time.monotonic()
            self._release_quarantines(now)
            for session in list(self.sessions.values()):
                if now - session.last_heartbeat > settings.heartbeat_timeout:
                    log.warning("session %s of worker %s missed its heartbeats", session.id, session.worker_id)
                    # Said to a worker that was only frozen, when it reads again: connect as a new session.
                    session.end(
                        f"session {session.id} expired: no heartbeat for {settings.heartbeat_timeout:g}s;"
                        " its attempts were re-queued"
                    )
                    self.close_session(session)
                    # Its heartbeats already stopped a timeout ago: no further grace.
                    for entry in self._orphans.values():
                        if entry.task.session_id == session.id:
                            entry.orphan_deadline = now
            for entry in [e for e in self._orphans.values() if e.orphan_deadline <= now]:
                self.adopt(entry)
                if entry.task.state in ACTIVE:
                    log.info("task %s attempt %d lost its worker; re-queued", entry.task.id, entry.task.attempt)
                    self._leader.attempt_failed(
                        entry,
                        task_pb2.TaskError(type=WORKER_LOST, message=f"worker {entry.task.worker_id} went away"),
                    )

    def orphan(self, entry: Entry, deadline: float) -> None:
        """No session holds the attempt: fail it at `deadline` (monotonic) unless its worker re-claims it."""
        entry.orphan_deadline = deadline
        self._orphans[entry.task.id] = entry

    def adopt(self, entry: Entry) -> None:
        """The attempt is no longer an orphan: re-claimed, finished or re-queued."""
        if entry.orphan_deadline:
            entry.orphan_deadline = 0.0
            self._orphans.pop(entry.task.id, None)

    def quarantine(self, worker_id: str, reason: str) -> None:
        """No assignments for this worker (on any session) until the quarantine period has passed."""
        period = self._leader.settings.quarantine
        until = time.monotonic() + period
        if worker_id not in self.quarantined:
            log.warning("worker %s quarantined for %gs: %s", worker_id, period, reason)
        self.quarantined[worker_id] = (until, reason)
        for session in self.sessions.values():
            if session.worker_id == worker_id:
                session.quarantined_until = until

    def _release_quarantines(self, now: float) -> None:
        for worker_id, (until, _) in list(self.quarantined.items()):
            if until <= now:
                del self.quarantined[worker_id]
                log.info("worker %s is out of quarantine", worker_id)
                self._leader.dispatcher.schedule()
