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


def interval(ttl: int) -> float:
    """Seconds between refreshes of a lease with this TTL, and the margin kept before its end."""
    return max(ttl / 3, 0.2)


class Trust:
    """Until when (time.monotonic) a lease can be relied on; `keep_alive` moves it forward.

    Checked at the moment of use, it holds even when the event loop was frozen (SIGSTOP, a long
    pause) and the keep-alive coroutine has not yet run to notice the lease is gone.
    """

    __slots__ = ("deadline",)

    def __init__(self, granted_at: float, ttl: int) -> None:
        # granted_at: time.monotonic() taken before the grant was sent.
        self.deadline = granted_at + ttl - interval(ttl)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


async def keep_alive(keeper: LeaseKeeper, ttl: int, what: str, trust: Trust | None = None) -> None:
    """Refresh the keeper's lease every ttl/3 until it can no longer be trusted, then return; closes the keeper.

    It returns when etcd says the lease is gone or no refresh was confirmed in time (etcd
    unreachable); failed refreshes are retried on the connection's current endpoint meanwhile.
    Cancelling it closes the keep-alive stream. `what` names the lease in logs; `trust` (from
    before the grant) is kept up to date for callers that check it directly.
    """
    lease = keeper.lease
    step = interval(ttl)
    if trust is None:
        trust = Trust(time.monotonic(), ttl)
    try:
        while True:
            deadline = trust.deadline
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error("%s lease %x could not be refreshed in time", what, lease)
                return
            # etcd restarts the TTL when it receives the refresh, which is after we sent it: counting from
            # the send keeps our deadline earlier than etcd's, however slow the reply.
            sent = time.monotonic()
            try:
                left = await keeper.refresh(min(remaining, step * 2))
            except EtcdError as exc:
                log.warning("%s lease keep-alive: %s", what, exc)
                await asyncio.sleep(min(step / 2, max(deadline - time.monotonic(), 0.01)))
                continue
            if left <= 0:
                log.error("%s lease %x expired", what, lease)
                return
            trust.deadline = sent + left - step
            await asyncio.sleep(step)
    finally:
        keeper.close()
