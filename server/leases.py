"""Keeping an etcd lease alive, and trusting it only as long as etcd could not have let it expire.

A lease is trusted until its last confirmed refresh plus its TTL, minus one refresh interval: its
holder stops relying on it (a leader stops writing, a member registers again) before etcd could
hand what it guards to someone else.
"""

from __future__ import annotations

import asyncio
import logging
import time

from herder.server._etcd import EtcdError, LeaseKeeper

log = logging.getLogger(__name__)


async def keep_alive(keeper: LeaseKeeper, ttl: int, what: str) -> None:
    """Refresh the keeper's lease every ttl/3 until it can no longer be trusted, then return; closes the keeper.

    It returns when etcd says the lease is gone or no refresh was confirmed in time (etcd
    unreachable); failed refreshes are retried on the connection's current endpoint meanwhile.
    Cancelling it closes the keep-alive stream. `what` names the lease in logs.
    """
    lease = keeper.lease
    interval = max(ttl / 3, 0.2)
    deadline = time.monotonic() + ttl - interval
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("%s lease %x could not be refreshed in time", what, lease)
                return
            try:
                left = await keeper.refresh(min(remaining, interval * 2))
            except EtcdError as exc:
                log.warning("%s lease keep-alive: %s", what, exc)
                await asyncio.sleep(min(interval / 2, max(deadline - time.monotonic(), 0.01)))
                continue
            if left <= 0:
                log.error("%s lease %x expired", what, lease)
                return
            deadline = time.monotonic() + left - interval
            await asyncio.sleep(interval)
    finally:
        keeper.close()
