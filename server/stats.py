"""Per-queue figures for ListQueues: tasks by state, and wait times and dispatch rate over a recent window."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class QueueFigures:
    counts: dict[int, int]
    wait_p50: float
    wait_p99: float
    dispatch_rate: float


@dataclass(eq=False)
class _Queue:
    counts: Counter[int] = field(default_factory=Counter)
    # (monotonic time of dispatch, seconds the task waited queued)
    waits: deque[tuple[float, float]] = field(default_factory=deque)


class QueueBook:
    """Counts kept up to date on every state change, so reading them costs nothing per task.

    window: seconds of dispatches that wait percentiles and the dispatch rate cover;
    max_samples bounds the memory a very busy queue's window takes.
    """

    def __init__(self, window: float = 300.0, max_samples: int = 20_000) -> None:
        self.window = window
        self.max_samples = max_samples
        self._queues: dict[str, _Queue] = {}

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue()
        return queue

    def transition(self, queue: str, previous: int, state: int) -> None:
        """A task of this queue went from previous (0 when new) to state."""
        if previous == state:
            return
        counts = self._queue(queue).counts
        if previous:
            counts[previous] -= 1
        counts[state] += 1

    def forget(self, queue: str, state: int) -> None:
        """A finished task was deleted."""
        counts = self._queue(queue).counts
        counts[state] -= 1

    def dispatched(self, queue: str, waited: float) -> None:
        waits = self._queue(queue).waits
        waits.append((time.monotonic(), max(waited, 0.0)))
        if len(waits) > self.max_samples:
            waits.popleft()

    def snapshot(self) -> dict[str, dict[int, int]]:
        """Counts per queue, copied: safe to call from another thread (the metrics exporter's)."""
        return {name: dict(q.counts) for name, q in list(self._queues.items())}

    def queues(self) -> list[str]:
        return sorted(name for name, q in self._queues.items() if any(q.counts.values()) or q.waits)

    def totals(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for queue in self._queues.values():
            total.update(queue.counts)
        return total

    def figures(self, name: str) -> QueueFigures:
        queue = self._queue(name)
        now = time.monotonic()
        while queue.waits and now - queue.waits[0][0] > self.window:
            queue.waits.popleft()
        waits = sorted(w for _, w in queue.waits)
        span = min(self.window, now - queue.waits[0][0]) if queue.waits else 0.0
        return QueueFigures(
            counts={state: n for state, n in queue.counts.items() if n},
            wait_p50=_percentile(waits, 0.50),
            wait_p99=_percentile(waits, 0.99),
            dispatch_rate=len(waits) / max(span, 1.0) if waits else 0.0,
        )


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
