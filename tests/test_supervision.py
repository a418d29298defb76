"""Every loop the leader runs is supervised: a failure is logged with its traceback and the replica
steps down and leads again with fresh state, never a silent half-working leader.

The coordinator runs in-process here, against the real etcd, so a failure can be injected into
each loop of the live leader.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from _timing import eventually

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.server import election, keys
from herder.server.app import Coordinator, CoordinatorConfig
from herder.server.committer import Write
from herder.server.leader import NamespaceLeader

pytestmark = pytest.mark.timeout(60)


class Injected(RuntimeError):
    pass


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected failure")


async def _boom_async(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected failure")


def _timers(node: Coordinator, leader: NamespaceLeader) -> None:
    leader.timers.delayed.pop_due = _boom  # type: ignore[method-assign]
    leader.timers.delay(time.time() - 1, "due-now")


def _liveness(node: Coordinator, leader: NamespaceLeader) -> None:
    leader.workers._release_quarantines = _boom  # type: ignore[method-assign]


def _retention(node: Coordinator, leader: NamespaceLeader) -> None:
    leader.retention.collect_garbage = _boom_async  # type: ignore[method-assign]


def _committer(node: Coordinator, leader: NamespaceLeader) -> None:
    leader.committer._take_batch = _boom  # type: ignore[method-assign]
    leader.committer.submit([Write(keys.prefix(leader.namespace) + b"probe", b"1")])


def _keep_alive(node: Coordinator, leader: NamespaceLeader) -> None:
    # The leader key lives on the replica's lease: its keep-alive is the membership's.
    assert node._membership is not None and node._membership.keeper is not None
    node._membership.keeper.refresh = _boom_async  # type: ignore[method-assign]


def _dispatch(node: Coordinator, leader: NamespaceLeader) -> None:
    leader.dispatcher.dispatch = _boom  # type: ignore[method-assign]
    leader.dispatcher.schedule()


INJECTIONS: dict[str, Callable[[Coordinator, NamespaceLeader], None]] = {
    "timers": _timers,
    "liveness": _liveness,
    "retention": _retention,
    "committer": _committer,
    "keep-alive": _keep_alive,
    "dispatch": _dispatch,
}


@pytest.fixture
async def replica(etcd: EmbeddedEtcd, namespace: str) -> AsyncIterator[Coordinator]:
    config = CoordinatorConfig(
        etcd=(etcd.endpoint,),
        listen="127.0.0.1:0",
        namespace=namespace,
        lease=election.LeaseSettings(ttl=2),
    )
    node = Coordinator(config)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def _leading(node: Coordinator, not_this: NamespaceLeader | None = None) -> NamespaceLeader | None:
    leader = node.leader
    if leader is None or leader.deposed or leader is not_this:
        return None
    return leader


@pytest.mark.parametrize("loop", sorted(INJECTIONS))
async def test_a_failing_loop_makes_the_replica_step_down_and_lead_again(
    replica: Coordinator, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    first = await eventually(lambda: _leading(replica), what="the replica leading")
    INJECTIONS[loop](replica, first)
    second = await eventually(lambda: _leading(replica, first), what="the replica leading again")
    assert first.deposed and first.stopped.is_set()
    assert second.leadership.fence > first.leadership.fence
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], Injected)]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert logged[0].levelno == logging.ERROR
