"""Leader election on an etcd lease, with the leader key's create revision as the fence.

A replica campaigns by creating the leader key on its lease. Whoever created
it leads until the lease ends; the key's create revision is the fencing token
every leader write compares, so a deposed leader cannot write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from herder.server import _etcd, leases
from herder.server._etcd import Etcd, EtcdError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads: replica id, its gRPC address and the fence (the leader key's create revision)."""

    replica_id: str
    address: str
    revision: int


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """ttl: seconds a dead leader keeps the key; keep-alives are sent every ttl/3."""

    ttl: int = 5


class Leadership:
    """Held leadership. `lost` is set the moment the lease can no longer be trusted."""

    def __init__(self, etcd: Etcd, key: bytes, lease: int, info: LeaderInfo, settings: LeaseSettings) -> None:
        self.etcd = etcd
        self.key = key
        self.lease = lease
        self.info = info
        self.lost = asyncio.Event()
        self._settings = settings
        self._lease_keeper = etcd.lease_keeper(lease)
        self._keeper = asyncio.create_task(self._keep_alive(), name="herder-leader-lease")

    @property
    def fence(self) -> int:
        return self.info.revision

    async def _keep_alive(self) -> None:
        try:
            await leases.keep_alive(self._lease_keeper, self._settings.ttl, "leader")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("leader lease keep-alive failed unexpectedly")
        finally:
            self.lost.set()

    async def resign(self) -> bool:
        """Give up leadership: stop refreshing and revoke the lease (deleting the key). Safe to call twice.

        False when etcd did not confirm the revoke (the key then lives until the lease expires).
        """
        self.lost.set()
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper
        return await self.etcd.revoke(self.lease)


async def campaign(
    etcd: Etcd,
    key: bytes,
    replica_id: str,
    address: str,
    settings: LeaseSettings,
    stop: asyncio.Event,
    observe: Callable[[LeaderInfo | None], None],
) -> Leadership | None:
    """Wait until this replica leads; returns None when stop is set first.

    Meanwhile `observe` is told every leader seen (None while there is none), from the
    leader key's puts and deletes, as etcd's Election.Observe does.
    Raises EtcdError when etcd fails; the caller reconnects (perhaps to another member) and campaigns again.
    """
    value = json.dumps({"id": replica_id, "address": address}).encode()
    while not stop.is_set():
        lease = await etcd.grant(settings.ttl)
        reply = await etcd.txn(
            [_etcd.create_revision_is(key, 0)],
            [_etcd.put(key, value, lease)],
            [_etcd.get(key)],
        )
        if reply.succeeded:
            info = LeaderInfo(replica_id, address, reply.header.revision)
            log.info("leading with fence %d", info.revision)
            return Leadership(etcd, key, lease, info, settings)
        await etcd.revoke(lease)
        holder = _etcd.key_value(reply.responses[0].response_range.kvs[0])
        observe(_leader_info(holder))
        await _observe_until_deleted(etcd, key, holder.mod_revision + 1, stop, observe)
    return None


async def _observe_until_deleted(
    etcd: Etcd, key: bytes, from_revision: int, stop: asyncio.Event, observe: Callable[[LeaderInfo | None], None]
) -> None:
    async def watch() -> None:
        async for event in etcd.watch(key, start_revision=from_revision):
            if event.deleted:
                observe(None)
                return
            observe(_leader_info(event.kv))

    waiter = asyncio.create_task(watch())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (waiter, stopper):
            t.cancel()
        for t in (waiter, stopper):
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await t
    if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
        raise EtcdError(str(waiter.exception()))


def _leader_info(kv: _etcd.KeyValue) -> LeaderInfo:
    data = json.loads(kv.value)
    return LeaderInfo(str(data.get("id", "")), str(data.get("address", "")), kv.create_revision)


async def current_leader(etcd: Etcd, key: bytes) -> LeaderInfo | None:
    kv, _ = await etcd.get(key)
    return None if kv is None else _leader_info(kv)
