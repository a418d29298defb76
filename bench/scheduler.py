"""Cost of the scheduler's choices as the backlog grows: per pick, push and finished, and memory per task.

For each backlog size (default 1,000 / 10,000 / 100,000 / 1,000,000 queued tasks, spread at random
over 10,000 concurrency keys, 4 queues, 2 task types and 3 priority levels), fills a `Scheduler`,
then runs batches at a steady backlog: a worker serving both types picks a batch, the attempts
finish, and as many new tasks are pushed. Each figure is the median over batches of the batch's time
per operation, in microseconds (the best batch is shown too: on a busy machine it is the steadier
figure). The same is measured with limits in use (every key limited to 1
running, each queue to a quarter of the batch), so keys and lanes are parked and unparked all the time.
Memory per queued task is measured with tracemalloc over the scheduler's own allocations (task ids
belong to the caller and are not counted). Prints a table and, on its last line, the figures as JSON.
A measurement, not a test.

    python bench/scheduler.py [--sizes 1000,10000,100000,1000000] [--keys 10000] [--batch 1000] [--batches 25]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass

from herder.server.scheduler import Scheduler

TYPES = ("resize", "charge")
QUEUES = ("default", "emails", "reports", "billing")
PRIORITIES = 3


@dataclass(frozen=True)
class Workload:
    """What the bench pushes: tasks spread at random over keys, queues, types and priorities."""

    keys: int = 10_000
    seed: int = 7


class Feeder:
    """Makes task specs and pushes them with increasing sequences."""

    def __init__(self, workload: Workload) -> None:
        self.rng = random.Random(workload.seed)
        self.keys = [f"tenant-{i}" for i in range(workload.keys)]
        self.sequence = 0

    def specs(self, n: int) -> list[tuple[str, str, str, int, str, int]]:
        rng, keys = self.rng, self.keys
        out = []
        for _ in range(n):
            self.sequence += 1
            out.append(
                (
                    f"task-{self.sequence}",
                    TYPES[self.sequence % len(TYPES)],
                    QUEUES[rng.randrange(len(QUEUES))],
                    rng.randrange(PRIORITIES),
                    keys[rng.randrange(len(keys))],
                    self.sequence,
                )
            )
        return out


def fill(s: Scheduler, specs: list[tuple[str, str, str, int, str, int]]) -> None:
    push = s.push
    for spec in specs:
        push(*spec)


def steady(size: int, workload: Workload, batch: int, batches: int, limited: bool) -> dict[str, float]:
    """Median µs per pick, finished and push over batches at a steady backlog of `size` tasks."""
    feeder = Feeder(workload)
    s = Scheduler()
    fill(s, feeder.specs(size))
    if limited:
        for key in feeder.keys:
            s.set_key_limit(key, 1)
        for queue in QUEUES:
            s.set_queue_limit(queue, batch // len(QUEUES))
    per_pick: list[float] = []
    per_finished: list[float] = []
    per_push: list[float] = []
    picked_total = 0
    pick, finished = s.pick, s.finished
    for _ in range(batches):
        specs = feeder.specs(batch)
        start = time.perf_counter()
        picked = [pick(TYPES) for _ in range(batch)]
        elapsed = time.perf_counter() - start
        got = [task_id for task_id in picked if task_id is not None]
        picked_total += len(got)
        per_pick.append(elapsed / batch * 1e6)
        start = time.perf_counter()
        for task_id in got:
            finished(task_id)
        if got:
            per_finished.append((time.perf_counter() - start) / len(got) * 1e6)
        specs = specs[: len(got)] or specs[:1]
        start = time.perf_counter()
        fill(s, specs)
        per_push.append((time.perf_counter() - start) / len(specs) * 1e6)
    return {
        "pick_us": round(statistics.median(per_pick), 3),
        "pick_us_best": round(min(per_pick), 3),
        "finished_us": round(statistics.median(per_finished), 3) if per_finished else 0.0,
        "push_us": round(statistics.median(per_push), 3),
        "push_us_best": round(min(per_push), 3),
        "picked_per_batch": round(picked_total / batches, 1),
        "queued": len(s),
    }


def memory_per_task(size: int, workload: Workload) -> float:
    """Bytes the scheduler allocates per queued task (tracemalloc), the task id strings excluded."""
    feeder = Feeder(workload)
    specs = feeder.specs(size)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    s = Scheduler()
    fill(s, specs)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(s) == size
    return round((after - before) / size, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="backlog sizes, comma separated")
    parser.add_argument("--keys", type=int, default=10_000, help="concurrency keys the tasks are spread over")
    parser.add_argument("--batch", type=int, default=1000, help="picks per timed batch")
    parser.add_argument("--batches", type=int, default=25, help="timed batches per size")
    parser.add_argument("--memory-sizes", default="100000,1000000", help="backlogs to measure memory at")
    args = parser.parse_args()
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
        memory_sizes = [int(x) for x in args.memory_sizes.split(",") if x]
    except ValueError:
        parser.error("--sizes and --memory-sizes take comma-separated whole numbers")
    if not sizes:
        parser.error("--sizes needs at least one size")
    if args.keys < 1 or args.batch < 2 or args.batches < 1 or any(n < 1 for n in sizes + memory_sizes):
        parser.error("--keys, --batches and sizes must be 1 or more, --batch 2 or more")
    workload = Workload(keys=args.keys)
    began = time.perf_counter()

    results: dict[str, dict[str, dict[str, float]]] = {"plain": {}, "limited": {}}
    print(
        f"{'queued':>9} {'mode':>8} {'pick µs':>8} {'(best)':>7} {'finish µs':>9} {'push µs':>8} {'(best)':>7}"
        f" {'picked/batch':>12}"
    )
    for size in sizes:
        for mode in ("plain", "limited"):
            r = steady(size, workload, args.batch, args.batches, limited=mode == "limited")
            results[mode][str(size)] = r
            print(
                f"{size:>9,} {mode:>8} {r['pick_us']:>8.2f} {r['pick_us_best']:>7.2f} {r['finished_us']:>9.2f}"
                f" {r['push_us']:>8.2f} {r['push_us_best']:>7.2f}"
                f" {r['picked_per_batch']:>12,.0f}",
                flush=True,
            )
            gc.collect()
    memory: dict[str, float] = {}
    for size in memory_sizes:
        memory[str(size)] = memory_per_task(size, workload)
        print(f"memory with {size:,} queued: {memory[str(size)]:.0f} bytes per task", flush=True)
        gc.collect()
    plain = [results["plain"][str(n)]["pick_us"] for n in sizes]
    best = [results["plain"][str(n)]["pick_us_best"] for n in sizes]
    flatness = round(max(plain) / min(plain), 2)
    flatness_best = round(max(best) / min(best), 2)
    print(
        f"pick cost, dearest over cheapest backlog: {flatness}x (best batches {flatness_best}x);"
        f" took {time.perf_counter() - began:.0f} s"
    )
    print(
        json.dumps(
            {
                "keys": args.keys,
                "queues": len(QUEUES),
                "types": len(TYPES),
                "priorities": PRIORITIES,
                "batch": args.batch,
                "batches": args.batches,
                "results": results,
                "pick_max_over_min": flatness,
                "pick_best_max_over_min": flatness_best,
                "memory_bytes_per_task": memory,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
