"""LockService and Client.lock against a real etcd and real coordinator processes."""

from __future__ import annotations

import asyncio
import itertools
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _timing import SLACK, assert_between, duration, eventually

from herder.clients import Client, LockHeldError, LockLostError, SyncClient, errors
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.v1 import lock_pb2, lock_pb2_grpc
from herder.server import keys
from herder.server._etcd import Etcd, prefix_end

pytestmark = pytest.mark.timeout(60)

HOLDER = str(Path(__file__).with_name("_lock_holder.py"))


@asynccontextmanager
async def lock_stub(address: str) -> AsyncIterator[lock_pb2_grpc.LockServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield lock_pb2_grpc.LockServiceStub(channel)


async def lock_keys(kv: Etcd, namespace: str, name: str) -> int:
    """How many Acquires (holder and waiters) have a key under the lock."""
    prefix = keys.lock_prefix(keys.prefix(namespace), name)
    found, _, _ = await kv.range(prefix, prefix_end(prefix), keys_only=True)
    return len(found)


def acquire(name: str, *, ttl: float = 10, wait: float = 0, owner: str = "test") -> lock_pb2.AcquireRequest:
    return lock_pb2.AcquireRequest(name=name, owner=owner, ttl=duration(ttl), wait_timeout=duration(wait))


def test_twenty_holders_in_four_processes_never_overlap_and_tokens_grow(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    log = tmp_path / "sections.log"
    processes = [
        subprocess.Popen([sys.executable, HOLDER, coordinator.address, "shared", "log", str(log), "5"])
        for _ in range(4)
    ]
    try:
        assert [p.wait(timeout=45) for p in processes] == [0, 0, 0, 0]
    finally:
        for p in processes:
            p.kill()
    sections = sorted(tuple(map(int, line.split())) for line in log.read_text().splitlines())
    assert len(sections) == 20
    # In token order (grant order), each section ends before the next one starts.
    for (token, start, end), (next_token, next_start, _) in itertools.pairwise(sections):
        assert token < next_token
        assert start < end < next_start, f"sections of tokens {token} and {next_token} overlap"


async def test_a_killed_holder_frees_the_lock_after_its_ttl(coordinator: Coordinator) -> None:
    ttl = 2.0
    holder = await asyncio.create_subprocess_exec(
        sys.executable, HOLDER, coordinator.address, "crash", "hold", str(ttl), stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        first = int(await asyncio.wait_for(holder.stdout.readline(), 30))
        holder.kill()
        await holder.wait()
        killed = time.monotonic()
        async with lock_stub(coordinator.address) as stub:
            granted = await stub.Acquire(acquire("crash", wait=ttl + 2 * SLACK), timeout=30)
        assert_between(time.monotonic() - killed, 0, ttl + SLACK, "lock freed after its holder was killed")
        assert granted.fencing_token > first
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


@pytest.mark.parametrize("wait", [0.5, 0.0], ids=["wait", "try-once"])
async def test_a_waiter_that_gives_up_leaves_no_key(coordinator: Coordinator, kv: Etcd, wait: float) -> None:
    async with lock_stub(coordinator.address) as stub:
        await stub.Acquire(acquire("busy"), timeout=10)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Acquire(acquire("busy", wait=wait), timeout=10)
        assert_between(time.monotonic() - started, wait, wait + SLACK, "wait_timeout")
        assert caught.value.code() == grpc.StatusCode.ABORTED
        assert isinstance(errors.from_rpc_error(caught.value), LockHeldError)
        assert await lock_keys(kv, coordinator.namespace, "busy") == 1


async def test_a_cancelled_acquire_leaves_no_key(coordinator: Coordinator, kv: Etcd) -> None:
    async with lock_stub(coordinator.address) as stub:
        await stub.Acquire(acquire("busy"), timeout=10)
        call = stub.Acquire(acquire("busy", wait=30), timeout=40)
        await eventually(lambda: _count_is(kv, coordinator.namespace, "busy", 2), what="the waiter's key")
        call.cancel()
        await eventually(lambda: _count_is(kv, coordinator.namespace, "busy", 1), what="the waiter's key gone")


async def test_an_acquire_past_its_deadline_leaves_no_key(coordinator: Coordinator, kv: Etcd) -> None:
    async with lock_stub(coordinator.address) as stub:
        await stub.Acquire(acquire("busy"), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Acquire(acquire("busy", wait=30), timeout=1.0)
        # The coordinator answers "still held" just before the caller's deadline.
        assert caught.value.code() in (grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        await eventually(lambda: _count_is(kv, coordinator.namespace, "busy", 1), what="only the holder's key")


async def _count_is(kv: Etcd, namespace: str, name: str, count: int) -> bool:
    return await lock_keys(kv, namespace, name) == count


async def test_waiters_are_served_in_arrival_order(coordinator: Coordinator, kv: Etcd) -> None:
    served: list[tuple[str, int]] = []
    async with lock_stub(coordinator.address) as stub:
        holder = await stub.Acquire(acquire("queue"), timeout=10)

        async def wait_then_release(who: str) -> None:
            grant = await stub.Acquire(acquire("queue", wait=30, owner=who), timeout=40)
            served.append((who, grant.fencing_token))
            await stub.Release(lock_pb2.ReleaseRequest(name="queue", lease_id=grant.lease_id), timeout=10)

        waiters = []
        for i, who in enumerate(("first", "second", "third")):
            waiters.append(asyncio.create_task(wait_then_release(who)))
            await eventually(lambda n=i + 2: _count_is(kv, coordinator.namespace, "queue", n), what=f"{who} queued")
        await stub.Release(lock_pb2.ReleaseRequest(name="queue", lease_id=holder.lease_id), timeout=10)
        await asyncio.wait_for(asyncio.gather(*waiters), 30)
    assert [who for who, _ in served] == ["first", "second", "third"]
    tokens = [holder.fencing_token] + [token for _, token in served]
    assert tokens == sorted(set(tokens))


async def test_a_follower_replica_serves_locks(etcd: EmbeddedEtcd, coordinator: Coordinator) -> None:
    with Coordinator(etcd.endpoint, coordinator.namespace).start(wait_leader=False) as follower:
        assert not follower.is_leader()
        async with lock_stub(coordinator.address) as leader_stub, lock_stub(follower.address) as follower_stub:
            held = await follower_stub.Acquire(acquire("replicated"), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await leader_stub.Acquire(acquire("replicated"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.ABORTED
            await leader_stub.Refresh(lock_pb2.RefreshRequest(name="replicated", lease_id=held.lease_id), timeout=10)
            await leader_stub.Release(lock_pb2.ReleaseRequest(name="replicated", lease_id=held.lease_id), timeout=10)
            again = await follower_stub.Acquire(acquire("replicated"), timeout=10)
            assert again.fencing_token > held.fencing_token


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (acquire("a/b"), ["name"]),
        (acquire(""), ["name"]),
        (acquire("x" * 200), ["name"]),
        (acquire("ok", ttl=0), ["ttl"]),
        (acquire("ok", ttl=3601), ["ttl"]),
        (acquire("ok", wait=3601), ["wait_timeout"]),
        (acquire("ok", owner="o" * 300), ["owner"]),
        (acquire("bad name", ttl=0, wait=3601), ["name", "ttl", "wait_timeout"]),
    ],
)
async def test_a_bad_acquire_names_every_bad_field(
    coordinator: Coordinator, request_: lock_pb2.AcquireRequest, fields: list[str]
) -> None:
    async with lock_stub(coordinator.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Acquire(request_, timeout=10)
    error = errors.from_rpc_error(caught.value)
    assert isinstance(error, errors.InvalidArgumentError)
    assert [v.field for v in error.violations] == fields


async def test_refresh_and_release_of_an_unknown_lease_are_not_found(coordinator: Coordinator) -> None:
    async with lock_stub(coordinator.address) as stub:
        held = await stub.Acquire(acquire("known"), timeout=10)
        for call in (stub.Refresh, stub.Release):
            for name, lease_id in (("known", "deadbeef"), ("other", held.lease_id)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(lock_pb2.RefreshRequest(name=name, lease_id=lease_id), timeout=10)  # type: ignore[arg-type]
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
                assert "not held" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Release(lock_pb2.ReleaseRequest(name="known", lease_id="not-hex"), timeout=10)
        assert [v.field for v in errors.from_rpc_error(caught.value).violations] == ["lease_id"]
        refreshed = await stub.Refresh(lock_pb2.RefreshRequest(name="known", lease_id=held.lease_id), timeout=10)
        assert refreshed.ttl.seconds > 0


@pytest.mark.parametrize("behind_its_back", ["release", "revoke"])
async def test_a_lost_lock_cancels_the_body_and_raises(
    coordinator: Coordinator, kv: Etcd, behind_its_back: str
) -> None:
    body_cancelled = asyncio.Event()
    async with Client(coordinator.address) as client:
        with pytest.raises(LockLostError):
            async with client.lock("lost", ttl=3, wait=5) as lock:
                if behind_its_back == "release":
                    async with lock_stub(coordinator.address) as other:
                        request = lock_pb2.ReleaseRequest(name="lost", lease_id=lock.lease_id)
                        await other.Release(request, timeout=10)
                else:
                    await kv.revoke(int(lock.lease_id, 16))
                try:
                    await asyncio.sleep(lock.ttl + SLACK)
                except asyncio.CancelledError:
                    body_cancelled.set()
                    raise
                raise AssertionError("the body was not cancelled")
    assert body_cancelled.is_set()


async def test_the_sdk_releases_on_exit_and_try_once_reports_held(coordinator: Coordinator, kv: Etcd) -> None:
    async with Client(coordinator.address) as client:
        async with client.lock("sdk", ttl=5, wait=5) as lock:
            assert lock.token > 0
            with pytest.raises(LockHeldError):
                async with client.lock("sdk", ttl=5, wait=0):
                    raise AssertionError("granted twice")
        assert await lock_keys(kv, coordinator.namespace, "sdk") == 0


def test_the_sync_client_holds_and_releases(coordinator: Coordinator) -> None:
    with SyncClient(coordinator.address) as client:
        with client.lock("sync", ttl=5, wait=5) as first:
            assert first.token > 0
        with client.lock("sync", ttl=5, wait=0) as second:
            assert second.token > first.token


async def test_the_sync_client_raises_a_lost_lock_at_exit(coordinator: Coordinator, kv: Etcd) -> None:
    granted: queue.Queue[str] = queue.Queue()
    revoked = threading.Event()
    seen_lost: list[bool] = []

    def hold() -> None:
        with (
            SyncClient(coordinator.address) as client,
            pytest.raises(LockLostError),
            client.lock("sync-lost", ttl=3, wait=5) as lock,
        ):
            granted.put(lock.lease_id)
            assert revoked.wait(15)
            # Synchronous code is not interrupted: it sees `lost` set, and the exit raises.
            deadline = time.monotonic() + lock.ttl + SLACK
            while not lock.lost.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            seen_lost.append(lock.lost.is_set())

    holder = asyncio.create_task(asyncio.to_thread(hold))
    lease_id = await asyncio.to_thread(granted.get, timeout=15)
    await kv.revoke(int(lease_id, 16))
    revoked.set()
    await asyncio.wait_for(holder, 30)
    assert seen_lost == [True]
