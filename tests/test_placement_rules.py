"""Placement rules in process: capacity, reservations, memory pressure, load order and waiting reasons."""

from __future__ import annotations

import pytest

from herder.clients.proto.v1 import supervisor_pb2
from herder.server import placement
from herder.server.placement import PlacementSettings, Room
from herder.server.scheduler import NO_REQUEST, Request
from herder.server.sessions import Session

pytestmark = pytest.mark.timeout(30)

GIB = 1 << 30
SETTINGS = PlacementSettings(memory_pressure=0.9)


def session(
    worker_id: str = "w",
    *,
    capacity: Request = NO_REQUEST,
    used: float | None = None,
    total: int = 16 * GIB,
    cpus: int = 4,
    held: dict[str, Request] | None = None,
    slots: int = 4,
) -> tuple[Session, dict[str, Request]]:
    s = Session(worker_id=worker_id, task_types=frozenset({"t"}), slots=slots, labels={}, address="", capacity=capacity)
    if used is not None:
        s.resources = supervisor_pb2.ResourceSample(
            cpu_count=cpus, memory_total_bytes=total, memory_used_bytes=int(total * used)
        )
    requests = held or {}
    s.held = dict.fromkeys(requests, 1)
    return s, requests


def room_of(s: Session, requests: dict[str, Request]) -> Room:
    return placement.room(s, lambda task_id: requests.get(task_id, NO_REQUEST), SETTINGS)


def test_capacity_comes_from_the_hello_else_the_samples() -> None:
    assert placement.capacity(session()[0]) == (None, None)
    assert placement.capacity(session(used=0.1)[0]) == (4000, 16 * GIB)
    assert placement.capacity(session(capacity=(1500, 0), used=0.1)[0]) == (1500, 16 * GIB)
    assert placement.capacity(session(capacity=(0, GIB))[0]) == (None, GIB)


def test_free_is_capacity_less_reservations_and_memory_no_more_than_the_sample_has() -> None:
    r = room_of(*session(capacity=(4000, 8 * GIB), held={"a": (1000, 2 * GIB)}))
    assert (r.cpu, r.memory) == (3000, 6 * GIB)
    # The sample says only 4 GiB of 16 are available.
    r = room_of(*session(capacity=(4000, 8 * GIB), used=0.75, held={"a": (1000, 2 * GIB)}))
    assert (r.cpu, r.memory) == (3000, 4 * GIB)


def test_a_request_never_fits_an_unknown_capacity_but_no_request_fits_anywhere() -> None:
    blind = room_of(*session())
    assert blind.fits(NO_REQUEST)
    assert not blind.fits((1, 0)) and not blind.fits((0, 1))
    cpu_only = room_of(*session(capacity=(2000, 0)))
    assert cpu_only.fits((2000, 0)) and not cpu_only.fits((2001, 0)) and not cpu_only.fits((1, 1))


def test_memory_pressure_from_the_threshold_up() -> None:
    assert not room_of(*session(used=0.89)).pressure
    assert room_of(*session(used=0.95)).pressure
    assert not room_of(*session()).pressure  # no sample: nothing to judge by
    with pytest.raises(ValueError, match="memory pressure"):
        PlacementSettings(memory_pressure=1.5)


def test_load_orders_by_the_largest_used_share_then_cpu() -> None:
    idle = room_of(*session("idle", capacity=(4000, 8 * GIB)))
    slots = room_of(*session("slots", capacity=(4000, 8 * GIB), held={"a": NO_REQUEST}))
    memory = room_of(*session("memory", capacity=(4000, 8 * GIB), held={"b": (0, 4 * GIB)}))
    ordered = sorted([memory, slots, idle], key=Room.load)
    assert [r.session.worker_id for r in ordered] == ["idle", "slots", "memory"]
    idle.take((4000, 0))
    assert idle.load()[0] == 1.0


def test_reasons_say_what_is_missing() -> None:
    small = room_of(*session("small", capacity=(1000, GIB)))
    busy = room_of(*session("busy", capacity=(8000, 16 * GIB), held={"a": (6000, 0)}))
    pressed = room_of(*session("pressed", used=0.95))
    big = (4000, 2 * GIB)
    assert placement.unplaced_reason(big, "t", [small]) == (
        "no node serving 't' has 4000m cpu and 2 GiB memory (largest: 1000m cpu and 1 GiB memory)"
    )
    assert placement.unplaced_reason(big, "t", [small, busy, pressed]) == (
        "no node serving 't' has 4000m cpu and 2 GiB memory free (most free: 2000m cpu and 16 GiB memory);"
        " waiting for running tasks to finish; 1 more under memory pressure"
    )
    assert placement.unplaced_reason(NO_REQUEST, "t", [pressed]) == (
        "every node serving 't' is under memory pressure (1)"
    )
    assert placement.unplaced_reason(NO_REQUEST, "t", [pressed, small]) == ""
    assert placement.unplaced_reason(big, "other", [small]) == ""  # nobody serves it: not a resource question
    assert placement.unplaced_reason((500, 0), "t", [small]) == ""


def test_reasons_are_taken_once_per_window() -> None:
    s, requests = session("w", capacity=(1000, GIB))
    sessions = [s]
    reasons = placement.Reasons(lambda: sessions, lambda task_id: requests.get(task_id, NO_REQUEST), SETTINGS)
    assert reasons.why((2000, 0), "t").startswith("no node serving 't' has 2000m cpu")
    sessions.clear()  # within the window the view is kept
    assert reasons.why((2000, 0), "t").startswith("no node")
