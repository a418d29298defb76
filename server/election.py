"""Leader election on the replica's etcd lease, with the leader key's create revision as the fence.

A replica campaigns by creating the leader key on its own lease (membership.Hold: the
lease belongs to the replica, the election to the key, so one replica could hold several
leader keys on one lease). Whoever created the key leads until it resigns (deleting the key)
or the lease ends; the key's create revision is the fencing token every leader write
compares, so a deposed leader cannot write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from herder.server import _etcd
from herder.server._etcd import Etcd, EtcdError
from herder.server.membership import Hold

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads: replica id, its gRPC address and the fence (the leader key's create revision)."""

    replica_id: str
    address: str
    revision: int


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """ttl: seconds the replica's lease (its member entry, its leader key) outlives its last keep-alive;
    keep-alives are sent every ttl/3."""

    ttl: int = 5


class Leadership:
    """Held leadership. `lost` is set the moment the replica's lease can no longer be trusted, or on resign."""

    def __init__(self, etcd: Etcd, key: bytes, hold: Hold, info: LeaderInfo) -> None:
        self.etcd = etcd
        self.key = key
        self.lease = hold.lease
        self.info = info
        self.lost = asyncio.Event()
        self._hold = hold
        self._follower = asyncio.create_task(self._follow_lease(), name="herder-leader-lease")

    @property
    def fence(self) -> int:
        return self.info.revision

    def expired(self) -> bool:
        """Whether the lease may have ended (or ends within a refresh interval): checked where the
        leader acts, so a leader whose loop was frozen past its lease stops before anything else runs."""
        return self.lost.is_set() or self._hold.lost.is_set() or self._hold.trust.expired()

    async def _follow_lease(self) -> None:
        await self._hold.lost.wait()
        self.lost.set()

    async def resign(self) -> None:
        """Give up leadership: delete the leader key if it is still ours (its create revision is our
        fence), so another replica is elected at once. Safe to call twice; etcd failing is logged."""
        self.lost.set()
        self._follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._follower
        try:
            await self.etcd.txn([_etcd.create_revision_is(self.key, self.fence)], [_etcd.delete(self.key)])
        except EtcdError as exc:
            # The key goes with the replica's lease in the end, or was already taken over.
            log.warning("could not delete the leader key on resigning: %s", exc)


async def campaign(
    etcd: Etcd,
    key: bytes,
    replica_id: str,
    address: str,
    hold: Hold,
    stop: asyncio.Event,
    observe: Callable[[LeaderInfo | None], None],
) -> Leadership | None:
    """Wait until this replica leads, with the key on its lease `hold`; returns None when stop is set
    or the lease is lost first (the caller campaigns again on the replica's next lease).

    Meanwhile `observe` is told every leader seen (None while there is none), from the
    leader key's puts and deletes, as etcd's Election.Observe does.
    Raises EtcdError when etcd fails; the caller reconnects (perhaps to another member) and campaigns again.
    """
    value = json.dumps({"id": replica_id, "address": address}).encode()
    while not stop.is_set() and not hold.lost.is_set():
        reply = await etcd.txn(
            [_etcd.create_revision_is(key, 0)],
            [_etcd.put(key, value, hold.lease)],
            [_etcd.get(key)],
        )
        if reply.succeeded:
            info = LeaderInfo(replica_id, address, reply.header.revision)
            log.info("leading with fence %d", info.revision)
            return Leadership(etcd, key, hold, info)
        holder = _etcd.key_value(reply.responses[0].response_range.kvs[0])
        observe(_leader_info(holder))
        await _observe_until_deleted(etcd, key, holder.mod_revision + 1, (stop, hold.lost), observe)
    return None


async def _observe_until_deleted(
    etcd: Etcd,
    key: bytes,
    from_revision: int,
    stops: tuple[asyncio.Event, ...],
    observe: Callable[[LeaderInfo | None], None],
) -> None:
    async def watch() -> None:
        async for event in etcd.watch(key, start_revision=from_revision):
            if event.deleted:
                observe(None)
                return
            observe(_leader_info(event.kv))

    waiter = asyncio.create_task(watch())
    stoppers = [asyncio.create_task(stop.wait()) for stop in stops]
    try:
        await asyncio.wait([waiter, *stoppers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (waiter, *stoppers):
            t.cancel()
        for t in (waiter, *stoppers):
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
