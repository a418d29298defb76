"""Distributed locks on etcd, after etcd's concurrency mutex (client/v3/concurrency/mutex.go).

The one rule: the holder of lock N is the key under locks/N/ with the lowest create
revision. Every Acquire puts its own key on its own lease, so waiters queue in
arrival order (create revision), a holder that dies leaves when its lease runs out,
and the holder's create revision is its fencing token: each later grant's key was
created later, so its token is larger.

A waiter watches only the key just ahead of it (no thundering herd) and looks again
when that key goes, since it may have been a waiter that gave up. While it waits the
coordinator keeps its lease alive; once granted, the caller refreshes it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from herder.clients.errors import LockHeldError, NotFoundError, UnavailableError
from herder.server import _etcd, keys
from herder.server._etcd import Etcd, EtcdError


@dataclass(frozen=True, slots=True)
class Grant:
    """A held lock: its lease, its fencing token and the seconds left on the lease."""

    lease: int
    token: int
    ttl: int


async def acquire(etcd: Etcd, ns: bytes, name: str, owner: str, ttl: int, wait: float) -> Grant:
    """Queue for lock `name` on a new lease of `ttl` seconds and wait up to `wait` seconds for it.

    Raises LockHeldError when the wait runs out first (at once when wait is 0), EtcdError when
    etcd fails. On any failure, and on cancellation, the lease is revoked, which deletes the key.
    """
    lease = await etcd.grant(ttl)
    try:
        return await _queue(etcd, ns, name, owner, lease, ttl, wait)
    except BaseException:
        # Shielded: a cancelled Acquire must still take its key out of the queue.
        await asyncio.shield(etcd.revoke(lease))
        raise


async def _queue(etcd: Etcd, ns: bytes, name: str, owner: str, lease: int, ttl: int, wait: float) -> Grant:
    key = keys.lock(ns, name, lease)
    reply = await etcd.txn([_etcd.create_revision_is(key, 0)], [_etcd.put(key, owner.encode(), lease)])
    if not reply.succeeded:
        raise EtcdError(f"lock key {key!r} exists already")  # lease ids are unique: not expected
    token = int(reply.header.revision)
    keeper = etcd.lease_keeper(lease)
    try:
        if wait <= 0:
            ahead, _ = await etcd.last_created_before(keys.lock_prefix(ns, name), token)
            if ahead is not None:
                raise LockHeldError(f"lock {name!r} is held")
        else:
            await _wait_turn(etcd, keys.lock_prefix(ns, name), token, keeper, ttl, wait, name)
        # A fresh refresh gives the caller the whole TTL, counted from now.
        left = await keeper.refresh(etcd.timeout)
        if left <= 0:
            raise UnavailableError(f"the lease of lock {name!r} expired before it was granted")
        return Grant(lease, token, left)
    finally:
        keeper.close()


async def _wait_turn(
    etcd: Etcd, prefix: bytes, token: int, keeper: _etcd.LeaseKeeper, ttl: int, wait: float, name: str
) -> None:
    turn = asyncio.create_task(_turn(etcd, prefix, token), name="herder-lock-turn")
    alive = asyncio.create_task(_keep_alive(keeper, ttl), name="herder-lock-waiter-lease")
    try:
        done, _ = await asyncio.wait([turn, alive], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (turn, alive):
            task.cancel()
        for task in (turn, alive):
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await task
    if turn in done:
        turn.result()  # raises EtcdError when the watch broke
        return
    if alive in done:
        raise UnavailableError(f"the lease of lock {name!r} expired while waiting")
    raise LockHeldError(f"lock {name!r} is still held after waiting {wait:g}s")


async def _turn(etcd: Etcd, prefix: bytes, token: int) -> None:
    """Returns when no key created before `token` is left under prefix."""
    while True:
        ahead, revision = await etcd.last_created_before(prefix, token)
        if ahead is None:
            return
        # From the revision it was read at, so a delete right after the read is not missed.
        async with contextlib.aclosing(etcd.watch(ahead.key, start_revision=revision + 1)) as events:
            async for event in events:
                if event.deleted:
                    break


async def _keep_alive(keeper: _etcd.LeaseKeeper, ttl: int) -> None:
    """Refreshes a waiter's lease every ttl/3; returns when the lease is gone."""
    interval = max(ttl / 3, 0.3)
    while True:
        await asyncio.sleep(interval)
        try:
            left = await keeper.refresh(interval)
        except EtcdError:
            continue  # the next try opens a new stream; the lease outlives a few misses
        if left <= 0:
            return


async def refresh(etcd: Etcd, ns: bytes, name: str, lease: int) -> int:
    """One keep-alive of a held lock's lease: the seconds left. NotFoundError when the lock is not held with it."""
    kv, _ = await etcd.get(keys.lock(ns, name, lease))
    if kv is None or kv.lease != lease:
        raise _not_held(name, lease)
    keeper = etcd.lease_keeper(lease)
    try:
        left = await keeper.refresh(etcd.timeout)
    finally:
        keeper.close()
    if left <= 0:
        raise _not_held(name, lease)
    return left


async def release(etcd: Etcd, ns: bytes, name: str, lease: int) -> None:
    """Delete the lock's key and revoke its lease. NotFoundError when the lock is not held with it."""
    key = keys.lock(ns, name, lease)
    kv, _ = await etcd.get(key)
    if kv is None or kv.lease != lease:
        raise _not_held(name, lease)
    # Only a lease that holds a key of this lock is revoked, never another (such as the leader's).
    reply = await etcd.txn([_etcd.create_revision_is(key, kv.create_revision)], [_etcd.delete(key)])
    if not reply.succeeded:
        raise _not_held(name, lease)
    await etcd.revoke(lease)


def _not_held(name: str, lease: int) -> NotFoundError:
    return NotFoundError(f"lock {name!r} is not held with lease {lease:016x}: released, expired or never granted")
