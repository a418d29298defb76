"""Clients given several coordinator replicas: address lists, leader following, retries across a
leader's death, and the idempotency keys that keep those retries from duplicating tasks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from _cluster import Coordinator, start_replicas
from _timing import SLACK, assert_between

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.cli import describe_error, main
from herder.clients.client import AUTO_KEY_PREFIX, Client, SyncClient, TaskHandle, task_spec
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.endpoints import ADDRESS_ENV, DEFAULT_ADDRESS, Endpoints, parse_addresses, resolve
from herder.clients.proto.examples.v1 import examples_pb2

pytestmark = pytest.mark.timeout(60)

ECHO = "examples.echo"


@pytest.fixture
def replicas(etcd: EmbeddedEtcd, namespace: str) -> Iterator[list[Coordinator]]:
    """Three replicas of the test's namespace; the first leads."""
    with ExitStack() as stack:
        yield start_replicas(etcd.endpoint, namespace, 3, stack)


def _leader_not_first(replicas: list[Coordinator]) -> list[str]:
    leader, *followers = replicas
    return [followers[0].address, leader.address, followers[1].address]


async def _all_tasks(client: Client) -> list[str]:
    return [task.id async for task in client.iter_tasks(page_size=500)]


async def test_a_client_given_every_replica_submits_and_reads_and_survives_a_leader_kill(
    replicas: list[Coordinator],
) -> None:
    leader = replicas[0]
    async with Client(_leader_not_first(replicas), timeout=20) as client:
        await client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        first = await client.submit(ECHO, json={"text": "before"})
        assert (await client.get(first.id)).id == first.id
        assert client.address == leader.address

        await asyncio.to_thread(leader.kill)
        second = await client.submit(ECHO, json={"text": "after"})

        assert second.created and second.id != first.id
        assert client.address in {r.address for r in replicas[1:]}
        assert sorted(await _all_tasks(client)) == sorted([first.id, second.id])


async def test_submissions_in_flight_when_the_leader_dies_are_not_duplicated(replicas: list[Coordinator]) -> None:
    count = 40
    async with Client(_leader_not_first(replicas), timeout=20) as client:
        await client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)

        async def submit(n: int) -> TaskHandle:
            await asyncio.sleep(n * 0.02)  # spread over 0.8 s: some before, some during, some after the kill
            return await client.submit(ECHO, json={"text": str(n)})

        submissions = [asyncio.create_task(submit(n)) for n in range(count)]
        await asyncio.sleep(0.2)
        await asyncio.to_thread(replicas[0].kill)
        handles = await asyncio.gather(*submissions)

        ids = [h.id for h in handles]
        assert len(set(ids)) == count
        assert all(h.created for h in handles)
        assert sorted(await _all_tasks(client)) == sorted(ids)


async def test_submissions_get_an_idempotency_key_unless_the_caller_gave_one(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        generated = await client.submit(ECHO, json={"text": "a"})
        chosen = await client.submit(ECHO, json={"text": "b"}, idempotency_key="mine")
        specs = [task_spec(ECHO, json={"text": "c"}), task_spec(ECHO, json={"text": "d"}, idempotency_key="ours")]
        batch = await client.submit_many(specs)

    assert generated.task.spec.idempotency_key.startswith(AUTO_KEY_PREFIX) and generated.created
    assert chosen.task.spec.idempotency_key == "mine"
    keys = [h.task.spec.idempotency_key for h in batch if isinstance(h, TaskHandle)]
    assert keys[0].startswith(AUTO_KEY_PREFIX) and keys[1] == "ours"
    assert keys[0] != generated.task.spec.idempotency_key
    assert specs[0].idempotency_key == "", "the caller's spec is not changed"


async def test_no_replica_reachable_raises_unavailable_after_the_timeout() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with Client(dead, timeout=1.5, retry_backoff=Backoff(initial=0.05, max=0.2)) as client:
        started = time.monotonic()
        with pytest.raises(errors.UnavailableError):
            await client.cluster_status()
        assert_between(time.monotonic() - started, 1.5, 1.5 + SLACK, "giving up on unreachable replicas")


def test_addresses_are_parsed_from_lists_commas_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_addresses("a:1, b:2,,a:1") == ("a:1", "b:2")
    assert parse_addresses(["a:1,b:2", "[::1]:3"]) == ("a:1", "b:2", "[::1]:3")
    monkeypatch.setenv(ADDRESS_ENV, "env-host:7,other:8")
    assert parse_addresses(None) == ("env-host:7", "other:8")
    assert Client().addresses == ("env-host:7", "other:8")
    monkeypatch.delenv(ADDRESS_ENV)
    assert parse_addresses(None) == (DEFAULT_ADDRESS,)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "no coordinator address"),
        ([], "no coordinator address"),
        ("host", "not host:port"),
        ("host:", "not host:port"),
        (":50051", "not host:port"),
        ("host:99999", "not host:port"),
        ("a:1,b", "'b' is not host:port"),
        ("::1:50051", "brackets"),
        ([1], "must be a string"),
    ],
)
def test_bad_addresses_are_rejected_readably(address: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Client(address)  # type: ignore[arg-type]


async def test_a_host_name_stands_for_every_address_it_resolves_to(coordinator: Coordinator) -> None:
    assert await resolve("10.0.0.1:5") == ["10.0.0.1:5"]
    assert await resolve("[::1]:5") == ["[::1]:5"]
    assert "127.0.0.1:5" in await resolve("localhost:5")
    endpoints = Endpoints(f"localhost:{coordinator.port}")
    seen = []
    for _ in range(3):  # localhost is 127.0.0.1 and maybe ::1: walked in turn
        seen.append(await endpoints.target())
        endpoints.failed(seen[-1], errors.UnavailableError("down"))
    assert f"127.0.0.1:{coordinator.port}" in seen
    # Whichever address comes first (::1 has no coordinator), the client finds the one that answers.
    async with Client(f"localhost:{coordinator.port}", timeout=10) as client:
        assert (await client.cluster_status()).leader_address == coordinator.address


def test_cli_takes_a_comma_list_with_a_dead_address(
    capsys: pytest.CaptureFixture[str], replicas: list[Coordinator]
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    addresses = ",".join([dead, *_leader_not_first(replicas)])
    assert main(["--coordinator", addresses, "types"]) == 0
    capsys.readouterr()
    with SyncClient(addresses) as client:
        client.register_task_type(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
    code = main(["--coordinator", addresses, "--output", "json", "submit", ECHO, "--json", '{"text": "cli"}'])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert '"id"' in out
    code = main(["--coordinator", addresses, "status"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert replicas[0].address in out
    # Locks are served by any replica: the dead address is skipped.
    code = main(["--coordinator", addresses, "lock", "failover-lock", "--wait", "0", "--", "true"])
    assert code == 0, capsys.readouterr().err


def test_cli_names_every_address_when_none_answers_and_rejects_bad_ones(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADDRESS_ENV, "127.0.0.1:1,nonsense")
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nonsense' is not host:port" in err
    unreachable = errors.UnavailableError("failed to connect to all addresses")
    assert describe_error(unreachable, "127.0.0.1:1,127.0.0.1:2") == (
        "cannot reach any coordinator at 127.0.0.1:1, 127.0.0.1:2"
    )
