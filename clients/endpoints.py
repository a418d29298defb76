"""The coordinator replicas a client or worker talks to, and which one it talks to now.

One rule: writes go to the leader. A follower answers them with NotLeaderError naming the
leader (empty while nobody leads); `Endpoints` follows that hint at once and, on any other
UNAVAILABLE (nothing answers, no leader yet, the leader it followed died), moves on to the
next configured address. Addresses come from a list, a comma-separated string or
HERDER_COORDINATOR; a host name stands for every address it resolves to, looked up again
each time the list has been walked through, so one DNS name can list all replicas.

`call` runs one unary call with that policy, retrying with backoff until the call's own
timeout runs out; the Client uses it for every unary RPC and the Worker for its sessions.
A retried submission is safe because it carries an idempotency key: the caller's, or one
made by `new_idempotency_key` (the coordinator keeps such a key only as long as its task).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from herder.clients import errors, tracing
from herder.clients.backoff import Backoff

DEFAULT_ADDRESS = "127.0.0.1:50051"
ADDRESS_ENV = "HERDER_COORDINATOR"

# A restarted coordinator is found again within a fraction of a second instead of
# gRPC's default reconnect backoff (1 s growing to 120 s).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # A SubmitTasks reply echoes its tasks, payloads included: as large as the request (16 MiB at most).
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# Idempotency keys the SDK gives submissions without one. The coordinator knows the prefix: such a
# key guards only the SDK's retries of one call, so it does not keep its task past the retention.
AUTO_KEY_PREFIX = "herder-sdk-"

T = TypeVar("T")


def new_idempotency_key() -> str:
    """A fresh key for a submission the caller gave none, so the SDK's own retries never duplicate it."""
    return AUTO_KEY_PREFIX + uuid.uuid4().hex


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure asyncio channel to one coordinator, with Herder's channel options."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=tracing.client_interceptors())


def parse_addresses(address: str | Sequence[str] | None = None) -> tuple[str, ...]:
    """The coordinator addresses in `address`: a "host:port", a comma-separated list of them, or a
    sequence of either; None reads HERDER_COORDINATOR, else 127.0.0.1:50051. IPv6 literals go in
    brackets ("[::1]:50051"). ValueError naming the bad entry when one is not host:port.
    """
    if address is None:
        address = os.environ.get(ADDRESS_ENV, "").strip() or DEFAULT_ADDRESS
    items = [address] if isinstance(address, str) else list(address)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a coordinator address must be a string such as {DEFAULT_ADDRESS!r}, got {item!r}")
        for part in (p.strip() for p in item.split(",")):
            if part:
                _split(part)
                if part not in found:
                    found.append(part)
    if not found:
        raise ValueError(f"no coordinator address given (expected host:port such as {DEFAULT_ADDRESS!r}): {address!r}")
    return tuple(found)


def address_setting(value: str) -> str:
    """The `coordinator` setting of the CLI, a worker and the supervisor: checked, returned as given."""
    parse_addresses(value)  # ValueError naming the bad entry
    return value.strip()


def _split(address: str) -> tuple[str, int]:
    """(host, port) of "host:port" or "[v6]:port"; ValueError saying what is wrong."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"coordinator address {address!r}: put an IPv6 address in brackets, as in '[::1]:50051'")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"coordinator address {address!r} is not host:port (e.g. {DEFAULT_ADDRESS!r})")
    return host, int(port_text)


def unreached(error: BaseException) -> bool:
    """True when a call failed to connect at all: nothing was sent, so any call may go to another replica."""
    return (
        isinstance(error, errors.UnavailableError)
        and not isinstance(error, errors.NotLeaderError)
        and "failed to connect" in error.message.lower()
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(address: str) -> list[str]:
    """Every "ip:port" a "host:port" names (IPv6 in brackets); a literal IP as is, and a name that
    does not resolve as is too, so the connection attempt reports the DNS failure."""
    host, port = _split(address)
    if _is_ip(host):
        return [address]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return [address]
    found: list[str] = []
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        target = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if target not in found:
            found.append(target)
    return found or [address]


class Endpoints:
    """Which coordinator to try now: the leader a follower named, else the configured addresses
    (host names expanded) in turn. Channels, one per address seen, are kept until `close`.

    Belongs to one event loop (its channels do). Not thread-safe; asyncio tasks may share it.
    """

    def __init__(self, address: str | Sequence[str] | None = None) -> None:
        self.configured = parse_addresses(address)
        self._candidates: list[str] = []
        self._index = 0
        self._leader = ""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closed = False

    @property
    def size(self) -> int:
        """How many addresses a walk through the list tries (host names expanded once they were)."""
        return len(self._candidates) or len(self.configured)

    @property
    def current(self) -> str:
        """The address tried next: the leader named last, or the configured entry in turn."""
        if self._leader:
            return self._leader
        if self._candidates:
            return self._candidates[self._index]
        return self.configured[self._index % len(self.configured)]

    async def target(self) -> str:
        """`current`, after expanding the configured host names when the list was used up."""
        if not self._leader and not self._candidates:
            expanded: list[str] = []
            for address in self.configured:
                expanded.extend(a for a in await resolve(address) if a not in expanded)
            self._candidates, self._index = expanded, 0
        return self.current

    def failed(self, address: str, error: BaseException) -> bool:
        """Move on after `error` from `address`; True when a follower named a new leader to try at once.

        A failure of an address other than `current` changes nothing: another call sharing these
        endpoints has moved on already (many calls failing together skip one address, not many).
        """
        if isinstance(error, errors.NotLeaderError) and error.leader_address:
            new = error.leader_address != address
            self._leader = error.leader_address
            return new
        if address != self.current:
            return False
        if self._leader:
            self._leader = ""  # the leader we were sent to failed: ask the configured replicas again
        elif self._candidates:
            self._index += 1
            if self._index >= len(self._candidates):
                self._candidates, self._index = [], 0  # walked through: resolve the names again
        else:
            self._index += 1
        return False

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        """The channel to `address` (default: `current`), opened on first use."""
        if self._closed:
            raise errors.FailedPreconditionError("the client is closed")
        address = address or self.current
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(address)
        return channel

    async def close(self) -> None:
        """Close every channel; calls in flight are cancelled. Safe to call twice."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def call(
        self,
        attempt: Callable[[grpc.aio.Channel, float], Awaitable[T]],
        *,
        timeout: float,
        backoff: Backoff,
    ) -> T:
        """`attempt(channel, seconds_left)` until it succeeds, retrying UnavailableError (NotLeaderError
        included) on the next address, at once after a redirect, else after `backoff`, until `timeout`
        seconds have passed; then the last error is raised. An overloaded leader's OverloadedError
        (nothing written) is retried after the delay it asks for, or `backoff` if longer, while the time
        left allows. Any other error is raised at once, and so is DeadlineExceededError (the attempt had
        all the time left). Cancellation cancels the attempt.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waits = redirects = 0
        while True:
            address = await self.target()
            try:
                return await attempt(self.channel(address), max(deadline - loop.time(), 0.001))
            except errors.OverloadedError as exc:
                waits += 1
                pause = max(exc.retry_after, backoff.delay(waits))
                if deadline - loop.time() <= pause:
                    raise
                await asyncio.sleep(pause)
            except errors.UnavailableError as exc:
                # Two replicas naming each other (a stale hint) must not loop without a pause.
                redirects = redirects + 1 if self.failed(address, exc) else 0
                left = deadline - loop.time()
                if left <= 0:
                    raise
                if not 0 < redirects <= 2:
                    waits += 1
                    await asyncio.sleep(min(backoff.delay(waits), left))
                    if loop.time() >= deadline:
                        raise


__all__ = [
    "ADDRESS_ENV",
    "AUTO_KEY_PREFIX",
    "CHANNEL_OPTIONS",
    "DEFAULT_ADDRESS",
    "Endpoints",
    "address_setting",
    "new_idempotency_key",
    "open_channel",
    "parse_addresses",
    "resolve",
    "unreached",
]
