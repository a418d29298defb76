"""Placement: how much of a task's resource request a worker session can take, and who goes first.

A session offers a capacity per resource: what its hello says (a container's limits), else what its
latest resource sample says (cpu_count cores, memory_total_bytes). A resource with neither is
unknown, and a task requesting it never goes there. Free is capacity minus the requests of the
attempts the session holds (a reservation, like Kubernetes requests, whatever the task really
uses), and for memory also no more than the sample's available memory (total - used). A task
requesting nothing fits anywhere. A session whose latest sample shows memory used/total at or above
the pressure threshold gets no new task at all. Among sessions with free slots, the least loaded
(largest reserved share of cpu, memory or slots, then cpu use) is offered a task first.

Plain Python over Session and the scheduler's requests: no protobuf beyond the sample it reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from herder.clients.proto.v1 import task_pb2
from herder.server.scheduler import NO_REQUEST, Request
from herder.server.sessions import Session

# How stale the sessions behind a waiting reason may be: reads render one per queued task (a ListTasks
# page, every watched change), and each costs a walk over all sessions when computed afresh.
REASONS_MAX_AGE = 0.25

# The most a worker's hello may offer: the bounds of a resource sample (65,536 cores) and 1 PiB.
MAX_CAPACITY_CPU_MILLIS = 65_536_000
MAX_CAPACITY_MEMORY_BYTES = 1 << 50


@dataclass(frozen=True, slots=True)
class PlacementSettings:
    """memory_pressure: a node whose sample shows memory used/total at or above this (0 < x <= 1)
    gets no new tasks until it drops below."""

    memory_pressure: float = 0.95

    def __post_init__(self) -> None:
        if not 0.0 < self.memory_pressure <= 1.0:
            raise ValueError(f"memory pressure threshold must be above 0 and at most 1, got {self.memory_pressure}")


def requested(spec: task_pb2.TaskSpec) -> Request:
    return spec.resources.cpu_millis, spec.resources.memory_bytes


def capacity(session: Session) -> tuple[int | None, int | None]:
    """(cpu_millis, memory_bytes) the session offers; None where neither hello nor sample says."""
    sample = session.resources
    cpu: int | None = session.capacity[0] or None
    memory: int | None = session.capacity[1] or None
    if sample is not None:
        cpu = cpu or sample.cpu_count * 1000
        memory = memory or sample.memory_total_bytes or None
    return cpu, memory


def under_pressure(session: Session, settings: PlacementSettings) -> bool:
    sample = session.resources
    return (
        sample is not None
        and sample.memory_total_bytes > 0
        and sample.memory_used_bytes >= settings.memory_pressure * sample.memory_total_bytes
    )


def reserved(session: Session, request_of: Callable[[str], Request]) -> Request:
    """The summed requests of the attempts the session holds."""
    cpu = memory = 0
    for task_id in session.held:
        c, m = request_of(task_id)
        cpu += c
        memory += m
    return cpu, memory


@dataclass(slots=True)
class Room:
    """What one session has free for new tasks, kept up to date through one dispatch pass."""

    session: Session
    # Free cpu_millis and memory_bytes; None where its capacity is unknown.
    cpu: int | None
    memory: int | None
    capacity_cpu: int | None
    capacity_memory: int | None
    pressure: bool

    def fits(self, request: Request) -> bool:
        cpu, memory = request
        return (not cpu or (self.cpu is not None and self.cpu >= cpu)) and (
            not memory or (self.memory is not None and self.memory >= memory)
        )

    def take(self, request: Request) -> None:
        if self.cpu is not None:
            self.cpu -= request[0]
        if self.memory is not None:
            self.memory -= request[1]

    def load(self) -> tuple[float, float]:
        """Sort key, least loaded first: the largest used share of slots, cpu or memory, then cpu use."""
        session = self.session
        shares = [len(session.held) / session.slots]
        if self.capacity_cpu and self.cpu is not None:
            shares.append(1 - self.cpu / self.capacity_cpu)
        if self.capacity_memory and self.memory is not None:
            shares.append(1 - self.memory / self.capacity_memory)
        sample = session.resources
        return max(shares), sample.cpu_percent if sample is not None else 0.0


def room(session: Session, request_of: Callable[[str], Request], settings: PlacementSettings) -> Room:
    cap_cpu, cap_memory = capacity(session)
    used_cpu, used_memory = reserved(session, request_of)
    free_cpu = cap_cpu - used_cpu if cap_cpu is not None else None
    free_memory = cap_memory - used_memory if cap_memory is not None else None
    sample = session.resources
    if free_memory is not None and sample is not None and sample.memory_total_bytes:
        free_memory = min(free_memory, sample.memory_total_bytes - sample.memory_used_bytes)
    return Room(session, free_cpu, free_memory, cap_cpu, cap_memory, under_pressure(session, settings))


def describe(request: Request) -> str:
    """A request in words: "2000m cpu and 8 GiB memory"."""
    cpu, memory = request
    parts = ([f"{cpu}m cpu"] if cpu else []) + ([f"{size(memory)} memory"] if memory else [])
    return " and ".join(parts) or "nothing"


def size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def _most(values: Iterable[int | None]) -> int:
    return max((v for v in values if v is not None), default=0)


def unplaced_reason(request: Request, task_type: str, rooms: Iterable[Room]) -> str:
    """Why no live session can take a task of this type and request now; "" when one can, or none serves it.

    `rooms` are the sessions' rooms (draining and closed ones are left out here).
    """
    serving = [r for r in rooms if task_type in r.session.task_types and not r.session.draining]
    if not serving:
        return ""
    calm = [r for r in serving if not r.pressure]
    pressed = len(serving) - len(calm)
    if any(r.fits(request) for r in calm):
        return ""
    if not calm or request == NO_REQUEST:
        return f"every node serving {task_type!r} is under memory pressure ({pressed})"
    note = f"; {pressed} more under memory pressure" if pressed else ""
    able = [r for r in calm if Room(r.session, r.capacity_cpu, r.capacity_memory, None, None, False).fits(request)]
    if not able:
        largest = describe((_most(r.capacity_cpu for r in calm), _most(r.capacity_memory for r in calm)))
        return f"no node serving {task_type!r} has {describe(request)} (largest: {largest}){note}"
    most = describe((max(_most(r.cpu for r in calm), 0), max(_most(r.memory for r in calm), 0)))
    return (
        f"no node serving {task_type!r} has {describe(request)} free (most free: {most});"
        f" waiting for running tasks to finish{note}"
    )


class Reasons:
    """Why tasks of a type and request wait for room, for status reads (GetTask, ListTasks, watches,
    ListQueues): the sessions' rooms are taken at most every REASONS_MAX_AGE seconds and each
    (request, type) is explained once per take, so many reads cost one walk over the sessions."""

    def __init__(
        self,
        sessions: Callable[[], Iterable[Session]],
        request_of: Callable[[str], Request],
        settings: PlacementSettings,
    ) -> None:
        self._sessions = sessions
        self._request_of = request_of
        self._settings = settings
        self._taken = -REASONS_MAX_AGE
        self._rooms: list[Room] = []
        self._reasons: dict[tuple[Request, str], str] = {}

    def why(self, request: Request, task_type: str) -> str:
        """unplaced_reason() over the sessions as of at most REASONS_MAX_AGE ago."""
        now = time.monotonic()
        if now - self._taken >= REASONS_MAX_AGE:
            self._taken = now
            self._rooms = [room(s, self._request_of, self._settings) for s in self._sessions() if not s.closed]
            self._reasons.clear()
        key = (request, task_type)
        reason = self._reasons.get(key)
        if reason is None:
            reason = self._reasons[key] = unplaced_reason(request, task_type, self._rooms)
        return reason
