"""Shared fixtures: one real etcd per test session; each test gets its own namespace (and a coordinator if asked)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import pytest
from _cluster import coordinator  # noqa: F401  (shared: a started coordinator per test)

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
