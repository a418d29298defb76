"""Task ids by due time (delays, backoffs, expiries, timeouts), with lazy removal: O(log n) each."""

from __future__ import annotations

import heapq


class Deadlines:
    """Task ids keyed by a due time (seconds since the epoch)."""

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

    def pop_due(self, now: float, limit: int = 1 << 62) -> list[str]:
        """Up to `limit` ids due by `now`, earliest first."""
        ready: list[str] = []
        while len(ready) < limit and (due := self.next_due()) is not None and due <= now:
            _, task_id = heapq.heappop(self._heap)
            del self._live[task_id]
            ready.append(task_id)
        return ready
