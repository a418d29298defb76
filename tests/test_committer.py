"""The committer against a real etcd: batching, merged writes, atomic requests, size guards, order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from _timing import eventually

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.server import _etcd, leases
from herder.server._etcd import Etcd
from herder.server.committer import Committer, FencedError, RequestTooLargeError, Write

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fenced(etcd: EmbeddedEtcd, namespace: str) -> AsyncIterator[tuple[Etcd, Committer, bytes]]:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    prefix = f"/herder/{namespace}/".encode()
    leader = prefix + b"leader"
    reply = await kv.txn([], [_etcd.put(leader, b"me")])
    committer = Committer(kv, leader, reply.header.revision)
    yield kv, committer, prefix
    await committer.close()
    await kv.close()


async def test_concurrent_writes_share_transactions(fenced: tuple[Etcd, Committer, bytes]) -> None:
    kv, committer, prefix = fenced
    revisions = await asyncio.gather(
        *(committer.commit([Write(prefix + b"k%04d" % i, b"v%d" % i)]) for i in range(1000))
    )
    assert all(r > 0 for r in revisions)
    assert committer.operations == 1000
    assert committer.transactions < 1000 / 4
    stored = {kv_.key: kv_.value async for kv_ in kv.scan_prefix(prefix + b"k")}
    assert len(stored) == 1000 and stored[prefix + b"k0007"] == b"v7"


async def test_writes_to_one_key_land_in_order_the_waiting_ones_replaced_by_the_latest(
    fenced: tuple[Etcd, Committer, bytes],
) -> None:
    kv, committer, prefix = fenced
    key = prefix + b"task"
    futures = [committer.submit([Write(key, b"state-%d" % i)]) for i in range(50)]
    others = [committer.submit([Write(prefix + b"other%d" % i, b"x")]) for i in range(200)]
    revisions = await asyncio.gather(*futures)
    await asyncio.gather(*others)
    assert revisions == sorted(revisions)
    found, _ = await kv.get(key)
    assert found is not None and found.value == b"state-49"
    # Each put of the key is a revision of its own; the writes that waited replaced each other, so
    # one or two puts (the first may have gone out before the others came).
    assert committer.superseded == 50 - len(set(revisions)) >= 48
    assert committer.transactions < 200 // 4


async def test_a_waiting_write_is_replaced_only_by_one_that_rewrites_all_of_its_keys(
    fenced: tuple[Etcd, Committer, bytes],
) -> None:
    kv, committer, prefix = fenced
    task, marker, other = prefix + b"t", prefix + b"gc/t", prefix + b"idem/t"
    first = committer.submit([Write(task, b"assigned")])
    await first
    running = committer.submit([Write(task, b"running")])  # waits for the committer's next turn
    finished = committer.submit([Write(task, b"succeeded"), Write(marker, b"m")])  # replaces "running"
    assert finished is running
    paired = committer.submit([Write(task, b"retried"), Write(other, b"i")])  # would replace {t, gc/t}: no
    alone = committer.submit([Write(task, b"last")])  # {t, idem/t} is not all rewritten: no
    assert paired is not finished and alone is not paired
    await asyncio.gather(finished, paired, alone)
    found, _ = await kv.get(task)
    assert found is not None and found.value == b"last"
    # assigned, succeeded, retried, last, each in its own transaction: "running" never reached etcd.
    assert len({await f for f in (first, finished, paired, alone)}) == 4
    stored, _ = await kv.get(marker)
    assert stored is not None and stored.mod_revision == await finished
    assert committer.superseded == 1


async def test_a_request_no_transaction_could_hold_is_refused_before_anything_is_queued(
    fenced: tuple[Etcd, Committer, bytes],
) -> None:
    kv, committer, prefix = fenced
    with pytest.raises(RequestTooLargeError, match="at most 128 writes"):
        committer.submit([Write(prefix + b"big%04d" % i, b"x") for i in range(129)])
    with pytest.raises(RequestTooLargeError, match="bytes"):
        committer.submit([Write(prefix + b"huge", b"x" * (2 * 1024 * 1024))])
    with pytest.raises(RequestTooLargeError, match="distinct"):
        committer.submit([Write(prefix + b"twice", b"1"), Write(prefix + b"twice", b"2")])
    # The committer is still healthy: nothing was sent, nothing failed.
    assert await committer.commit([Write(prefix + b"after", b"ok")]) > 0
    assert not committer.failed.is_set()
    assert [kv_.key async for kv_ in kv.scan_prefix(prefix + b"big")] == []


async def test_a_request_lands_in_one_transaction_even_when_transactions_are_full(
    fenced: tuple[Etcd, Committer, bytes],
) -> None:
    kv, committer, prefix = fenced
    pairs = []
    singles = []
    for i in range(1500):
        # A shared hot key makes requests wait behind busy keys; pairs must still never split.
        singles.append(committer.submit([Write(prefix + b"hot", b"%d" % i)]))
        pairs.append(committer.submit([Write(prefix + b"task/%04d" % i, b"t"), Write(prefix + b"idem/%04d" % i, b"i")]))
        singles.append(committer.submit([Write(prefix + b"one/%04d" % i, b"x" * 50)]))
    await asyncio.gather(*pairs, *singles)
    tasks = {kv_.key.rsplit(b"/", 1)[1]: kv_.mod_revision async for kv_ in kv.scan_prefix(prefix + b"task/")}
    idems = {kv_.key.rsplit(b"/", 1)[1]: kv_.mod_revision async for kv_ in kv.scan_prefix(prefix + b"idem/")}
    assert len(tasks) == 1500 and tasks == idems
    # The hot key's waiting writes replace each other; everything else rode along with them.
    assert committer.operations == 1500 * 4 - committer.superseded and committer.transactions < 1500 + 100


async def test_writes_to_one_key_are_answered_in_order(fenced: tuple[Etcd, Committer, bytes]) -> None:
    kv, committer, prefix = fenced
    answered: dict[int, list[int]] = {k: [] for k in range(7)}
    futures = []
    for i in range(300):
        future = committer.submit([Write(prefix + b"o%d" % (i % 7), b"%d" % i)])
        future.add_done_callback(lambda _, i=i: answered[i % 7].append(i))
        futures.append(future)
    await asyncio.gather(*futures)
    await asyncio.sleep(0)
    for key, order in answered.items():
        assert order == sorted(order) and len(order) == len(range(key, 300, 7))
        found, _ = await kv.get(prefix + b"o%d" % key)
        assert found is not None and found.value == b"%d" % order[-1]


async def test_deletes_remove_keys(fenced: tuple[Etcd, Committer, bytes]) -> None:
    kv, committer, prefix = fenced
    await committer.commit([Write(prefix + b"gone", b"1")])
    await committer.commit([Write(prefix + b"gone", None)])
    found, _ = await kv.get(prefix + b"gone")
    assert found is None


async def test_nothing_is_sent_once_the_leader_lease_may_have_run_out(etcd: EmbeddedEtcd, namespace: str) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    prefix = f"/herder/{namespace}/".encode()
    leader = prefix + b"leader"
    reply = await kv.txn([], [_etcd.put(leader, b"me")])
    expired = False
    committer = Committer(kv, leader, reply.header.revision, expired=lambda: expired)
    try:
        assert await committer.commit([Write(prefix + b"before", b"x")]) > 0
        # The fence still matches in etcd: only the lease clock stops the write.
        expired = True
        with pytest.raises(FencedError, match="lease ran out"):
            await committer.commit([Write(prefix + b"after", b"x")])
        assert committer.failed.is_set()
        found, _ = await kv.get(prefix + b"after")
        assert found is None
    finally:
        await committer.close()
        await kv.close()


async def test_a_lease_is_trusted_until_a_refresh_interval_before_etcd_could_expire_it(etcd: EmbeddedEtcd) -> None:
    kv = Etcd([etcd.endpoint])
    await kv.connect()
    try:
        granted_at = time.monotonic()
        lease = await kv.grant(3)
        trust = leases.Trust(granted_at, 3)
        assert not trust.expired()
        assert trust.deadline == pytest.approx(granted_at + 2.0)
        keeper = asyncio.create_task(leases.keep_alive(kv.lease_keeper(lease), 3, "test", trust))
        first = trust.deadline
        await eventually(lambda: _moved(trust, first), what="the trusted deadline to move with a refresh")
        await kv.revoke(lease)
        # etcd says the lease is gone at the next refresh: keep_alive returns.
        await asyncio.wait_for(keeper, 5)
    finally:
        await kv.close()


async def _moved(trust: leases.Trust, first: float) -> bool:
    return trust.deadline > first
