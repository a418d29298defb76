"""Shared fixtures: one real etcd per test session; each test gets its own namespace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from herder.clients.embedded_etcd import EmbeddedEtcd


@pytest.fixture(scope="session")
def etcd() -> Iterator[EmbeddedEtcd]:
    with EmbeddedEtcd(fsync=False) as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
