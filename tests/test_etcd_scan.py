"""Etcd.scan_prefix: every key in order across pages and windows, at one revision, the next page read ahead."""

from __future__ import annotations

import asyncio
import contextlib

from herder.server._etcd import Etcd, put


async def test_scan_reads_every_page_in_order_at_one_revision(kv: Etcd, namespace: str) -> None:
    prefix = f"/{namespace}/scan/".encode()
    keys = [prefix + f"{i:03d}".encode() for i in range(10)]
    await kv.txn([], [put(k, b"v") for k in keys])
    scan = kv.scan_prefix(prefix, page=3)
    seen = [(await anext(scan)).key]
    # Written after the scan began: not in its snapshot, though its later pages are read after.
    await kv.txn([], [put(prefix + b"005a", b"late")])
    seen += [item.key async for item in scan]
    assert seen == keys


async def test_a_scan_closed_early_leaves_no_read_running(kv: Etcd, namespace: str) -> None:
    prefix = f"/{namespace}/early/".encode()
    await kv.txn([], [put(prefix + f"{i:03d}".encode(), b"v") for i in range(10)])
    async with contextlib.aclosing(kv.scan_prefix(prefix, page=3)) as scan:
        await anext(scan)
        assert _reading_ahead()  # the second page is on its way
    assert not _reading_ahead()


async def test_windows_and_pages_cover_every_key_once_in_order_at_one_revision(kv: Etcd, namespace: str) -> None:
    prefix = f"/{namespace}/windows/".encode()
    keys = [prefix + f"{i:04d}".encode() for i in range(250)]
    for chunk in range(0, len(keys), 100):
        await kv.txn([], [put(k, b"v") for k in keys[chunk : chunk + 100]])
    # Windows of 40 keys, pages of 7: windows end inside pages' runs and on the last key alike.
    scan = kv.scan_prefix(prefix, page=7, window=40)
    seen = [(await anext(scan)).key]
    # In a later window's range, written after the scan began: not in its snapshot.
    await kv.txn([], [put(prefix + b"0200a", b"late"), put(prefix + b"9999", b"late")])
    seen += [item.key async for item in scan]
    assert seen == keys
    assert [item.key async for item in kv.scan_prefix(prefix, page=1000, window=250)] == sorted(
        [*keys, prefix + b"0200a", prefix + b"9999"]
    )


async def test_an_empty_prefix_scans_nothing(kv: Etcd, namespace: str) -> None:
    assert [item async for item in kv.scan_prefix(f"/{namespace}/nothing/".encode(), window=5)] == []


def _reading_ahead() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "herder-etcd-read-ahead" and not t.done()]
