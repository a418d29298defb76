"""What one attempt knows while it runs: its task, a progress sink and a cancel signal.

The session engine builds one TaskContext per attempt and hands it to whatever runs the attempt
(a Python handler in the Worker, a forwarded Execute call in the supervisor).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

from herder.clients.proto.v1 import task_pb2


class CancelSignal:
    """Whether the attempt is being cancelled: truthy once it is, with `reason` saying why.

    The handler's coroutine is also cancelled (CancelledError at its next await); this lets a
    handler that loops without awaiting, or runs cleanup, check for it or `await ctx.cancelled.wait()`.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason = ""
        self._callbacks: list[Callable[[], object]] = []

    def __bool__(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once the attempt is cancelled; cancelling the wait leaves the signal as it is."""
        await self._event.wait()

    def set(self, reason: str) -> None:
        """Mark the attempt cancelled (the first reason wins)."""
        if not self._event.is_set():
            self.reason = reason
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback()

    def add_callback(self, callback: Callable[[], object]) -> Callable[[], None]:
        """Call `callback` once the attempt is cancelled (now, if it is already); returns a function
        that takes it off again. Cheaper than a task waiting on `wait()` for each attempt."""
        if self._event.is_set():
            callback()
            return _nothing
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove


def _nothing() -> None:
    return None


ProgressSink = Callable[[float, str], Awaitable[None]]


class TaskContext:
    """What a handler knows about the attempt it runs, and how it reports progress.

    `task` is the full Task as assigned; `cancelled` turns true when the coordinator cancels the
    attempt or the worker shuts down past its grace period. Build one with just a Task to call a
    handler directly in a test (progress is then dropped).
    """

    def __init__(self, task: task_pb2.Task, *, progress_sink: ProgressSink | None = None) -> None:
        self.task = task
        self.cancelled = CancelSignal()
        self.metadata: Mapping[str, str] = dict(task.spec.metadata)
        self._progress_sink = progress_sink

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def attempt(self) -> int:
        """1 for the first attempt."""
        return self.task.attempt

    @property
    def task_type(self) -> str:
        return self.task.spec.type

    async def progress(self, fraction: float, message: str = "") -> None:
        """Report progress: `fraction` 0..1 done (negative when unknown) and a short message.

        Best effort: dropped while the worker is disconnected, never raises because of the
        connection. Raises ValueError for a fraction above 1 or NaN, or a message too long to store
        (the welcome's max_progress_bytes, 16 KiB by default).
        """
        if math.isnan(fraction) or fraction > 1:
            raise ValueError(f"progress fraction must be <= 1 (negative for unknown), got {fraction}")
        if self._progress_sink is not None:
            await self._progress_sink(fraction, message)


__all__ = ["CancelSignal", "ProgressSink", "TaskContext"]
