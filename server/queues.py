"""The leader's in-memory queues: ready tasks by type (priority, then FIFO) and delayed tasks by run time.

Entries are plain tuples; removal is lazy (a task that left the queue is
skipped when it reaches the head), so every operation is O(log n).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable


class ReadyQueues:
    """Ready task ids per task type, higher priority first, then lower sequence (FIFO)."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, int, str]]] = {}
        # id -> (type, priority, sequence) of its live entry; other heap entries are stale.
        self._live: dict[str, tuple[str, int, int]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._live

    def push(self, task_type: str, priority: int, sequence: int, task_id: str) -> None:
        self._live[task_id] = (task_type, priority, sequence)
        heapq.heappush(self._heaps.setdefault(task_type, []), (-priority, sequence, task_id))

    def discard(self, task_id: str) -> None:
        self._live.pop(task_id, None)

    def count(self, task_type: str) -> int:
        return sum(1 for t, _, _ in self._live.values() if t == task_type)

    def _head(self, task_type: str) -> tuple[int, int, str] | None:
        heap = self._heaps.get(task_type)
        while heap:
            neg_priority, sequence, task_id = heap[0]
            if self._live.get(task_id) == (task_type, -neg_priority, sequence):
                return heap[0]
            heapq.heappop(heap)
        return None

    def pop_best(self, task_types: Iterable[str]) -> str | None:
        """Remove and return the best ready task among these types, or None."""
        best: tuple[int, int, str] | None = None
        best_type = ""
        for task_type in task_types:
            head = self._head(task_type)
            if head is not None and (best is None or head < best):
                best, best_type = head, task_type
        if best is None:
            return None
        heapq.heappop(self._heaps[best_type])
        del self._live[best[2]]
        return best[2]

    def types_waiting(self) -> set[str]:
        return {t for t in self._heaps if self._head(t) is not None}


class DelayQueue:
    """Task ids keyed by the time they become ready (seconds since the epoch)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._live: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._live)

    def push(self, due: float, task_id: str) -> None:
        self._live[task_id] = due
        heapq.heappush(self._heap, (due, task_id))

    def discard(self, task_id: str) -> None:
        self._live.pop(task_id, None)

    def next_due(self) -> float | None:
        while self._heap:
            due, task_id = self._heap[0]
            if self._live.get(task_id) == due:
                return due
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float) -> list[str]:
        ready: list[str] = []
        while (due := self.next_due()) is not None and due <= now:
            _, task_id = heapq.heappop(self._heap)
            del self._live[task_id]
            ready.append(task_id)
        return ready
