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
    """ttl: seconds a dead leader keeps the key; keep-alives are sent every ttl/3.

    A follower also probes the leader's address every `probe_interval` seconds; when nothing
    listens there (connection refused, not a timeout) `probe_failures` times in a row, the leader
    process is gone, and the follower deletes that leader's key (compared on its create revision)
    rather than wait out the lease. Should the leader live on after all, the fence refuses its
    next write and it steps down: leadership is decided by etcd, never by the probe. 0 turns it off.
    """

    ttl: int = 5
    probe_interval: float = 0.5
    probe_failures: int = 2


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
        self._watcher = asyncio.create_task(self._watch_key(), name="herder-leader-key")

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

    async def _watch_key(self) -> None:
        """Leadership ends when the key goes while the lease lives: a follower found our address refusing
        connections (or an operator deleted it). A broken watch decides nothing: the lease keeper does."""
        with contextlib.suppress(EtcdError):
            async for event in self.etcd.watch(self.key, start_revision=self.info.revision + 1):
                if event.deleted or event.kv.create_revision != self.info.revision:
                    log.error("the leader key is gone (lease expired or key deleted; fence %d)", self.info.revision)
                    self.lost.set()
                    return

    async def resign(self) -> bool:
        """Give up leadership: stop refreshing and revoke the lease (deleting the key). Safe to call twice.

        False when etcd did not confirm the revoke (the key then lives until the lease expires).
        """
        self.lost.set()
        for task in (self._keeper, self._watcher):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        info = _leader_info(holder)
        observe(info)
        prober = None if info.address == address or not settings.probe_interval else info
        await _observe_until_deleted(etcd, key, holder.mod_revision + 1, stop, observe, prober, settings)
    return None


async def _observe_until_deleted(
    etcd: Etcd,
    key: bytes,
    from_revision: int,
    stop: asyncio.Event,
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
    stopper = asyncio.create_task(stop.wait())
    tasks = [waiter, stopper]
    if prober is not None:
        # Its end is not awaited: the watch sees the delete it makes.
        tasks.append(asyncio.create_task(_depose_if_gone(etcd, key, prober, settings)))
    try:
        await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
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
    # Compared on the create revision: only that leader's term ends, never a successor's.
    reply = await etcd.txn([_etcd.create_revision_is(key, holder.revision)], [_etcd.delete(key)])
    if reply.succeeded:
        log.warning(
            "leader %s at %s refused %d connections in a row: its process is gone; ended its term (fence %d)",
            holder.replica_id,
            holder.address,
            refused,
            holder.revision,
        )


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
