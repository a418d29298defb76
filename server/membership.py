"""Replica membership: each coordinator registers itself under members/<replica id> on its own lease.

The lease belongs to the replica, the election to the key: the replica's lease carries its
member entry and every leader key it wins (today one namespace's; later one per partition it
leads), so one keep-alive stream serves them all and losing the lease ends all of them together.
When the lease is lost (etcd unreachable for longer than its TTL) the replica registers again
on a new lease; a clean stop revokes it so the entry (and any leader key) goes at once.
`registered` doubles as "this replica reaches etcd", which the health service reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from herder.server import _etcd, keys, leases
from herder.server._etcd import Etcd, EtcdError

log = logging.getLogger(__name__)

# Pause before registering again after a failure (etcd unreachable).
RETRY_SECONDS = 0.5


@dataclass(frozen=True, slots=True)
class Hold:
    """The replica's lease while it is held: its id, until when it can be trusted, and `lost`, set
    the moment it no longer can (whatever was put on it must then be considered gone)."""

    lease: int
    trust: leases.Trust
    lost: asyncio.Event


@dataclass(frozen=True, slots=True)
class Member:
    """One registered replica: its id, gRPC address, start time (Unix seconds) and package version."""

    id: str
    address: str
    started: float
    version: str

    def encode(self) -> bytes:
        return json.dumps(
            {"id": self.id, "address": self.address, "started": self.started, "version": self.version}
        ).encode()

    @staticmethod
    def decode(value: bytes) -> Member:
        data = json.loads(value)
        return Member(str(data["id"]), str(data["address"]), float(data["started"]), str(data.get("version", "")))


class Membership:
    """Keeps this replica registered until `close()`. `changed(registered)` is called on each change."""

    def __init__(
        self,
        etcd: Etcd,
        prefix: bytes,
        member: Member,
        ttl: int,
        changed: Callable[[bool], Awaitable[None]],
        reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._etcd = etcd
        self._key = keys.member(prefix, member.id)
        self._member = member
        self._ttl = ttl
        self._changed = changed
        # Called after etcd failed, before registering again: the replica's lease is its link to etcd,
        # so membership is where a broken connection is noticed first (and, while following, only).
        self._reconnect = reconnect
        self._lease = 0
        self._hold: Hold | None = None
        # Set (and replaced by a fresh one) whenever the hold changes: `hold()` waits on it.
        self._moved = asyncio.Event()
        # The keep-alive of the current lease (None between leases).
        self.keeper: _etcd.LeaseKeeper | None = None
        self.registered = False
        self._task = asyncio.create_task(self._run(), name="herder-membership")

    async def hold(self, stop: asyncio.Event) -> Hold | None:
        """The replica's current lease, waiting while it is not registered; None once `stop` is set."""
        while self._hold is None or self._hold.lost.is_set():
            if stop.is_set():
                return None
            moved = asyncio.create_task(self._moved.wait())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([moved, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
                stopped.cancel()
        return None if stop.is_set() else self._hold

    def _set_hold(self, hold: Hold | None) -> None:
        self._hold = hold
        self._moved.set()
        self._moved = asyncio.Event()

    async def _keep(self, hold: Hold) -> None:
        """Keep `hold` alive until it can no longer be trusted, or a user of it found it gone (`lost`)."""
        self.keeper = self._etcd.lease_keeper(hold.lease)
        alive = asyncio.create_task(leases.keep_alive(self.keeper, self._ttl, "replica", hold.trust))
        gone = asyncio.create_task(hold.lost.wait())
        try:
            await asyncio.wait([alive, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (alive, gone):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            with contextlib.suppress(asyncio.CancelledError):
                await alive  # raises what ended the keep-alive, if anything did

    async def _run(self) -> None:
        while True:
            hold: Hold | None = None
            failed = False
            try:
                granted_at = time.monotonic()
                self._lease = await self._etcd.grant(self._ttl)
                hold = Hold(self._lease, leases.Trust(granted_at, self._ttl), asyncio.Event())
                await self._etcd.txn([], [_etcd.put(self._key, self._member.encode(), self._lease)])
                self._set_hold(hold)
                await self._set(True)
                await self._keep(hold)
            except EtcdError as exc:
                log.warning("membership: %s; registering again", exc)
                failed = True
            except Exception:
                log.exception("membership failed unexpectedly; registering again")
            if hold is not None:
                hold.lost.set()
            self._set_hold(None)
            self.keeper = None
            await self._set(False)
            if self._lease:
                # No longer trusted: revoking it hands its leader keys to other replicas now rather
                # than when etcd expires it (if etcd can be reached at all).
                lease, self._lease = self._lease, 0
                await self._etcd.revoke(lease)
            if failed and self._reconnect is not None:
                await self._reconnect()
            else:
                await asyncio.sleep(RETRY_SECONDS)

    async def _set(self, registered: bool) -> None:
        if registered != self.registered:
            self.registered = registered
            await self._changed(registered)

    async def close(self) -> None:
        """Stop refreshing and revoke the lease, removing the entry at once. Safe to call twice."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._hold is not None:
            self._hold.lost.set()
            self._set_hold(None)
        if self._lease:
            await self._etcd.revoke(self._lease)
            self._lease = 0
        self.registered = False


async def members(etcd: Etcd, prefix: bytes) -> list[Member]:
    """Every registered replica, in id order; entries that cannot be read are skipped."""
    found = []
    async for kv in etcd.scan_prefix(keys.members_prefix(prefix)):
        try:
            found.append(Member.decode(kv.value))
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable member entry %r", kv.key)
    return found
