"""The scheduler's resource lanes in process: `pick(..., fits=...)` passes over requests a worker cannot take."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from herder.server.scheduler import NO_REQUEST, Request, Scheduler

pytestmark = pytest.mark.timeout(60)

BIG: Request = (4000, 8 << 30)
SMALL: Request = (500, 1 << 30)


def upto(cpu: int, memory: int) -> Callable[[Request], bool]:
    """A worker with this much free: fits what is no bigger in both."""
    return lambda request: request[0] <= cpu and request[1] <= memory


def test_a_big_task_does_not_block_small_ones_behind_it() -> None:
    s = Scheduler()
    s.push("big", "t", "q", 0, "", 1, BIG)
    s.push("small", "t", "q", 0, "", 2, SMALL)
    s.push("plain", "t", "q", 0, "", 3)
    small_node = upto(1000, 2 << 30)
    assert s.pick(["t"], small_node) == "small"
    assert s.pick(["t"], small_node) == "plain"
    assert s.pick(["t"], small_node) is None
    assert s.pick(["t"], upto(8000, 16 << 30)) == "big"


def test_fifo_across_requests_for_a_node_that_fits_all() -> None:
    s = Scheduler()
    for seq, (task_id, request) in enumerate([("a", BIG), ("b", SMALL), ("c", NO_REQUEST), ("d", BIG)], 1):
        s.push(task_id, "t", "q", 0, "", seq, request)
    assert [s.pick(["t"], upto(8000, 16 << 30)) for _ in range(4)] == ["a", "b", "c", "d"]


def test_priority_first_among_the_requests_that_fit() -> None:
    s = Scheduler()
    s.push("big-high", "t", "q", 9, "", 1, BIG)
    s.push("small-low", "t", "q", 1, "", 2, SMALL)
    s.push("small-high", "t", "q", 5, "", 3, SMALL)
    assert s.pick(["t"], upto(1000, 2 << 30)) == "small-high"
    assert s.pick(["t"]) == "big-high"


def test_fits_is_asked_once_per_distinct_request() -> None:
    s = Scheduler()
    for i in range(5):
        s.push(f"big{i}", "t", f"q{i}", 0, "", i, BIG)
    asked: list[Request] = []

    def fits(request: Request) -> bool:
        asked.append(request)
        return False

    assert s.pick(["t"], fits) is None
    assert asked == [BIG]
    # Everything passed over is still queued and pickable.
    assert sorted(s.pick(["t"]) or "" for _ in range(5)) == [f"big{i}" for i in range(5)]


def test_a_task_requesting_nothing_never_asks_fits() -> None:
    s = Scheduler()
    s.push("plain", "t", "q", 0, "", 1)

    def fits(request: Request) -> bool:
        raise AssertionError(f"asked about {request}")

    assert s.pick(["t"], fits) == "plain"


def test_request_and_waiting_requests() -> None:
    s = Scheduler()
    s.push("a", "t", "q", 0, "", 1, BIG)
    s.push("b", "u", "q", 0, "", 2, BIG)
    s.push("c", "t", "q", 0, "", 3, SMALL)
    s.push("d", "t", "other", 0, "", 4, SMALL)
    s.push("e", "t", "q", 0, "", 5)
    assert s.request("a") == BIG and s.request("e") == NO_REQUEST and s.request("nope") == NO_REQUEST
    assert s.waiting_requests("q") == [(SMALL, frozenset({"t"}), 1), (BIG, frozenset({"t", "u"}), 2)]
    assert s.pick(["t"], upto(1000, 2 << 30)) == "c"
    assert s.request("c") == SMALL  # running tasks keep their request
    assert s.waiting_requests("q") == [(BIG, frozenset({"t", "u"}), 2)]
    assert s.requested == 3  # a, b and d; e requests nothing
    s.remove("d")
    assert s.requested == 2


@pytest.mark.parametrize("seed", range(20))
def test_pick_with_fits_matches_a_naive_model(seed: int) -> None:
    """Against a model: the fitting queued task of highest priority, then lowest sequence (one key, no limits)."""
    rng = random.Random(seed)
    requests: list[Request] = [NO_REQUEST, (500, 1), (1000, 2), (2000, 1), (4000, 4)]
    s = Scheduler()
    model: dict[str, tuple[int, int, Request, str]] = {}
    for seq in range(400):
        if rng.random() < 0.6:
            task_id, priority, request = f"t{seq}", rng.randint(0, 3), rng.choice(requests)
            task_type = rng.choice(["a", "b"])
            s.push(task_id, task_type, rng.choice(["q1", "q2"]), priority, "", seq, request)
            model[task_id] = (priority, seq, request, task_type)
            continue
        cpu, memory = rng.choice([(0, 0), (600, 1), (1000, 2), (5000, 5)])
        types = rng.choice([["a"], ["b"], ["a", "b"]])
        fits = upto(cpu, memory)
        candidates = [
            (-p, sq, tid) for tid, (p, sq, req, tt) in model.items() if tt in types and (req == NO_REQUEST or fits(req))
        ]
        expected = min(candidates)[2] if candidates else None
        assert s.pick(types, fits) == expected
        if expected is not None:
            del model[expected]
            s.finished(expected)
    assert len(s) == len(model)
