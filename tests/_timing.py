"""Waiting on conditions with deadlines, and checking measured durations against a tolerance.

    task = await eventually(lambda: get_if_queued(id), what="task queued")   # the first truthy value
    await quiet(worker.assignments, 0.5, what="a fourth assignment")          # nothing arrives for 0.5 s
    assert_between(elapsed, 1.0, 1.0 + SLACK, "backoff of the first retry")

Wall-clock times (`now()`, `seconds(timestamp)`) compare with the coordinator's timestamps, which
come from the same machine's clock; durations inside a test use `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

T = TypeVar("T")

# How late a timed event (a backoff's end, a delay, a timeout, an expiry) may come: the coordinator's
# timers, a commit and a message on a loaded test machine.
SLACK = 2.0


async def eventually(
    check: Callable[[], Awaitable[T]], *, timeout: float = 15.0, what: str = "condition", interval: float = 0.05
) -> T:
    """The first truthy value `check()` returns; AssertionError naming `what` (and the last value seen)
    once `timeout` seconds pass without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last seen: {value!r}")
        await asyncio.sleep(interval)


def wait_until(check: Callable[[], T], *, timeout: float = 15.0, what: str = "condition", interval: float = 0.05) -> T:
    """The synchronous `eventually`: the first truthy value `check()` returns, for tests driving
    subprocesses with blocking calls; AssertionError naming `what` and the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}; last seen: {value!r}")
        time.sleep(interval)


def retry_unavailable(call: Callable[[], T], *, timeout: float = 30.0) -> T:
    """call()'s value once it stops failing with UNAVAILABLE (a leader stepping down and back), as any
    client would retry; other errors, or UNAVAILABLE after `timeout` seconds, are raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                raise
        time.sleep(0.1)


async def quiet(queue: asyncio.Queue[Any], seconds: float, *, what: str) -> None:
    """Assert that nothing arrives in `queue` for `seconds` (an item that does is named in the error)."""
    try:
        item = await asyncio.wait_for(queue.get(), seconds)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected {what}: {item!r}")


async def until(wall_time: float) -> None:
    """Let wall-clock time pass up to `wall_time`: for checks that something did NOT happen by then."""
    delay = wall_time - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def now() -> float:
    """Wall-clock seconds, comparable with the coordinator's timestamps."""
    return time.time()


def seconds(value: timestamp_pb2.Timestamp | duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def duration(value: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(value * 1e9))
    return out


def assert_between(value: float, low: float, high: float, what: str) -> None:
    """low <= value < high, or an AssertionError saying what was measured and the bounds."""
    assert low <= value < high, f"{what}: measured {value:.3f}s, expected within [{low:.3f}s, {high:.3f}s)"


__all__ = [
    "SLACK",
    "assert_between",
    "duration",
    "eventually",
    "now",
    "quiet",
    "retry_unavailable",
    "seconds",
    "until",
    "wait_until",
]
