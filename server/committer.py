"""One committer per leader: groups concurrent writes into fenced etcd transactions.

One rule: a request (one `submit()`, one logical change: a task and its
idempotency key, a terminal state and its retention marker) is committed in
one transaction, never split. Each transaction holds at most `max_ops`
operations and about `max_bytes` of payload (etcd allows 128 operations and
1.5 MiB per request by default) and compares the leader key's create
revision, so a deposed leader's write fails instead of landing. Up to
`max_in_flight` transactions are sent at once. A key is in at most one of
them, and requests touching it land in the order they were submitted, each
at its own revision (watchers rely on that order); meanwhile other keys'
requests keep filling transactions. Transactions are settled in the order
they were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from herder.server import _etcd, metrics
from herder.server._etcd import Etcd, EtcdError

log = logging.getLogger(__name__)

# etcd's default --max-request-bytes; a transaction above it is refused by etcd.
ETCD_MAX_REQUEST_BYTES = 1536 * 1024
# What a transaction adds around its writes (the fence compare, framing), generously.
TXN_OVERHEAD_BYTES = 4096


class FencedError(Exception):
    """The write was refused: this replica no longer leads (or etcd failed mid-commit)."""


class RequestTooLargeError(ValueError):
    """A request that no transaction could hold: more than max_ops writes or max_request_bytes.

    Raised by submit() before anything is queued; callers check sizes first, so this is a bug guard.
    """


@dataclass(frozen=True, slots=True)
class Write:
    """Put value at key, or delete key when value is None."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class CommitLimits:
    """max_ops and max_bytes bound one transaction; max_in_flight is how many are sent at once.

    A second transaction goes out beside one in flight only once parallel_ops writes wait
    (a full transaction's worth): below that, waiting for the first gathers more writes per
    transaction, which costs less CPU per write than another round trip. Measured with
    bench/throughput.py: +40% one-RPC-each and +10% batched tasks/s over sending at once.
    """

    max_ops: int = 128
    max_bytes: int = 1024 * 1024
    max_in_flight: int = 4
    parallel_ops: int = 128
    # One request alone may exceed max_bytes (it then goes in a transaction of its own), never this.
    max_request_bytes: int = ETCD_MAX_REQUEST_BYTES - TXN_OVERHEAD_BYTES
    # How many waiting requests one batch looks at (those behind a busy key are skipped).
    max_scan: int = 4096
    # Seconds one transaction may take; past that its outcome is unknown and the leader steps down
    # (the next one rebuilds from etcd). A healthy etcd commits in milliseconds, but a transaction
    # caught in an etcd raft election waits out etcd's own request timeout (5 s and more), and every
    # later commit is answered behind it: this bounds that stall.
    timeout: float = 2.5


@dataclass(eq=False, slots=True)
class _Request:
    """One submit(): its writes go in one transaction; answered once that landed."""

    future: asyncio.Future[int]
    writes: list[Write]
    keys: frozenset[bytes]
    size: int


@dataclass(eq=False)
class _Batch:
    # The transaction, filled in place: building each operation as its own message and copying it
    # in costs four times as much a write.
    request: Any
    ops: int = 0
    requests: list[_Request] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    task: asyncio.Task[None] | None = None
    revision: int = 0
    error: FencedError | None = None


class Committer:
    """Commits writes, many requests per transaction, several transactions at a time.

    `commit()` returns the etcd revision its writes landed at, and raises
    FencedError when the fence failed or etcd could not confirm a transaction;
    after that every later commit fails too and `failed` is set. An unexpected
    error inside the committer is logged with its traceback and fails it the same way.
    """

    def __init__(
        self,
        etcd: Etcd,
        fence_key: bytes,
        fence_revision: int,
        limits: CommitLimits | None = None,
        expired: Callable[[], bool] | None = None,
    ) -> None:
        self._etcd = etcd
        # Whether the leader's lease may have run out: then nothing more is sent, even before the
        # fence could fail (another replica may be elected the moment etcd expires the lease).
        self._expired = expired
        self._fence = _etcd.create_revision_is(fence_key, fence_revision)
        self._limits = limits or CommitLimits()
        # Requests not yet sent, oldest first.
        self._pending: deque[_Request] = deque()
        # Each key written by a waiting request, to that request: a later write of the same keys
        # replaces it before it is sent (a task's RUNNING record, when its result is already in).
        self._pending_by_key: dict[bytes, _Request] = {}
        self._pending_ops = 0
        self._in_flight: deque[_Batch] = deque()
        self._busy: set[bytes] = set()
        self._wakeup = asyncio.Event()
        self.failed = asyncio.Event()
        self.error: FencedError | None = None
        self.transactions = 0
        self.operations = 0
        # Requests that replaced a waiting one instead of queuing.
        self.superseded = 0
        self._task = asyncio.create_task(self._run(), name="herder-committer")

    @property
    def idle(self) -> bool:
        """No transaction is in flight: every write that landed has had its future settled."""
        return not self._in_flight

    def submit(self, writes: list[Write]) -> asyncio.Future[int]:
        """Queue writes to land together; the future resolves with the revision they landed at.

        Writes that rewrite every key of a request still waiting (not sent) replace it in its place,
        and its caller's future is theirs too: the replaced values never reach etcd, which is what a
        crash before they were sent would have left anyway. A no-op task's RUNNING record, still
        waiting when its result comes in, is the common case: one write a task less under load.

        Raises RequestTooLargeError (queuing nothing) when no transaction could hold them.
        """
        if self.error is not None or not writes:
            settled: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            if self.error is not None:
                settled.set_exception(self.error)
            else:
                settled.set_result(0)
            return settled
        size = sum(len(w.key) + len(w.value or b"") for w in writes)
        keys = frozenset(w.key for w in writes)
        if len(writes) > self._limits.max_ops or size > self._limits.max_request_bytes or len(keys) < len(writes):
            raise RequestTooLargeError(
                f"{len(writes)} writes of {size} bytes in all (distinct keys: {len(keys)}): one transaction takes"
                f" at most {self._limits.max_ops} writes to distinct keys and {self._limits.max_request_bytes} bytes"
            )
        earlier = self._supersedable(keys)
        if earlier is not None:
            # Not sent yet, and every key it writes is written again here: it is replaced, in its place.
            for key in keys - earlier.keys:
                self._pending_by_key[key] = earlier
            self._pending_ops += len(writes) - len(earlier.writes)
            earlier.writes, earlier.keys, earlier.size = writes, keys, size
            self.superseded += 1
            return earlier.future
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        request = _Request(future, writes, keys, size)
        self._pending.append(request)
        for key in keys:
            self._pending_by_key[key] = request
        self._pending_ops += len(writes)
        self._wakeup.set()
        return future

    def _supersedable(self, keys: frozenset[bytes]) -> _Request | None:
        """The waiting request these keys would replace whole: one not sent yet whose keys are all
        among them, with none of the other keys waiting in another request (whose order would change)."""
        earlier: _Request | None = None
        for key in keys:
            found = self._pending_by_key.get(key)
            if found is None:
                continue
            if earlier is not None and found is not earlier:
                return None
            earlier = found
        if earlier is None or not earlier.keys <= keys:
            return None
        return earlier

    async def commit(self, writes: list[Write]) -> int:
        return await self.submit(writes)

    async def _run(self) -> None:
        try:
            while True:
                self._wakeup.clear()
                self._finalize()
                if self.error is not None:
                    raise self.error
                while self._pending and len(self._in_flight) < self._limits.max_in_flight:
                    if self._in_flight and self._pending_ops < self._limits.parallel_ops:
                        break
                    batch = self._take_batch()
                    if batch is None:
                        break  # every waiting request waits for a key in a transaction in flight
                    self._in_flight.append(batch)
                    batch.task = asyncio.create_task(self._send(batch))
                    batch.task.add_done_callback(lambda _: self._wakeup.set())
                await self._wakeup.wait()
        except FencedError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            # A deliberate stop (stepping down or shutting down), not a failure.
            if self.error is None:
                self.error = FencedError("the committer was stopped")
            self._fail(self.error)
            raise
        except Exception as exc:
            log.exception("committer failed unexpectedly")
            self._fail(FencedError(f"the committer failed: {exc!r}"))

    def _take_batch(self) -> _Batch | None:
        """The oldest requests that fit one transaction; a request behind a busy key waits, and so
        does every later request sharing a key with it, so each key's writes keep their order."""
        limits = self._limits
        batch = _Batch(_etcd.txn_request(self._fence))
        add = batch.request.success.add
        size = 0
        waiting_keys: set[bytes] = set()
        skipped: list[_Request] = []
        pending = self._pending
        while pending and len(skipped) < limits.max_scan:
            request = pending[0]
            keys = request.keys
            if not (keys.isdisjoint(self._busy) and keys.isdisjoint(waiting_keys) and keys.isdisjoint(batch.keys)):
                # Two transactions in flight could land in either order, and etcd refuses a key twice in one.
                skipped.append(pending.popleft())
                waiting_keys |= keys
                continue
            if batch.ops and (
                batch.ops + len(request.writes) > limits.max_ops or size + request.size > limits.max_bytes
            ):
                break
            pending.popleft()
            for key in keys:
                if self._pending_by_key.get(key) is request:
                    del self._pending_by_key[key]
            size += request.size
            batch.keys |= keys
            for write in request.writes:
                if write.value is not None:
                    put = add().request_put
                    put.key = write.key
                    put.value = write.value
                else:
                    add().request_delete_range.key = write.key
            batch.ops += len(request.writes)
            batch.requests.append(request)
        pending.extendleft(reversed(skipped))
        if not batch.ops:
            return None
        self._pending_ops -= batch.ops
        self._busy |= batch.keys
        return batch

    async def _send(self, batch: _Batch) -> None:
        if self._expired is not None and self._expired():
            batch.error = FencedError("leadership lost: the leader lease ran out before this write was sent")
            return
        began = time.perf_counter()
        try:
            reply = await self._etcd.send_txn(batch.request, timeout=self._limits.timeout)
        except EtcdError as exc:
            batch.error = FencedError(f"commit outcome unknown: {exc}")
            return
        except Exception as exc:
            log.exception("transaction failed unexpectedly")
            batch.error = FencedError(f"commit outcome unknown: {exc!r}")
            return
        if metrics.instruments is not None:
            metrics.instruments.commit_duration.record(time.perf_counter() - began)
            metrics.instruments.commit_ops.record(batch.ops)
        if not reply.succeeded:
            batch.error = FencedError("leadership lost: the fence no longer matches")
            return
        batch.revision = reply.header.revision

    def _finalize(self) -> None:
        """Settle finished transactions in the order they were sent, so callers see writes land in order."""
        while self._in_flight and self._in_flight[0].task is not None and self._in_flight[0].task.done():
            batch = self._in_flight.popleft()
            self._busy -= batch.keys
            if batch.error is not None and self.error is None:
                self.error = batch.error
            if self.error is not None:
                self._settle(batch.requests, self.error)
                continue
            self.transactions += 1
            self.operations += batch.ops
            for request in batch.requests:
                if not request.future.done():
                    request.future.set_result(batch.revision)

    @staticmethod
    def _settle(requests: list[_Request], error: FencedError) -> None:
        for request in requests:
            if not request.future.done():
                request.future.set_exception(error)

    def _fail(self, error: FencedError) -> None:
        if self.error is None:
            self.error = error
            log.error("committer stopped: %s", error)
        else:
            log.info("committer stopped: %s", self.error)
        for batch in self._in_flight:
            if batch.task is not None:
                batch.task.cancel()
            self._settle(batch.requests, self.error)
        self._in_flight.clear()
        self._settle(list(self._pending), self.error)
        self._pending.clear()
        self._pending_by_key.clear()
        self._pending_ops = 0
        self.failed.set()

    async def close(self) -> None:
        """Stop committing; writes not yet committed fail with FencedError. Safe to call twice."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def after_commit(future: asyncio.Future[int], action: Callable[[], None]) -> None:
    """Run action once the write behind future is committed; never if it failed or was cancelled."""

    def run(f: asyncio.Future[int]) -> None:
        if not f.cancelled() and f.exception() is None:
            action()

    future.add_done_callback(run)
