"""Replica membership: each coordinator registers itself under members/<replica id> on its own lease.

The lease belongs to the replica, not to any election: one process may later lead several
partitions, each on its own leader key, while it is registered once. The key lives while the
lease does; when the lease is lost (etcd unreachable for longer than its TTL) the replica
registers again on a new lease, and a clean stop revokes it so the entry goes at once.
`registered` doubles as "this replica reaches etcd", which the health service reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from herder.server import _etcd, keys, leases
from herder.server._etcd import Etcd, EtcdError

log = logging.getLogger(__name__)

# Pause before registering again after a failure (etcd unreachable).
RETRY_SECONDS = 0.5


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
        self, etcd: Etcd, prefix: bytes, member: Member, ttl: int, changed: Callable[[bool], Awaitable[None]]
    ) -> None:
        self._etcd = etcd
        self._key = keys.member(prefix, member.id)
        self._member = member
        self._ttl = ttl
        self._changed = changed
        self._lease = 0
        self.registered = False
        self._task = asyncio.create_task(self._run(), name="herder-membership")

    async def _run(self) -> None:
        while True:
            try:
                self._lease = await self._etcd.grant(self._ttl)
                await self._etcd.txn([], [_etcd.put(self._key, self._member.encode(), self._lease)])
                await self._set(True)
                await leases.keep_alive(self._etcd.lease_keeper(self._lease), self._ttl, "membership")
            except EtcdError as exc:
                log.warning("membership: %s; registering again", exc)
            except Exception:
                log.exception("membership failed unexpectedly; registering again")
            await self._set(False)
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
