"""Holding a distributed lock from the SDK: acquire, refresh in the background, release on exit.

    async with client.lock("nightly-report", ttl=30, wait=10) as lock:
        await store.write(report, fencing_token=lock.token)

A lease-based lock cannot by itself stop a paused holder from acting after its lease
ended; send `lock.token` with every write it guards and let the store reject tokens
lower than one it has seen (README, "Locks").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import grpc
from google.protobuf import duration_pb2

from herder.clients import errors
from herder.clients.endpoints import unreached
from herder.clients.proto.v1 import lock_pb2, lock_pb2_grpc

if TYPE_CHECKING:
    from herder.clients.proto.v1.lock_pb2_grpc import LockServiceAsyncStub

# How soon a refresh that failed (not NOT_FOUND: the coordinator or etcd did not answer) is tried again.
_RETRY_AFTER = 0.5


def default_owner() -> str:
    """Who holds a lock unless told otherwise: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Lock:
    """One lock, held between `async with` entry and exit (or `SyncClient.lock`'s `with`).

    Entry acquires it, waiting up to `wait` seconds: LockHeldError when another holder keeps it
    that long, InvalidArgumentError for a bad name or TTL. While held it is refreshed about every
    ttl/3. If it is lost (a refresh says it is not held any more, or none succeeds before the TTL
    runs out), the body is cancelled and the `async with` raises LockLostError. Exit releases it,
    shielded from cancellation; a release that fails leaves the lock to expire with its TTL.
    """

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        name: str,
        *,
        ttl: float | timedelta,
        wait: float | timedelta,
        owner: str,
        timeout: float,
        next_replica: Callable[[errors.HerderError], object] | None = None,
        replicas: int = 1,
    ) -> None:
        self.name = name
        self.owner = owner
        self._channel = channel
        # Any replica serves locks: `next_replica` moves `channel` on after a failure, over `replicas` tries.
        self._next_replica = next_replica
        self._replicas = max(replicas, 1)
        self._ttl = _seconds(ttl)
        self._wait = _seconds(wait)
        self._timeout = timeout
        self.token = 0
        self.lease_id = ""
        # Set when the lock is lost; `lost_reason` says why.
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self._keeper: asyncio.Task[None] | None = None
        self._body: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._cancelled_body = False

    def __repr__(self) -> str:
        return f"<Lock {self.name!r} token={self.token} lease={self.lease_id or '-'}>"

    @property
    def ttl(self) -> float:
        """The lease's TTL in seconds as granted (etcd counts whole seconds, rounding up)."""
        return self._ttl

    async def __aenter__(self) -> Self:
        await self.start(cancel_body=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop(exc_type, exc)

    async def start(self, *, cancel_body: bool) -> None:
        """Acquire and start refreshing; with cancel_body, losing the lock cancels the calling task."""
        request = lock_pb2.AcquireRequest(
            name=self.name, owner=self.owner, ttl=_duration(self._ttl), wait_timeout=_duration(self._wait)
        )
        for tries_left in range(self._replicas - 1, -1, -1):
            sent = time.monotonic()
            try:
                reply = await self._stub().Acquire(request, timeout=self._wait + self._timeout)
                break
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                # Only an Acquire that never left is retried: one whose reply was lost may hold a lease.
                if not (tries_left and self._next_replica is not None and unreached(error)):
                    raise error from exc
                self._next_replica(error)
        self.token = reply.fencing_token
        self.lease_id = reply.lease_id
        self._ttl = float(reply.ttl.seconds) or self._ttl
        if cancel_body:
            self._body = asyncio.current_task()
            self._cancelling = self._body.cancelling() if self._body else 0
        self._keeper = asyncio.create_task(self._keep(sent + self._ttl), name=f"herder-lock-{self.name}")

    async def stop(self, exc_type: type[BaseException] | None = None, exc: BaseException | None = None) -> None:
        """Stop refreshing and release; raises LockLostError when the lock was lost while held."""
        raise_lost = self.lost.is_set() and exc_type in (None, asyncio.CancelledError)
        body = self._body
        if self._cancelled_body and body is not None:
            if exc_type is None:
                # The body finished before the cancel requested for it landed: let it land here.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0)
            if body.uncancel() > self._cancelling:
                raise_lost = False  # the task was cancelled by someone else too: that goes on
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        if self.lease_id and not self.lost.is_set():
            await asyncio.shield(self._release())
        if raise_lost:
            raise errors.LockLostError(f"lock {self.name!r} was lost: {self.lost_reason}") from exc

    async def _release(self) -> None:
        request = lock_pb2.ReleaseRequest(name=self.name, lease_id=self.lease_id)
        with contextlib.suppress(grpc.RpcError):
            await self._stub().Release(request, timeout=self._timeout)

    async def _keep(self, deadline: float) -> None:
        """Refresh every ttl/3 until the lock is lost; `deadline` is when the lease would end unrefreshed."""
        request = lock_pb2.RefreshRequest(name=self.name, lease_id=self.lease_id)
        pause = self._ttl / 3
        while True:
            await asyncio.sleep(max(min(pause, deadline - time.monotonic()), 0))
            sent = time.monotonic()
            if sent >= deadline:
                self._lose(f"no refresh succeeded within its {self._ttl:g}s TTL")
                return
            try:
                reply = await self._stub().Refresh(request, timeout=max(min(self._timeout, deadline - sent), 0.01))
            except grpc.RpcError as exc:
                error = errors.from_rpc_error(exc)
                if isinstance(error, errors.NotFoundError):
                    self._lose(error.message)
                    return
                if isinstance(error, errors.UnavailableError) and self._next_replica is not None:
                    self._next_replica(error)  # refreshing is idempotent: the next try may go to any replica
                pause = min(self._ttl / 3, _RETRY_AFTER)
                continue
            deadline = sent + reply.ttl.seconds
            pause = self._ttl / 3

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        if self._body is not None and not self._body.done():
            self._cancelled_body = True
            self._body.cancel()

    def _stub(self) -> LockServiceAsyncStub:
        return lock_pb2_grpc.LockServiceStub(self._channel())


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


__all__ = ["Lock", "default_owner"]
