"""Shared fixtures: one real etcd per test session; each test gets its own namespace (and a coordinator if asked)."""

from __future__ import annotations

import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import pytest
from _cluster import Coordinator
from _scheduling import Api, connect

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.server._etcd import Etcd


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# A suite stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so fixtures
# still stop the etcd, coordinator and worker processes they started.
signal.signal(signal.SIGTERM, _interrupt)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(fsync=False) as server:
        yield server


@pytest.fixture
async def kv(etcd: EmbeddedEtcd) -> AsyncIterator[Etcd]:
    """A direct etcd connection, to look at or change what the coordinator stored."""
    client = Etcd([etcd.endpoint])
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def coordinator(etcd: EmbeddedEtcd, namespace: str) -> Iterator[Coordinator]:
    """A started coordinator, leader of the test's namespace; killed at teardown (its log is shown
    with a failed test's report)."""
    node = Coordinator(etcd.endpoint, namespace)
    try:
        node.start()
        yield node
    finally:
        node.kill()
        # pytest shows captured teardown output only for failed tests.
        sys.stderr.write(f"--- coordinator {node.address} log ---\n{node.log_tail()}\n")
        with contextlib.suppress(OSError):
            node.log_path.unlink()


@pytest.fixture
async def api(coordinator: Coordinator) -> AsyncIterator[Api]:
    """Stubs to the test's coordinator with the example types registered (the scheduler's tests)."""
    async with connect(coordinator) as value:
        yield value
