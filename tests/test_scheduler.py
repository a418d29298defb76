"""The scheduler core in process: priorities, FIFO, DRR fairness, limits, hold reasons, and a randomized model check."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from herder.server.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)

ALL = ("t",)


class Feed:
    """Pushes tasks with increasing sequences, like the leader does."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.seq = itertools.count(1)

    def push(self, task_id: str, *, key: str = "", priority: int = 0, queue: str = "q", task_type: str = "t") -> None:
        self.s.push(task_id, task_type, queue, priority, key, next(self.seq))

    def many(
        self, prefix: str, n: int, *, key: str = "", priority: int = 0, queue: str = "q", task_type: str = "t"
    ) -> list[str]:
        ids = [f"{prefix}{i}" for i in range(n)]
        for task_id in ids:
            self.push(task_id, key=key, priority=priority, queue=queue, task_type=task_type)
        return ids


def drain(s: Scheduler, types: tuple[str, ...] = ALL, finish: bool = True) -> list[str]:
    picked: list[str] = []
    while (task_id := s.pick(types)) is not None:
        picked.append(task_id)
        if finish:
            s.finished(task_id)
    return picked


# --- order ---


def test_higher_priority_first() -> None:
    s = Scheduler()
    f = Feed(s)
    f.push("low", priority=1)
    f.push("high", priority=9)
    f.push("mid", priority=5)
    assert drain(s) == ["high", "mid", "low"]


def test_fifo_by_sequence_within_a_key() -> None:
    s = Scheduler()
    for task_id, seq in [("c", 3), ("a", 1), ("b", 2)]:
        s.push(task_id, "t", "q", 0, "k", seq)
    assert drain(s) == ["a", "b", "c"]


def test_fifo_by_sequence_across_queues_of_one_type() -> None:
    s = Scheduler()
    f = Feed(s)
    for i in range(6):
        f.push(f"x{i}", queue="q1" if i % 2 else "q2")
    assert drain(s) == [f"x{i}" for i in range(6)]


def test_a_retry_pushed_with_its_sequence_goes_back_to_its_fifo_place() -> None:
    s = Scheduler()
    s.push("first", "t", "q", 0, "k", 1)
    s.push("second", "t", "q", 0, "k", 2)
    assert s.pick(ALL) == "first"
    s.push("first", "t", "q", 0, "k", 1)  # the attempt failed: re-queued, which also releases it
    assert s.running() == 0
    assert drain(s) == ["first", "second"]


# --- fairness ---


def test_keys_take_turns_round_robin() -> None:
    s = Scheduler()
    f = Feed(s)
    for key in "abc":
        f.many(key, 3, key=key)
    assert drain(s) == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_a_key_of_weight_w_takes_w_tasks_per_turn() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_key_weight("a", 3)
    for key in "abc":
        f.many(key, 5, key=key)
    assert "".join(t[0] for t in drain(s)) == "aaabcaabcbcbcbc"


def test_weight_changes_apply_from_the_next_turn() -> None:
    s = Scheduler()
    f = Feed(s)
    for key in "ab":
        f.many(key, 6, key=key)
    first = [s.pick(ALL), s.pick(ALL)]
    s.set_key_weight("a", 2)
    assert "".join(t[0] for t in [*first, *drain(s)] if t) == "ababaabaabbb"
    assert s.key_weight("a") == 2


@pytest.mark.parametrize("picked_before", [0, 1, 7])
def test_a_new_key_waits_at_most_one_turn_behind_a_key_with_10000_queued(picked_before: int) -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("a", 10_000, key="A")
    for _ in range(picked_before):
        assert s.pick(ALL) is not None
    f.push("b", key="B")
    order = [s.pick(ALL), s.pick(ALL)]
    assert "b" in order
    # Weight 1: B next, or after exactly one of A's (when A's turn had just begun).
    assert order.index("b") <= 1
    if picked_before:
        assert order[0] == "b"


@pytest.mark.parametrize("picked_before", [0, 1, 2, 3])
def test_a_new_key_waits_at_most_weight_picks_of_a_weighted_key(picked_before: int) -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_key_weight("A", 3)
    f.many("a", 10_000, key="A")
    for _ in range(picked_before):
        s.pick(ALL)
    f.push("b", key="B")
    order = [s.pick(ALL) for _ in range(4)]
    assert "b" in order
    assert order.index("b") <= 3


@pytest.mark.parametrize("seed", range(10))
def test_between_two_picks_of_a_key_no_other_key_gets_more_than_its_weight(seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler()
    f = Feed(s)
    weights = {f"k{i}": rng.randint(1, 4) for i in range(8)}
    for key, weight in weights.items():
        s.set_key_weight(key, weight)
    queued = dict.fromkeys(weights, 0)
    picks: list[tuple[str, bool]] = []  # key picked, and whether it still had tasks queued
    for step in range(3000):
        if rng.random() < 0.5:
            key = rng.choice(list(weights))
            f.push(f"{key}-{step}", key=key)
            queued[key] += 1
        elif (task_id := s.pick(ALL)) is not None:
            key = task_id.split("-")[0]
            queued[key] -= 1
            picks.append((key, queued[key] > 0))
            s.finished(task_id)
    assert len(picks) > 1000
    last: dict[str, int] = {}
    for i, (key, _) in enumerate(picks):
        # The bound holds while the key stays backlogged: one that ran dry left the ring.
        if key in last and picks[last[key]][1]:
            between = [k for k, _ in picks[last[key] + 1 : i]]
            for other in set(between):
                assert between.count(other) <= weights[other], (key, other, between)
        last[key] = i


def test_fairness_holds_per_priority_level() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("a", 100, key="A", priority=1)
    f.many("lo", 5, key="B", priority=0)
    f.push("b", key="B", priority=1)
    assert s.pick(ALL) == "a0"
    assert s.pick(ALL) == "b"


# --- limits ---


def test_queue_limit_holds_and_frees_on_finished() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 5, queue="emails")
    s.set_queue_limit("emails", 2)
    assert [s.pick(ALL), s.pick(ALL)] == ["x0", "x1"]
    assert s.pick(ALL) is None
    assert s.hold_reason("x2") == "queue 'emails' is at its limit of 2 running"
    assert s.finished("x0")
    assert s.hold_reason("x2") == ""
    assert s.pick(ALL) == "x2"
    assert s.running(queue="emails") == 2


def test_a_queue_at_its_limit_lets_other_queues_run() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("e", 3, queue="emails", priority=5)
    f.many("r", 3, queue="reports")
    s.set_queue_limit("emails", 1)
    assert [s.pick(ALL) for _ in range(4)] == ["e0", "r0", "r1", "r2"]
    assert s.pick(ALL) is None
    s.finished("e0")
    assert s.pick(ALL) == "e1"


def test_lowering_a_queue_limit_below_running_holds_until_it_drops_below() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 10)
    picked = [s.pick(ALL) for _ in range(4)]
    s.set_queue_limit("q", 2)
    assert s.pick(ALL) is None
    s.finished(str(picked[0]))
    s.finished(str(picked[1]))
    assert s.running(queue="q") == 2
    assert s.pick(ALL) is None  # 2 running, limit 2
    s.finished(str(picked[2]))
    assert s.pick(ALL) == "x4"
    assert s.pick(ALL) is None
    s.set_queue_limit("q", 4)
    assert [s.pick(ALL), s.pick(ALL)] == ["x5", "x6"]
    assert s.pick(ALL) is None
    assert s.running(queue="q") == 4
    s.set_queue_limit("q", 0)
    assert len(drain(s)) == 3


def test_key_limit_holds_across_queues_and_parked_key_returns_on_finished() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_key_limit("tenant-7", 1)
    f.push("k1", key="tenant-7", queue="q1")
    f.push("k2", key="tenant-7", queue="q2")
    f.many("o", 3, key="other", queue="q1")
    assert s.pick(ALL) == "k1"
    assert s.hold_reason("k2") == "concurrency key 'tenant-7' is at its limit of 1 running"
    assert [s.pick(ALL) for _ in range(3)] == ["o0", "o1", "o2"]
    assert s.pick(ALL) is None
    s.finished("k1")
    assert s.hold_reason("k2") == ""
    assert s.pick(ALL) == "k2"
    assert s.running(key="tenant-7") == 1


def test_parked_key_returns_at_its_priority() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_key_limit("A", 1)
    f.many("a", 3, key="A", priority=9)
    f.many("b", 3, key="B", priority=1)
    assert s.pick(ALL) == "a0"
    assert s.pick(ALL) == "b0"
    s.finished("a0")
    assert s.pick(ALL) == "a1"


def test_lowering_and_raising_a_key_limit() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("a", 10, key="A")
    running = [s.pick(ALL) for _ in range(3)]
    s.set_key_limit("A", 1)
    assert s.pick(ALL) is None
    assert s.hold_reason("a3") == "concurrency key 'A' is at its limit of 1 running"
    s.finished(str(running[0]))
    s.finished(str(running[1]))
    assert s.pick(ALL) is None
    s.set_key_limit("A", 3)
    assert [s.pick(ALL), s.pick(ALL)] == ["a3", "a4"]
    assert s.pick(ALL) is None
    assert s.running(key="A") == 3
    s.set_key_limit("A", 0)
    assert s.pick(ALL) == "a5"


def test_default_key_limit_reason() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 2)
    s.set_key_limit("", 1)
    s.pick(ALL)
    assert s.hold_reason("x1") == "the default concurrency key is at its limit of 1 running"


def test_global_limit_holds_across_queues_and_types() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("a", 3, queue="q1", task_type="t1")
    f.many("b", 3, queue="q2", task_type="t2")
    s.set_global_limit(2)
    assert s.pick(["t1"]) == "a0"
    assert s.pick(["t2"]) == "b0"
    assert s.pick(["t1", "t2"]) is None
    assert s.hold_reason("a1") == "the global limit of 2 running is reached"
    s.set_global_limit(1)
    s.finished("a0")
    assert s.pick(["t1", "t2"]) is None
    s.finished("b0")
    assert s.pick(["t1", "t2"]) == "a1"
    assert s.running() == 1


def test_hold_reason_names_the_queue_first_then_the_key() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 3, key="k", queue="emails")
    s.set_queue_limit("emails", 1)
    s.set_key_limit("k", 1)
    s.set_global_limit(1)
    s.pick(ALL)
    assert s.hold_reason("x1").startswith("queue 'emails'")
    s.set_queue_limit("emails", 0)
    assert s.hold_reason("x1").startswith("concurrency key 'k'")
    s.set_key_limit("k", 0)
    assert s.hold_reason("x1") == "the global limit of 1 running is reached"
    assert s.hold_reason("unknown") == ""
    assert s.hold_reason("x0") == ""  # running, not queued


def test_tasks_already_running_count_toward_limits() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_key_limit("k", 2)
    f.many("x", 3, key="k")
    s.add_running("old", "t", "q", 0, "k", 0)  # found running in etcd by a new leader
    s.add_running("x0", "t", "q", 0, "k", 1)  # queued here, but its worker re-claimed it
    s.add_running("x0", "t", "q", 0, "k", 1)
    assert len(s) == 2
    assert s.running(key="k") == 2
    assert s.pick(ALL) is None
    assert s.finished("old")
    assert s.pick(ALL) == "x1"


def test_limits_must_not_be_negative_and_weights_positive() -> None:
    s = Scheduler()
    with pytest.raises(ValueError, match="queue limit"):
        s.set_queue_limit("q", -1)
    with pytest.raises(ValueError, match="key limit"):
        s.set_key_limit("k", -1)
    with pytest.raises(ValueError, match="global limit"):
        s.set_global_limit(-1)
    with pytest.raises(ValueError, match="weight"):
        s.set_key_weight("k", 0)
    with pytest.raises(ValueError, match="not both"):
        s.running(queue="q", key="k")


# --- changes ---


def test_update_priority_reorders_the_next_pick() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 4)
    assert s.update_priority("x3", 5)
    assert s.update_priority("x0", -1)
    assert drain(s) == ["x3", "x1", "x2", "x0"]
    assert not s.update_priority("x0", 1)


def test_update_priority_keeps_fifo_place_within_key_at_the_new_level() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 3, priority=5)
    f.push("y", priority=0)
    s.update_priority("y", 5)
    s.update_priority("x0", 0)
    s.update_priority("x0", 5)
    assert drain(s) == ["x0", "x1", "x2", "y"]


def test_remove_takes_a_task_out() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("x", 3)
    assert s.remove("x1")
    assert not s.remove("x1")
    assert "x1" not in s
    assert len(s) == 2
    assert drain(s) == ["x0", "x2"]
    assert len(s) == 0


def test_remove_of_a_running_task_keeps_it_running() -> None:
    s = Scheduler()
    f = Feed(s)
    f.push("x")
    s.pick(ALL)
    assert not s.remove("x")
    assert s.running() == 1
    assert s.finished("x")
    assert not s.finished("x")
    assert s.running() == 0


def test_push_of_a_queued_id_replaces_it() -> None:
    s = Scheduler()
    f = Feed(s)
    f.push("x", priority=1)
    f.push("y", priority=5)
    f.push("x", priority=9)
    assert len(s) == 2
    assert drain(s) == ["x", "y"]


def test_workers_only_get_their_types() -> None:
    s = Scheduler()
    f = Feed(s)
    f.push("img", task_type="resize", priority=9)
    f.push("inv", task_type="charge")
    assert s.pick(["charge"]) == "inv"
    assert s.pick(["charge"]) is None
    assert s.pick([]) is None
    assert s.pick(["other"]) is None
    assert s.pick(["charge", "resize"]) == "img"


def test_a_worker_of_several_types_gets_the_highest_priority_then_oldest() -> None:
    s = Scheduler()
    f = Feed(s)
    f.push("r1", task_type="resize")
    f.push("c1", task_type="charge")
    f.push("r2", task_type="resize", priority=3)
    assert drain(s, ("charge", "resize")) == ["r2", "r1", "c1"]


def test_counts_and_oldest() -> None:
    s = Scheduler()
    f = Feed(s)
    f.many("a", 3, queue="emails", key="k")
    f.many("b", 2, queue="reports")
    assert s.queued() == 5
    assert s.queued("emails") == 3
    assert s.queued("nothing") == 0
    assert s.oldest("emails") == "a0"
    assert s.oldest("nothing") is None
    s.remove("a0")
    assert s.oldest("emails") == "a1"
    s.set_queue_limit("emails", 7)
    assert s.queue_limit("emails") == 7
    assert s.queues() == ["emails", "reports"]
    s.pick(["t"])
    assert s.running(queue="emails") == 1
    assert s.running(key="k") == 1
    drain(s)
    assert s.queues() == ["emails"]  # kept for its limit; reports has nothing left
    assert s.oldest("emails") is None


def test_empty_scheduler_forgets_everything() -> None:
    s = Scheduler()
    f = Feed(s)
    for i in range(200):
        f.push(f"x{i}", key=f"k{i % 7}", queue=f"q{i % 3}", task_type=f"t{i % 2}", priority=i % 4)
    for i in range(0, 200, 3):
        s.remove(f"x{i}")
    for i in range(1, 200, 5):
        s.update_priority(f"x{i}", 7)
    drain(s, ("t0", "t1"))
    assert len(s) == 0
    assert s.queues() == []
    assert not s._keys
    assert not s._types


# --- randomized model check ---


@dataclass
class Model:
    """The obvious implementation: lists and filters. Used to check the scheduler's choices, not to make them."""

    queued: dict[str, tuple[str, str, int, str, int]] = field(default_factory=dict)
    running: dict[str, tuple[str, str]] = field(default_factory=dict)
    queue_limits: dict[str, int] = field(default_factory=dict)
    key_limits: dict[str, int] = field(default_factory=dict)
    global_limit: int = 0

    def count(self, *, queue: str | None = None, key: str | None = None) -> int:
        return sum(1 for q, k in self.running.values() if (queue is None or q == queue) and (key is None or k == key))

    def eligible(self, types: set[str]) -> dict[str, tuple[str, str, int, str, int]]:
        if 0 < self.global_limit <= len(self.running):
            return {}
        return {
            tid: t
            for tid, t in self.queued.items()
            if t[0] in types
            and not 0 < self.queue_limits.get(t[1], 0) <= self.count(queue=t[1])
            and not 0 < self.key_limits.get(t[3], 0) <= self.count(key=t[3])
        }

    def hold_reason(self, task_id: str) -> str:
        _, queue, _, key, _ = self.queued[task_id]
        if 0 < (n := self.queue_limits.get(queue, 0)) <= self.count(queue=queue):
            return f"queue {queue!r} is at its limit of {n} running"
        if 0 < (n := self.key_limits.get(key, 0)) <= self.count(key=key):
            return f"concurrency key {key!r} is at its limit of {n} running"
        if 0 < self.global_limit <= len(self.running):
            return f"the global limit of {self.global_limit} running is reached"
        return ""


def _check_pick(model: Model, types: set[str], picked: str | None) -> None:
    eligible = model.eligible(types)
    if picked is None:
        assert not eligible, f"nothing picked but {sorted(eligible)} could run"
        return
    assert picked in eligible, f"{picked} picked but it could not run"
    task_type, queue, priority, key, sequence = eligible[picked]
    assert priority == max(t[2] for t in eligible.values()), "priority inverted"
    same_key = [t[4] for t in eligible.values() if t[:4] == (task_type, queue, priority, key)]
    assert sequence == min(same_key), "FIFO within a key broken"
    del model.queued[picked]
    model.running[picked] = (queue, key)
    assert model.global_limit == 0 or len(model.running) <= model.global_limit
    assert model.queue_limits.get(queue, 0) == 0 or model.count(queue=queue) <= model.queue_limits[queue]
    assert model.key_limits.get(key, 0) == 0 or model.count(key=key) <= model.key_limits[key]


def _check_counts(s: Scheduler, model: Model, rng: random.Random, queues: list[str], keys: list[str]) -> None:
    assert len(s) == len(model.queued)
    assert s.running() == len(model.running)
    for queue in queues:
        assert s.queued(queue) == sum(1 for t in model.queued.values() if t[1] == queue)
        assert s.running(queue=queue) == model.count(queue=queue)
        mine = [(t[4], tid) for tid, t in model.queued.items() if t[1] == queue]
        assert s.oldest(queue) == (min(mine)[1] if mine else None)
    for key in keys:
        assert s.running(key=key) == model.count(key=key)
    if model.queued:
        task_id = rng.choice(sorted(model.queued))
        assert s.hold_reason(task_id) == model.hold_reason(task_id)


@pytest.mark.parametrize("seed", range(40))
def test_random_operations_match_the_model(seed: int) -> None:
    rng = random.Random(seed)
    s = Scheduler()
    model = Model()
    types, queues, keys = ["t1", "t2", "t3"], ["q1", "q2"], ["k1", "k2", "k3", "k4"]
    sequences = itertools.count(1)
    original: dict[str, int] = {}  # task id -> its first sequence, for retries
    pushes = 0
    picked_total = 0
    for _ in range(600):
        op = rng.random()
        if op < 0.35:
            # A new task, or a retry of a finished one with its original sequence.
            done = [tid for tid in original if tid not in model.queued and tid not in model.running]
            if done and rng.random() < 0.3:
                task_id = rng.choice(done)
                spec = (rng.choice(types), rng.choice(queues), rng.randint(0, 2), rng.choice(keys))
                seq = original[task_id]
            else:
                task_id = f"x{len(original)}"
                spec = (rng.choice(types), rng.choice(queues), rng.randint(0, 2), rng.choice(keys))
                seq = original[task_id] = next(sequences)
            s.push(task_id, spec[0], spec[1], spec[2], spec[3], seq)
            model.queued[task_id] = (*spec, seq)
            pushes += 1
        elif op < 0.65:
            worker = set(rng.sample(types, rng.randint(1, 3)))
            picked = s.pick(worker)
            _check_pick(model, worker, picked)
            picked_total += picked is not None
        elif op < 0.75 and model.running:
            task_id = rng.choice(sorted(model.running))
            assert s.finished(task_id)
            del model.running[task_id]
        elif op < 0.8 and model.queued:
            task_id = rng.choice(sorted(model.queued))
            assert s.remove(task_id)
            del model.queued[task_id]
            pushes -= 1
        elif op < 0.81 and model.queued:
            # A worker re-claims a queued task after a leader change: it counts as running.
            task_id = rng.choice(sorted(model.queued))
            t = model.queued.pop(task_id)
            s.add_running(task_id, t[0], t[1], t[2], t[3], t[4])
            model.running[task_id] = (t[1], t[3])
            pushes -= 1
        elif op < 0.87 and model.queued:
            task_id = rng.choice(sorted(model.queued))
            priority = rng.randint(0, 3)
            assert s.update_priority(task_id, priority)
            t = model.queued[task_id]
            model.queued[task_id] = (t[0], t[1], priority, t[3], t[4])
        elif op < 0.92:
            queue, n = rng.choice(queues), rng.randint(0, 3)
            s.set_queue_limit(queue, n)
            model.queue_limits[queue] = n
        elif op < 0.97:
            key, n = rng.choice(keys), rng.randint(0, 2)
            s.set_key_limit(key, n)
            model.key_limits[key] = n
        elif op < 0.99:
            n = rng.randint(0, 6)
            s.set_global_limit(n)
            model.global_limit = n
        else:
            s.set_key_weight(rng.choice(keys), rng.randint(1, 3))
        _check_counts(s, model, rng, queues, keys)

    # Lift every limit, end every attempt: everything still queued comes out exactly once.
    for queue in queues:
        s.set_queue_limit(queue, 0)
        model.queue_limits[queue] = 0
    for key in keys:
        s.set_key_limit(key, 0)
        model.key_limits[key] = 0
    s.set_global_limit(0)
    model.global_limit = 0
    for task_id in list(model.running):
        s.finished(task_id)
        del model.running[task_id]
    remaining = set(model.queued)
    while (picked := s.pick(types)) is not None:
        _check_pick(model, set(types), picked)
        picked_total += 1
    assert not model.queued
    assert set(model.running) == remaining
    assert picked_total == pushes
    assert len(s) == 0


def test_a_paused_queue_keeps_its_tasks_and_lets_other_queues_run() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_queue_paused("emails", True)
    f.many("e", 2, queue="emails", priority=5)
    f.many("r", 2, queue="reports")
    assert [s.pick(ALL), s.pick(ALL), s.pick(ALL)] == ["r0", "r1", None]
    assert s.hold_reason("e0") == "queue 'emails' is paused"
    # A finished task frees a slot; the pause still holds, and a limit of 0 is still no limit.
    s.finished("r0")
    assert s.pick(ALL) is None and s.queue_limit("emails") == 0
    s.set_queue_paused("emails", False)
    assert [s.pick(ALL), s.pick(ALL)] == ["e0", "e1"]
    assert not s.queue_paused("emails")


def test_a_pause_outlives_an_empty_queue_and_a_limit_change() -> None:
    s = Scheduler()
    f = Feed(s)
    s.set_queue_paused("emails", True)
    assert s.queues() == ["emails"] and s.queue_paused("emails")
    s.set_queue_limit("emails", 3)
    f.push("e0", queue="emails")
    assert s.pick(ALL) is None
    s.set_queue_limit("emails", 0)
    assert s.pick(ALL) is None
    s.set_queue_paused("emails", False)
    assert s.pick(ALL) == "e0"
