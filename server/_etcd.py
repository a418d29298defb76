"""A small typed layer over etcd's v3 API, on aetcd's connection and generated stubs.

The coordinator needs raw transactions (many operations, a fence compare),
lease keep-alive streams and revision-exact watches; aetcd provides the
channel and the etcd protobufs, this module the few calls built on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aetcd
import grpc
from aetcd import rpc


class EtcdError(Exception):
    """etcd failed or could not be reached."""


class EtcdAuthError(EtcdError):
    """etcd refused the credentials (or wants some and none were given); retrying cannot help."""


@dataclass(frozen=True, slots=True)
class EtcdCredentials:
    """An etcd user and its password; the password is left out of repr so it cannot reach a log."""

    user: str
    password: str = field(repr=False)


class CompactedError(EtcdError):
    """A watch asked for revisions etcd has compacted away; `compact_revision` is the oldest it still has."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class EtcdStatus:
    version: str
    db_size: int
    revision: int
    leader: int


@dataclass(frozen=True, slots=True)
class EtcdMember:
    """One etcd cluster member and what its own Status said: `error` is empty when it answered."""

    id: int
    name: str
    client_urls: tuple[str, ...]
    version: str = ""
    is_leader: bool = False
    error: str = ""


class WatchEvent:
    """A put (value set) or a delete (deleted=True) at a revision; `prev_value` when the watch asked for
    it and the key existed before.

    Fields are read from etcd's message when used (`key`, `value`, `mod_revision` and `prev_value`
    without building a KeyValue): the task feed reads a few fields of thousands of events a second.
    """

    __slots__ = ("_event", "_prev", "deleted")

    def __init__(self, event: Any, prev: bool) -> None:
        self._event = event
        self._prev = prev
        self.deleted = event.type == rpc.Event.DELETE

    @property
    def kv(self) -> KeyValue:
        return key_value(self._event.kv)

    @property
    def key(self) -> bytes:
        return bytes(self._event.kv.key)

    @property
    def value(self) -> bytes:
        return bytes(self._event.kv.value)

    @property
    def mod_revision(self) -> int:
        return int(self._event.kv.mod_revision)

    @property
    def prev_value(self) -> bytes | None:
        event = self._event
        return bytes(event.prev_kv.value) if self._prev and event.HasField("prev_kv") else None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response: its events (whole revisions, never split) and the revision it vouches for.

    `revision` is the last event's revision, or for a progress notice (`progress`, no events) the
    store revision up to which every event has already been sent.
    """

    events: tuple[WatchEvent, ...]
    revision: int
    progress: bool = False


def lease_not_found(error: EtcdError) -> bool:
    """Whether etcd refused a call because the lease it named no longer exists (expired or revoked)."""
    cause = error.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.NOT_FOUND


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with prefix."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def put(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete(key: bytes) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))


def get(key: bytes) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key))


def txn_request(*compare: Any) -> Any:
    """An empty transaction guarded by `compare`, for its caller to add operations to in place."""
    return rpc.TxnRequest(compare=list(compare))


def create_revision_is(key: bytes, revision: int) -> Any:
    """Compare: the key was created at this revision (0: the key does not exist)."""
    return rpc.Compare(key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=revision)


def key_value(kv: Any) -> KeyValue:
    """A KeyValue from etcd's mvccpb.KeyValue."""
    return KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)


def _refuses_auth(exc: grpc.aio.AioRpcError) -> bool:
    """etcd said no to who we are: a bad or missing token, a user without the permission, or no user."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return True
    # etcd answers a request without a token, when authentication is on, with INVALID_ARGUMENT.
    return code == grpc.StatusCode.INVALID_ARGUMENT and "user name is empty" in (exc.details() or "")


class Etcd:
    """One connection to an etcd cluster. Calls raise EtcdError when etcd fails or times out.

    `connect()` uses the first endpoint that answers; `reconnect()` tries them all again,
    starting after the one that failed, so a cluster member going away is survivable.
    """

    def __init__(
        self, endpoints: Sequence[str], *, timeout: float = 5.0, credentials: EtcdCredentials | None = None
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.credentials = credentials
        # With credentials, the token etcd gave for them: sent with every request.
        self._metadata: Any = None
        self.endpoint = self.endpoints[0]
        self.timeout = timeout
        self._client: Any = None
        self._kv: Any = None
        self._lease: Any = None
        self._maintenance: Any = None
        self._cluster: Any = None
        self._watch: Any = None
        self._reconnecting = asyncio.Lock()
        self._generation = 0

    async def connect(self, timeout: float | None = None) -> None:
        """Connect to the first endpoint that answers; raises EtcdError naming them when none does."""
        start = self.endpoints.index(self.endpoint)
        order = self.endpoints[start:] + self.endpoints[:start]
        for endpoint in order:
            try:
                await self._connect_to(endpoint, timeout or self.timeout)
            except EtcdAuthError:
                raise
            except EtcdError:
                continue
            self.endpoint = endpoint
            return
        raise EtcdError(f"etcd at {', '.join(self.endpoints)} does not answer")

    async def reconnect(self) -> None:
        """Drop the connection and connect again, trying the next endpoint first.

        Callers that find the connection broken at the same moment share one reconnection: who
        waited while another reconnected successfully keeps that connection.
        """
        generation = self._generation
        async with self._reconnecting:
            if generation != self._generation and self._client is not None:
                return
            await self.close()
            self.endpoint = self.endpoints[(self.endpoints.index(self.endpoint) + 1) % len(self.endpoints)]
            await self.connect()
            self._generation += 1

    async def _connect_to(self, endpoint: str, timeout: float) -> None:
        host, _, port = endpoint.rpartition(":")
        credentials = self.credentials
        client = aetcd.Client(
            host=host or "127.0.0.1",
            port=int(port),
            # aetcd authenticates in connect() with this timeout; requests below set their own.
            timeout=timeout,
            options={"grpc.max_receive_message_length": 64 * 1024 * 1024},
            username=credentials.user if credentials else None,
            password=credentials.password if credentials else None,
        )
        try:
            await client.connect()
        except (aetcd.exceptions.UnauthenticatedError, aetcd.exceptions.InvalidArgumentError) as exc:
            # Only the user is named: aetcd's message does not carry the password, and nothing here adds it.
            raise EtcdAuthError(
                f"etcd at {endpoint} refused the credentials of user {credentials.user if credentials else ''!r}"
            ) from exc
        except Exception as exc:
            raise EtcdError(f"cannot connect to etcd at {endpoint}: {exc}") from exc
        self._client = client
        self._metadata = client.metadata
        self._kv = client.kvstub
        self._lease = client.leasestub
        self._maintenance = client.maintenancestub
        self._cluster = client.clusterstub
        self._watch = rpc.WatchStub(client.channel)
        try:
            await asyncio.wait_for(self.status(), timeout)
            if credentials is None:
                # Status answers anyone; a read says whether etcd wants credentials none were given for.
                await asyncio.wait_for(self._call(self._kv.Range, rpc.RangeRequest(key=b"\0", limit=1)), timeout)
        except EtcdAuthError as exc:
            await self.close()
            if credentials is None:
                raise EtcdAuthError(f"etcd at {endpoint} has authentication on and no user was given ({exc})") from exc
            raise
        except (TimeoutError, EtcdError) as exc:
            await self.close()
            raise EtcdError(f"etcd at {endpoint} does not answer") from exc

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        if self._client is None:
            raise EtcdError("not connected to etcd")
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            if _refuses_auth(exc):
                raise EtcdAuthError(f"etcd refused the request: {exc.details()}") from exc
            raise EtcdError(f"etcd: {exc.code().name}: {exc.details()}") from exc
        except grpc.aio.UsageError as exc:
            raise EtcdError(f"etcd connection closed: {exc}") from exc

    async def status(self) -> EtcdStatus:
        reply = await self._call(self._maintenance.Status, rpc.StatusRequest())
        return EtcdStatus(reply.version, reply.dbSize, reply.header.revision, reply.leader)

    async def members(self, timeout: float = 1.0) -> list[EtcdMember]:
        """The cluster's members (MemberList), each asked for its Status at its own client URL within `timeout`."""
        reply = await self._call(self._cluster.MemberList, rpc.MemberListRequest())
        return list(await asyncio.gather(*(_member_status(m, timeout) for m in reply.members)))

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        """The key's value (or None) and the store revision it was read at."""
        reply = await self._call(self._kv.Range, rpc.RangeRequest(key=key))
        return (key_value(reply.kvs[0]) if reply.kvs else None), reply.header.revision

    async def range(
        self,
        start: bytes,
        end: bytes,
        *,
        limit: int = 0,
        revision: int = 0,
        keys_only: bool = False,
        timeout: float | None = None,
        descending: bool = False,
    ) -> tuple[list[KeyValue], bool, int]:
        """Keys in [start, end) in key order (highest first when descending): (kvs, more, revision).
        `timeout` defaults to at least 30 s (a big page takes a while)."""
        request = rpc.RangeRequest(key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only)
        if descending:
            request.sort_order = rpc.RangeRequest.DESCEND
            request.sort_target = rpc.RangeRequest.KEY
        reply = await self._call(self._kv.Range, request, timeout=timeout or max(self.timeout, 30.0))
        return [key_value(kv) for kv in reply.kvs], reply.more, reply.header.revision

    async def last_created_before(self, prefix: bytes, revision: int) -> tuple[KeyValue | None, int]:
        """The newest key under prefix created before `revision` (or None), and the store revision read at."""
        request = rpc.RangeRequest(
            key=prefix,
            range_end=prefix_end(prefix),
            sort_order=rpc.RangeRequest.DESCEND,
            sort_target=rpc.RangeRequest.CREATE,
            max_create_revision=revision - 1,
            limit=1,
        )
        reply = await self._call(self._kv.Range, request)
        return (key_value(reply.kvs[0]) if reply.kvs else None), reply.header.revision

    async def scan_prefix(
        self, prefix: bytes, *, page: int = 2000, window: int = 50_000
    ) -> AsyncGenerator[KeyValue, None]:
        """Every key under prefix, read page by page at one revision (a consistent snapshot).

        etcd (3.5) counts every key from a page's start to its range's end to answer it, so pages over
        the whole prefix cost O(keys) each and a million keys took minutes. The keys are read in
        windows of `window` keys instead: one keys-only read finds where a window ends, and its pages
        count only up to there.
        """
        end = prefix_end(prefix)
        start, revision = prefix, 0
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=window, revision=revision, keys_only=True)
            reply = await self._call(self._kv.Range, request, timeout=max(self.timeout, 30.0))
            # The first read fixes the snapshot (a reply's header has etcd's current revision, not the one read at).
            revision = revision or reply.header.revision
            if not reply.kvs:
                return
            window_end = reply.kvs[-1].key + b"\0" if reply.more else end
            async with contextlib.aclosing(self._pages(start, window_end, page, revision)) as pages:
                async for kv in pages:
                    yield kv
            if not reply.more:
                return
            start = window_end

    async def _pages(self, start: bytes, end: bytes, page: int, revision: int) -> AsyncGenerator[KeyValue, None]:
        """The keys in [start, end) at `revision`, page by page. The next page is read while the caller
        works through the current one (a rebuild would otherwise wait out one etcd round trip per
        page). Closing the iterator early cancels it."""
        kvs, more, _ = await self.range(start, end, limit=page, revision=revision)
        while True:
            following: asyncio.Task[tuple[list[KeyValue], bool, int]] | None = None
            if more and kvs:
                following = asyncio.create_task(
                    self.range(kvs[-1].key + b"\0", end, limit=page, revision=revision), name="herder-etcd-read-ahead"
                )
            try:
                for kv in kvs:
                    yield kv
            except BaseException:  # closed early (GeneratorExit) or the caller failed
                if following is not None:
                    following.cancel()
                    with contextlib.suppress(asyncio.CancelledError, EtcdError):
                        await following
                raise
            if following is None:
                return
            kvs, more, _ = await following

    async def txn(
        self, compare: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = (), timeout: float | None = None
    ) -> Any:
        """Run a transaction; returns etcd's TxnResponse (succeeded, responses, header)."""
        request = rpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        return await self.send_txn(request, timeout)

    async def send_txn(self, request: Any, timeout: float | None = None) -> Any:
        """Run a transaction built by the caller (`txn_request`); returns etcd's TxnResponse."""
        return await self._call(self._kv.Txn, request, timeout)

    async def grant(self, ttl: int) -> int:
        reply = await self._call(self._lease.LeaseGrant, rpc.LeaseGrantRequest(TTL=ttl, ID=0))
        if reply.error:
            raise EtcdError(f"lease grant failed: {reply.error}")
        return int(reply.ID)

    async def revoke(self, lease: int) -> bool:
        """Revoke `lease` (deleting its keys); False, never an error, when etcd did not confirm it is gone."""
        try:
            await self._call(self._lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease), timeout=2.0)
        except EtcdError as exc:
            # An expired lease is as gone as a revoked one.
            return lease_not_found(exc)
        return True

    def lease_keeper(self, lease: int) -> LeaseKeeper:
        """A keeper that refreshes `lease` on this connection, one refresh at a time."""
        return LeaseKeeper(self, lease)

    async def compact(self, revision: int) -> None:
        """Discard history before `revision` (physical: waits until it is done)."""
        await self._call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True))

    async def watch(self, key: bytes, end: bytes = b"", *, start_revision: int = 0) -> AsyncGenerator[WatchEvent, None]:
        """Every change of key (or [key, end)) from start_revision on, in order. Raises EtcdError when it
        breaks (CompactedError when start_revision is compacted)."""
        async with contextlib.aclosing(self.watch_batches(key, end, start_revision=start_revision)) as batches:
            async for batch in batches:
                for event in batch.events:
                    yield event

    async def watch_batches(
        self,
        key: bytes,
        end: bytes = b"",
        *,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_every: float = 0.0,
    ) -> AsyncGenerator[WatchBatch, None]:
        """The changes of key (or [key, end)) from start_revision on, one etcd response at a time.

        With `progress_every`, etcd is asked that often for a progress notice (a batch with
        `progress` set), which comes once every event up to the current revision has been sent:
        how a catch-up watch knows it is done. Raises CompactedError when start_revision was
        compacted, EtcdError when the watch breaks; closing the generator cancels the watch.
        """
        create = rpc.WatchCreateRequest(key=key, range_end=end, start_revision=start_revision, prev_kv=prev_kv)
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield rpc.WatchRequest(create_request=create)
            while progress_every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), progress_every)
                if stop.is_set():
                    return
                yield rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
            await stop.wait()

        if self._client is None:
            raise EtcdError("not connected to etcd")
        call = self._watch.Watch(requests(), metadata=self._metadata)
        try:
            async for reply in call:
                if reply.compact_revision:
                    raise CompactedError(
                        f"watch revision {start_revision} was compacted (etcd keeps {reply.compact_revision} on)",
                        reply.compact_revision,
                    )
                if reply.canceled:
                    raise EtcdError(f"watch canceled: {reply.cancel_reason}")
                if reply.created:
                    continue
                if not reply.events:
                    yield WatchBatch((), reply.header.revision, progress=True)
                    continue
                events = tuple(WatchEvent(event, prev_kv) for event in reply.events)
                yield WatchBatch(events, events[-1].mod_revision)
        except grpc.aio.AioRpcError as exc:
            raise EtcdError(f"watch failed: {exc.code().name}") from exc
        except grpc.aio.UsageError as exc:
            raise EtcdError(f"watch failed: the connection closed ({exc})") from exc
        finally:
            stop.set()
            call.cancel()


async def _member_status(member: Any, timeout: float) -> EtcdMember:
    urls = tuple(member.clientURLs)
    name = member.name or f"{member.ID:x}"
    if not urls:
        return EtcdMember(member.ID, name, urls, error="not started (no client URL)")
    target = urls[0].split("://", 1)[-1]
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            reply = await rpc.MaintenanceStub(channel).Status(rpc.StatusRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return EtcdMember(member.ID, name, urls, error=f"{exc.code().name}: {exc.details()}")
    return EtcdMember(member.ID, name, urls, reply.version, reply.leader == member.ID, "; ".join(reply.errors))


class LeaseKeeper:
    """Refreshes one lease over a LeaseKeepAlive stream: one request, one reply, per `refresh()`.

    It writes and reads the call directly (no request generator, no task of its own), so
    closing it cancels the call and leaves nothing pending. Safe to close twice.
    """

    def __init__(self, etcd: Etcd, lease: int) -> None:
        self._etcd = etcd
        self.lease = lease
        self._call: Any = None
        self._generation = etcd._generation

    async def refresh(self, timeout: float) -> int:
        """The lease's remaining TTL after one refresh (0 or less: the lease is gone).

        Raises EtcdError when the stream fails or no reply comes within timeout; the next
        refresh opens a new stream (on the connection's current endpoint).
        """
        try:
            return await asyncio.wait_for(self._exchange(), timeout)
        except TimeoutError:
            self.close()
            raise EtcdError(f"lease keep-alive: no reply within {timeout:.2g}s") from None
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self.close()
            detail = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            raise EtcdError(f"lease keep-alive failed: {detail}") from exc

    async def _exchange(self) -> int:
        if self._call is not None and self._generation != self._etcd._generation:
            self.close()  # opened on a connection since replaced: it can only fail
        if self._call is None:
            self._generation = self._etcd._generation
            if self._etcd._lease is None or self._etcd._client is None:
                raise EtcdError("not connected to etcd")
            self._call = self._etcd._lease.LeaseKeepAlive(metadata=self._etcd._metadata)
        await self._call.write(rpc.LeaseKeepAliveRequest(ID=self.lease))
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            self.close()
            raise EtcdError("lease keep-alive stream ended")
        return int(reply.TTL)

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
