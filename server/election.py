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


# Seconds one try at deleting the leader key on resigning may take (a revoke's bound, too).
RESIGN_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who leads: replica id, its gRPC address and the fence (the leader key's create revision)."""

    replica_id: str
    address: str
    revision: int


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """ttl: seconds the replica's lease (its member entry, its leader key) outlives its last keep-alive;
    keep-alives are sent every ttl/3.

    A follower also probes the leader's address every `probe_interval` seconds; when nothing
    listens there (connection refused, not a timeout) `probe_failures` times in a row, the leader
    process is gone, and the follower deletes that leader's key (compared on its create revision)
    rather than wait out the lease. Should the leader live on after all, it sees its key go (and
    the fence refuses its next write) and steps down: leadership is decided by etcd, never by the
    probe. 0 turns it off.
    """

    ttl: int = 5
    probe_interval: float = 0.5
    probe_failures: int = 2


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
        self._watcher = asyncio.create_task(self._watch_key(), name="herder-leader-key")

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

    async def _watch_key(self) -> None:
        """Leadership ends when the key goes while the lease lives: a follower found our address refusing
        connections (or an operator deleted it). A broken watch decides nothing: the lease does."""
        with contextlib.suppress(EtcdError):
            async for event in self.etcd.watch(self.key, start_revision=self.info.revision + 1):
                if event.deleted or event.kv.create_revision != self.info.revision:
                    log.error("the leader key is gone (deleted or its lease ended; fence %d)", self.info.revision)
                    self.lost.set()
                    return

    async def resign(self) -> bool:
        """Give up leadership: delete the leader key if it is still ours (its create revision is our
        fence), so another replica is elected at once. Safe to call twice.

        False when etcd did not confirm it (the key then lives until the replica's lease ends, or
        until the caller retries through another etcd member).
        """
        self.lost.set()
        for task in (self._follower, self._watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            # Short: while etcd elects a new raft leader the caller retries through another member.
            await self.etcd.txn(
                [_etcd.create_revision_is(self.key, self.fence)], [_etcd.delete(self.key)], timeout=RESIGN_TIMEOUT
            )
        except EtcdError as exc:
            log.warning("could not delete the leader key on resigning: %s", exc)
            return False
        return True


async def campaign(
    etcd: Etcd,
    key: bytes,
    replica_id: str,
    address: str,
    hold: Hold,
    settings: LeaseSettings,
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
        try:
            reply = await etcd.txn(
                [_etcd.create_revision_is(key, 0)],
                [_etcd.put(key, value, hold.lease)],
                [_etcd.get(key)],
            )
        except EtcdError as exc:
            if not _etcd.lease_not_found(exc):
                raise
            # The lease ended (expired or revoked) before its keep-alive noticed: the replica
            # registers again on a new one, and campaigns with that.
            hold.lost.set()
            return None
        if reply.succeeded:
            info = LeaderInfo(replica_id, address, reply.header.revision)
            log.info("leading with fence %d", info.revision)
            return Leadership(etcd, key, hold, info)
        holder = _etcd.key_value(reply.responses[0].response_range.kvs[0])
        info = _leader_info(holder)
        if info.replica_id == replica_id:
            # A term of ours that could not be resigned (etcd failed then) and lives on, since the key
            # is on the replica's lease: end it, compared on its create revision, and campaign afresh.
            log.warning("ending an earlier term of this replica (fence %d) left in etcd", info.revision)
            await etcd.txn([_etcd.create_revision_is(key, info.revision)], [_etcd.delete(key)])
            continue
        observe(info)
        prober = None if info.address == address or not settings.probe_interval else info
        await _observe_until_deleted(etcd, key, holder.mod_revision + 1, (stop, hold.lost), observe, prober, settings)
    return None


async def _observe_until_deleted(
    etcd: Etcd,
    key: bytes,
    from_revision: int,
    stops: tuple[asyncio.Event, ...],
    observe: Callable[[LeaderInfo | None], None],
    prober: LeaderInfo | None,
    settings: LeaseSettings,
) -> None:
    async def watch() -> None:
        async for event in etcd.watch(key, start_revision=from_revision):
            if event.deleted:
                observe(None)
                return
            observe(_leader_info(event.kv))

    waiter = asyncio.create_task(watch())
    stoppers = [asyncio.create_task(stop.wait()) for stop in stops]
    tasks = [waiter, *stoppers]
    if prober is not None:
        # Its end is not awaited: the watch sees the delete it makes.
        tasks.append(asyncio.create_task(_depose_if_gone(etcd, key, prober, settings)))
    try:
        await asyncio.wait([waiter, *stoppers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, EtcdError):
                await t
    if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
        raise EtcdError(str(waiter.exception()))


async def _depose_if_gone(etcd: Etcd, key: bytes, holder: LeaderInfo, settings: LeaseSettings) -> None:
    """Delete `holder`'s leader key once its address refused `probe_failures` connections in a row."""
    refused = 0
    while refused < settings.probe_failures:
        await asyncio.sleep(settings.probe_interval)
        refused = refused + 1 if await _refuses(holder.address, settings.probe_interval) else 0
    # Logged first: the watch sees the delete at once and cancels this task, perhaps before it resumes.
    log.warning(
        "leader %s at %s refused %d connections in a row: its process is gone; ending its term (fence %d)",
        holder.replica_id,
        holder.address,
        refused,
        holder.revision,
    )
    # Compared on the create revision: only that leader's term ends, never a successor's.
    await etcd.txn([_etcd.create_revision_is(key, holder.revision)], [_etcd.delete(key)])


async def _refuses(address: str, timeout: float) -> bool:
    """True only when nothing listens at address (connection refused); a timeout proves nothing."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except ConnectionRefusedError:
        return True
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


def _leader_info(kv: _etcd.KeyValue) -> LeaderInfo:
    data = json.loads(kv.value)
    return LeaderInfo(str(data.get("id", "")), str(data.get("address", "")), kv.create_revision)


async def current_leader(etcd: Etcd, key: bytes) -> LeaderInfo | None:
    kv, _ = await etcd.get(key)
    return None if kv is None else _leader_info(kv)
