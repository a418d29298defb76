"""Overload: while the coordinator's event loop runs too far behind, new work is refused with a clear status.

Every call waits for the one event loop: in gRPC's queue of calls not yet picked up, and then in the
loop's queue of ready callbacks. When submissions arrive faster than the loop can serve them, both
grow; left alone, gRPC sheds calls past its pending limits at random with a bare CANCELLED, and the
ones it keeps wait seconds. Instead, while the loop lags more than `max_lag`, SubmitTask, SubmitTasks
and RetryTask answer RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` before anything is written, and
cheaply, so the loop catches up; results, acknowledgements, heartbeats, cancels and reads (what drains
the work already taken) are served as usual.

The lag is measured by a probe scheduled every `interval`: how late it last ran, or how overdue the
next one is now, whichever is larger.
"""

from __future__ import annotations

import asyncio

from herder.clients.errors import OverloadedError

# How often the probe runs: a lag is seen within this, and the probe costs ~20 calls a second.
PROBE_INTERVAL = 0.05
# What a refused caller is asked to wait, at least and at most.
MIN_RETRY_AFTER = 0.1
MAX_RETRY_AFTER = 5.0


class LoopLag:
    """How far behind the running event loop is, in seconds. start() in the loop; stop() when done."""

    def __init__(self, interval: float = PROBE_INTERVAL) -> None:
        self._interval = interval
        self._last = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._probe)

    def _probe(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._last = now - self._due
        self._schedule(now)

    def seconds(self) -> float:
        if self._loop is None or self._handle is None:
            return 0.0
        return max(self._last, self._loop.time() - self._due, 0.0)


class Admission:
    """Whether new work is taken now; `max_lag` 0 takes everything."""

    def __init__(self, max_lag: float, lag: LoopLag) -> None:
        self.max_lag = max_lag
        self._lag = lag
        # Calls refused since start, for the metrics and the bench.
        self.refused = 0

    def check(self) -> None:
        """Raise OverloadedError (RESOURCE_EXHAUSTED with a RetryInfo) while the loop lags past max_lag."""
        if not self.max_lag:
            return
        lag = self._lag.seconds()
        if lag <= self.max_lag:
            return
        self.refused += 1
        retry_after = min(max(lag, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
        raise OverloadedError(
            f"the coordinator is overloaded (its event loop runs {lag * 1000:.0f} ms behind, the limit is"
            f" {self.max_lag * 1000:.0f} ms); nothing was written: retry after {retry_after:.1f}s",
            retry_after=retry_after,
        )


__all__ = ["Admission", "LoopLag"]
