"""Several coordinator replicas on one namespace: membership, who leads, cluster status and health."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _timing import eventually, eventually_sync

from herder.clients.backoff import Backoff
from herder.clients.cli import main
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.errors import LEADER_METADATA_KEY
from herder.clients.examples import echo
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.clients.worker import Worker, WorkerSettings
from herder.server import keys
from herder.server._etcd import Etcd, KeyValue

pytestmark = pytest.mark.timeout(90)

SERVICE = "herder.v1.CoordinatorService"


def _start(etcd_endpoint: str, namespace: str, count: int, stack: ExitStack, lease_ttl: int = 2) -> list[Coordinator]:
    """`count` replicas, the first one leading; each is killed when `stack` closes."""
    nodes = []
    for i in range(count):
        node = Coordinator(etcd_endpoint, namespace, lease_ttl=lease_ttl).start(wait_leader=i == 0)
        nodes.append(stack.enter_context(node))
    return nodes


@pytest.fixture
def replicas(etcd: EmbeddedEtcd, namespace: str) -> Iterator[list[Coordinator]]:
    """Three replicas of the test's namespace; the first leads."""
    with ExitStack() as stack:
        yield _start(etcd.endpoint, namespace, 3, stack)


def _members(node: Coordinator) -> dict[str, pb.Replica]:
    return {r.address: r for r in node.status().replicas}


def _submit_error(node: Coordinator) -> grpc.RpcError:
    spec = task_pb2.TaskSpec(type="any.thing")
    spec.payload.Pack(task_pb2.Resources())
    with grpc.insecure_channel(node.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), timeout=5)
    return caught.value


def _redirect(error: grpc.RpcError) -> str:
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    return dict(error.trailing_metadata() or ()).get(LEADER_METADATA_KEY, "")  # type: ignore[attr-defined]


def test_every_replica_lists_all_replicas_and_the_same_leader(
    replicas: list[Coordinator], capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = {node.address for node in replicas}
    for node in replicas:
        eventually_sync(
            lambda node=node: _members(node).keys() == addresses, what=f"{node.address} listing every replica"
        )
        members = _members(node)
        assert [a for a, r in members.items() if r.leader] == [replicas[0].address]
        assert all(r.version and r.started.seconds > 0 for r in members.values())
        assert node.status().leader_address == replicas[0].address
    version = _members(replicas[0])[replicas[0].address].version
    assert main(["--coordinator", replicas[1].address, "status"]) == 0
    out = capsys.readouterr().out
    for node in replicas:
        assert node.address in out
    assert out.count("follower") == 2 and version in out and "healthy" in out


def test_followers_redirect_writes_to_the_new_leader_after_the_leader_is_killed(replicas: list[Coordinator]) -> None:
    old, second, third = replicas
    assert _redirect(_submit_error(third)) == old.address
    old.kill()
    new = eventually_sync(
        lambda: next((n for n in (second, third) if n.is_leader()), None), timeout=30, what="a new leader"
    )
    other = third if new is second else second
    eventually_sync(lambda: _redirect(_submit_error(other)) == new.address, what="the follower naming the new leader")
    # The killed replica's entry goes with its lease.
    eventually_sync(lambda: old.address not in _members(new), what="the killed replica leaving the members list")
    assert set(_members(other)) == {new.address, other.address}


async def test_a_worker_sent_to_a_follower_goes_to_the_leader_without_a_backoff(replicas: list[Coordinator]) -> None:
    leader, follower, _ = replicas
    # A first backoff this long would show: the redirect must not wait for it.
    settings = WorkerSettings(backoff=Backoff(initial=10.0, max=10.0, jitter=0.0))
    worker = Worker([follower.address], worker_id="follows", settings=settings)
    worker.add_task("examples.echo", echo)
    async with worker:
        await worker.wait_connected(5)
        async with grpc.aio.insecure_channel(leader.address) as channel:
            nodes = await coordinator_pb2_grpc.CoordinatorServiceStub(channel).ListNodes(pb.ListNodesRequest())
        assert [n.worker_id for n in nodes.nodes] == ["follows"]


def test_a_stopped_replica_leaves_the_members_list_at_once(etcd: EmbeddedEtcd, namespace: str) -> None:
    with ExitStack() as stack:
        leader, follower = _start(etcd.endpoint, namespace, 2, stack, lease_ttl=30)
        eventually_sync(lambda: follower.address in _members(leader), what="the follower registering")
        assert follower.stop() == 0
        # Revoked on a clean stop, well before its 30 s lease would end.
        eventually_sync(lambda: follower.address not in _members(leader), timeout=5, what="the stopped replica leaving")


async def test_a_replica_registers_again_when_its_lease_is_lost(coordinator: Coordinator, kv: Etcd) -> None:
    (replica,) = coordinator.status().replicas
    key = keys.member(keys.prefix(coordinator.namespace), replica.id)
    before, _ = await kv.get(key)
    assert before is not None and before.lease
    await kv.revoke(before.lease)

    async def registered_again() -> KeyValue | None:
        after, _ = await kv.get(key)
        return after if after is not None and after.lease != before.lease else None

    after = await eventually(registered_again, what="the member entry on a new lease")
    assert after.value == before.value


def test_cluster_status_shows_etcd_members_and_their_health(etcd: EmbeddedEtcd, coordinator: Coordinator) -> None:
    (member,) = coordinator.status().etcd_members
    assert member.healthy and not member.error
    assert member.leader and member.version
    assert any(url.endswith(etcd.endpoint) for url in member.client_urls)


def test_health_serving_on_leader_and_followers_while_they_reach_etcd(tmp_path: Path, namespace: str) -> None:
    store = EmbeddedEtcd(data_dir=tmp_path, fsync=True).start()
    try:
        with ExitStack() as stack:
            leader, follower = _start(store.endpoint, namespace, 2, stack)
            for node in (leader, follower):
                eventually_sync(lambda node=node: node.health(SERVICE) == "SERVING", what=f"{node.address} serving")
                assert node.health("") == "SERVING"
            store.stop()
            eventually_sync(lambda: follower.health(SERVICE) == "NOT_SERVING", timeout=20, what="follower not serving")
            assert follower.health("") == "SERVING"
            store = EmbeddedEtcd(
                data_dir=tmp_path, client_port=store.client_port, peer_port=store.peer_port, fsync=True
            ).start()
            eventually_sync(lambda: follower.health(SERVICE) == "SERVING", timeout=30, what="follower serving again")
            eventually_sync(lambda: follower.address in _members(follower), what="the follower registered again")
    finally:
        store.stop()
