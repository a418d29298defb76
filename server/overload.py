"""Overload: while the coordinator cannot keep up, new work is refused at once with a clear status.

Submissions that arrive faster than the coordinator serves them wait in two places: in gRPC's queue of
calls received but not yet picked up (gRPC's asyncio server picks up one call per turn of the event
loop), and in the event loop's own queue of ready callbacks. Left alone, both grow: calls wait
seconds, and past its pending limit gRPC drops them with a bare CANCELLED. Instead, while

- more than `max_waiting` calls wait in gRPC to be picked up, or
- the event loop runs more than `max_lag` seconds behind,

a share of SubmitTask, SubmitTasks and RetryTask calls (growing from none at the bound to all at
twice it, and at most REFUSALS_PER_SECOND) answer RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo`
before anything is written, so callers back off; results, acknowledgements, heartbeats, cancels and
reads (what drains the work already taken) are served as usual.

A probe every `interval` measures both: how late it runs (or how overdue the next one is now,
whichever is larger) is the lag; the calls gRPC's channelz counts as started and not finished on this
server, less those the coordinator's handlers hold (`Calls`, counted by the decoding interceptor), are
the waiting calls. Calls gRPC dropped past its pending limit, or whose callers gave up before they were
picked up, stay in the server's count forever; while that count says many wait, the calls open on
each connection are counted instead (at most once a second) to take them out. Without channelz (a
gRPC that lacks it) only the lag is watched.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import random
from typing import Any

from herder.clients.errors import OverloadedError

log = logging.getLogger(__name__)

# What grpcio-channelz serves from; absent (another gRPC build), the waiting calls are not known.
_channelz: Any = importlib.import_module("grpc._cython.cygrpc")
if not hasattr(_channelz, "channelz_get_server"):  # pragma: no cover - grpcio 1.85 has it
    _channelz = None

# How often the probe runs: what it sees is at most this old.
PROBE_INTERVAL = 0.05
# While fewer than a quarter of max_waiting calls wait and the probe runs on time, channelz is read at
# every SLOW_READS-th probe only: a read costs ~60 us on an idle coordinator and several times that
# under load (1% of a busy coordinator's CPU at every probe), and a backlog building from there is
# seen at most 0.15 s later.
SLOW_READS = 4
# The calls open on every connection are counted at most this often (seconds), and only while the
# server's own count says many wait; SOCKETS_PAGE connections are read per channelz page.
RECOUNT_INTERVAL = 1.0
SOCKETS_PAGE = 100
# Refusals a second at most: a refusal costs the coordinator about as much gRPC work as a small call
# (~250 us on the development machine), so refusing without a bound under a sustained overload from
# callers that do not back off takes its whole core and leaves nothing for the calls it takes. Past
# the budget, calls are taken and the excess waits in gRPC (bounded by --max-pending-calls).
REFUSALS_PER_SECOND = 1000
# What a refused caller is asked to wait, at least and at most.
MIN_RETRY_AFTER = 0.1
MAX_RETRY_AFTER = 5.0


class Calls:
    """Calls the coordinator's handlers have picked up and not finished (kept by DecodingInterceptor)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0


def server_ids() -> set[int]:
    """The channelz ids of this process's gRPC servers (empty without channelz)."""
    if _channelz is None:
        return set()
    try:
        listed = json.loads(_channelz.channelz_get_servers(0))
    except (ValueError, RuntimeError):
        return set()
    return {int(server["ref"]["serverId"]) for server in listed.get("server", ())}


class Overload:
    """The overload check of one coordinator. start() in its event loop once its server runs; stop() when done."""

    def __init__(self, max_lag: float, max_waiting: int, interval: float = PROBE_INTERVAL) -> None:
        self.max_lag = max_lag
        self.max_waiting = max_waiting
        self.calls = Calls()
        self._interval = interval
        self._server_id: int | None = None
        self._last_lag = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Calls waiting in gRPC at the last read, and probes since it.
        self.waiting = 0
        self._unread = 0
        # Calls counted as started and never as ended that are not open (see _open_streams), as of the
        # last recount, and when that was (loop time).
        self._dropped = 0
        self._recounted = float("-inf")
        # Calls refused since start.
        self.refused = 0
        # Refusals the budget still allows, and when it was last topped up.
        self._tokens = float(REFUSALS_PER_SECOND)
        self._topped = 0.0

    def watch_server(self, before: set[int]) -> None:
        """Count the waiting calls of the gRPC server created since `before` (server_ids() just before it)."""
        created = server_ids() - before
        if len(created) == 1:
            self._server_id = created.pop()
        elif self.max_waiting:
            log.warning("overload: cannot count the calls waiting in gRPC (no channelz); watching the loop's lag only")

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
        self._last_lag = now - self._due
        self._unread += 1
        # A late probe means a busy loop: the very time calls pile up unread in gRPC.
        if self._unread >= SLOW_READS or self._many(self.waiting) or self._last_lag > self._interval:
            self._unread = 0
            self.waiting = self.count_waiting()
        self._schedule(now)

    def _counts(self) -> tuple[int, int] | None:
        """(calls received, calls ended) on this server since it started, as channelz counts them."""
        if self._server_id is None:
            return None
        try:
            data = json.loads(_channelz.channelz_get_server(self._server_id))["server"]["data"]
        except (ValueError, RuntimeError, KeyError):
            return None
        ended = int(data.get("callsSucceeded", 0)) + int(data.get("callsFailed", 0))
        return int(data.get("callsStarted", 0)), ended

    def received(self) -> int:
        """Calls this server has received since it started (0 when not known)."""
        counts = self._counts()
        return counts[0] if counts is not None else 0

    def count_waiting(self) -> int:
        """The calls waiting in gRPC to be picked up now (a channelz read; 0 when not known)."""
        counts = self._counts()
        if counts is None:
            return 0
        started, ended = counts
        waiting = started - ended - self._dropped - self.calls.open
        if self._many(waiting) and self._loop is not None:
            now = self._loop.time()
            if now - self._recounted >= RECOUNT_INTERVAL:
                # Possibly calls gRPC dropped or their callers gave up on: see _open_streams.
                self._recounted = now
                open_streams = self._open_streams()
                if open_streams is not None:
                    self._dropped = max(started - ended - open_streams, 0)
                    waiting = started - ended - self._dropped - self.calls.open
        return max(waiting, 0)

    def _many(self, waiting: int) -> bool:
        """Whether this many waiting calls is a quarter of the limit or more (any, with no limit)."""
        return waiting * 4 >= max(self.max_waiting, 1)

    def _open_streams(self) -> int | None:
        """Calls open on this server's connections now (picked up or waiting), as their transports count
        them; None when channelz does not answer.

        A call gRPC drops past its pending limit, or whose caller cancels it before it is picked up, is
        counted by the server as started and never as ended, so (started - ended) keeps every such call
        forever; its connection counts it as a failed stream. Reading every connection costs a channelz
        call each, so this recount runs only when the server's count says many calls wait, at most once
        every RECOUNT_INTERVAL.
        """
        total, start = 0, 0
        try:
            while True:
                page = json.loads(_channelz.channelz_get_server_sockets(self._server_id, start, SOCKETS_PAGE))
                refs = page.get("socketRef", ())
                for ref in refs:
                    socket_id = int(ref["socketId"])
                    start = max(start, socket_id + 1)
                    data = json.loads(_channelz.channelz_get_socket(socket_id))["socket"].get("data", {})
                    total += (
                        int(data.get("streamsStarted", 0))
                        - int(data.get("streamsSucceeded", 0))
                        - int(data.get("streamsFailed", 0))
                    )
                if page.get("end", True) or not refs:
                    return total
        except (ValueError, RuntimeError, KeyError):
            return None

    def lag(self) -> float:
        """Seconds the event loop runs behind now."""
        if self._loop is None or self._handle is None:
            return 0.0
        return max(self._last_lag, self._loop.time() - self._due, 0.0)

    def _refuse(self, value: float, limit: float) -> bool:
        """Whether to refuse this call: with a chance growing from none at `limit` to certain at twice it,
        while the refusal budget lasts."""
        return value > limit and random.random() < (value - limit) / limit and self._spend()

    def _spend(self) -> bool:
        """Take one refusal from the budget (REFUSALS_PER_SECOND); False when it is spent."""
        now = self._loop.time() if self._loop is not None else 0.0
        self._tokens = min(self._tokens + (now - self._topped) * REFUSALS_PER_SECOND, float(REFUSALS_PER_SECOND))
        self._topped = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        self.refused += 1
        return True

    def check(self) -> None:
        """Raise OverloadedError (RESOURCE_EXHAUSTED with a RetryInfo) for a share of the calls while a bound
        is passed: none at the bound, all at twice it. Refusing every call the moment the bound is passed
        would refuse nearly all under a sustained overload (the backlog never falls below it while calls
        keep coming faster than they are picked up); refusing the excess keeps serving at capacity."""
        waiting, limit = self.waiting, self.max_waiting
        if limit and self._refuse(waiting, limit):
            raise OverloadedError(
                f"the coordinator is overloaded ({waiting} calls wait to be read, the limit is {limit});"
                f" nothing was written: retry after {MIN_RETRY_AFTER:.1f}s",
                retry_after=MIN_RETRY_AFTER,
            )
        if not self.max_lag:
            return
        lag = self.lag()
        if self._refuse(lag, self.max_lag):
            retry_after = min(max(lag, MIN_RETRY_AFTER), MAX_RETRY_AFTER)
            raise OverloadedError(
                f"the coordinator is overloaded (its event loop runs {lag * 1000:.0f} ms behind, the limit is"
                f" {self.max_lag * 1000:.0f} ms); nothing was written: retry after {retry_after:.1f}s",
                retry_after=retry_after,
            )


__all__ = ["Calls", "Overload", "server_ids"]
