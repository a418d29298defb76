"""One committer per leader: groups concurrent writes into fenced etcd transactions.

Writes are applied in the order they were submitted. Each transaction holds at
most `max_ops` operations and about `max_bytes` of payload (etcd allows 128
operations and 1.5 MiB per request by default) and compares the leader key's
create revision, so a deposed leader's write fails instead of landing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from herder.server import _etcd
from herder.server._etcd import Etcd, EtcdError

log = logging.getLogger(__name__)


class FencedError(Exception):
    """The write was refused: this replica no longer leads (or etcd failed mid-commit)."""


@dataclass(frozen=True, slots=True)
class Write:
    """Put value at key, or delete key when value is None."""

    key: bytes
    value: bytes | None


@dataclass(frozen=True, slots=True)
class CommitLimits:
    max_ops: int = 128
    max_bytes: int = 1024 * 1024


class Committer:
    """Commits writes in submission order, many per transaction.

    `commit()` returns the etcd revision the last of its writes landed at, and
    raises FencedError when the fence failed or etcd could not confirm the
    transaction; after that every later commit fails too and `failed` is set.
    """

    def __init__(self, etcd: Etcd, fence_key: bytes, fence_revision: int, limits: CommitLimits | None = None) -> None:
        self._etcd = etcd
        self._fence = _etcd.create_revision_is(fence_key, fence_revision)
        self._limits = limits or CommitLimits()
        self._pending: deque[tuple[Write, asyncio.Future[int] | None]] = deque()
        self._wakeup = asyncio.Event()
        self.failed = asyncio.Event()
        self.error: FencedError | None = None
        self.transactions = 0
        self.operations = 0
        self._task = asyncio.create_task(self._run(), name="herder-committer")

    def submit(self, writes: list[Write]) -> asyncio.Future[int]:
        """Queue writes (in order, atomically with respect to other submits); the future resolves once all landed."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        if not writes:
            future.set_result(0)
            return future
        for write in writes[:-1]:
            self._pending.append((write, None))
        self._pending.append((writes[-1], future))
        self._wakeup.set()
        return future

    async def commit(self, writes: list[Write]) -> int:
        return await self.submit(writes)

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._commit_batch()
        except FencedError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(FencedError("the committer was stopped"))
            raise

    async def _commit_batch(self) -> None:
        ops: list[Any] = []
        futures: list[asyncio.Future[int]] = []
        keys: set[bytes] = set()
        size = 0
        while self._pending and len(ops) < self._limits.max_ops:
            write, future = self._pending[0]
            length = len(write.key) + len(write.value or b"")
            # etcd refuses a key twice in one transaction; the next transaction takes it.
            if write.key in keys or (ops and size + length > self._limits.max_bytes):
                break
            self._pending.popleft()
            keys.add(write.key)
            size += length
            ops.append(_etcd.put(write.key, write.value) if write.value is not None else _etcd.delete(write.key))
            if future is not None:
                futures.append(future)
        try:
            reply = await self._etcd.txn([self._fence], ops)
        except EtcdError as exc:
            raise self._settle(futures, FencedError(f"commit outcome unknown: {exc}")) from exc
        if not reply.succeeded:
            raise self._settle(futures, FencedError("leadership lost: the fence no longer matches"))
        self.transactions += 1
        self.operations += len(ops)
        for future in futures:
            if not future.done():
                future.set_result(reply.header.revision)

    @staticmethod
    def _settle(futures: list[asyncio.Future[int]], error: FencedError) -> FencedError:
        for future in futures:
            if not future.done():
                future.set_exception(error)
        return error

    def _fail(self, error: FencedError) -> None:
        if self.error is None:
            log.error("committer stopped: %s", error)
            self.error = error
        while self._pending:
            _, future = self._pending.popleft()
            if future is not None and not future.done():
                future.set_exception(error)
        self.failed.set()

    async def close(self) -> None:
        """Stop committing; writes not yet committed fail with FencedError. Safe to call twice."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
