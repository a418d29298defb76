"""Failover with real processes on a three-member etcd cluster: nothing lost, nothing run twice.

Coordinators, workers and etcd members are separate processes, killed (SIGKILL) or frozen
(SIGSTOP) under load. Workers record every execution ("task_id attempt pid") in a file; the
outcome of every task is read from etcd. The checks (`_check_exactly_once`): every submitted
task has one terminal state, SUCCEEDED, with its own output; no (task, attempt) was executed
twice; no attempt after the final one ran. Tasks that ran more than once are counted and printed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from _cluster import Coordinator
from _etcd_cluster import EtcdCluster
from _helpers import process_group
from _timing import eventually_sync, retry_unavailable
from aetcd import rpc

from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.server import keys
from herder.server._etcd import prefix_end

S = task_pb2.TaskState
ECHO = "examples.echo"
SERVICE = "herder.v1.CoordinatorService"
WORKER = Path(__file__).parent / "_recording_worker.py"
# Losing an attempt to a failover costs one; these tests must never exhaust a task's attempts.
RETRY = task_pb2.RetryPolicy(max_attempts=20)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EtcdCluster]:
    """One three-member etcd for the module; tests that kill members bring them back before they end."""
    with EtcdCluster(3) as value:
        yield value


def _replicas(
    cluster: EtcdCluster, namespace: str, count: int, stack: ExitStack, *, lease_ttl: int = 2, **options: Any
) -> list[Coordinator]:
    """`count` coordinators on every etcd member, the first one leading; killed when `stack` closes
    (their logs are written to stderr, which pytest shows for a failed test)."""
    nodes: list[Coordinator] = []
    for i in range(count):
        node = Coordinator(cluster.endpoints, namespace, lease_ttl=lease_ttl, **options)
        stack.callback(_dump, node)
        nodes.append(node.start(wait_leader=i == 0))
    return nodes


def _dump(node: Coordinator) -> None:
    node.kill()
    sys.stderr.write(f"--- coordinator {node.address} log ---\n{node.log_tail(6000)}\n")
    with contextlib.suppress(OSError):
        node.log_path.unlink()


@contextlib.contextmanager
def _worker(
    log: Path, addresses: Sequence[str], worker_id: str, *, slots: int = 4, work: float = 0.02
) -> Iterator[subprocess.Popen[bytes]]:
    """The recording worker as its own process group, killed at exit whatever happens; its log
    is kept next to the execution log as `<worker_id>.log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    out = log.parent / f"{worker_id}.log"
    args = [sys.executable, str(WORKER), str(log), ",".join(addresses), "--worker-id", worker_id]
    args += ["--slots", str(slots), "--work", str(work)]
    with open(out, "ab") as stream, process_group(args, stdout=stream, env=env) as process:
        yield process


def _leader(nodes: Sequence[Coordinator]) -> Coordinator | None:
    return next((n for n in nodes if n.running and n.is_leader()), None)


def _new_leader(nodes: Sequence[Coordinator], old: Coordinator | None, timeout: float = 30.0) -> Coordinator:
    """The replica other than `old` that leads, once one does."""
    others = [n for n in nodes if n is not old]
    found = eventually_sync(lambda: _leader(others), what="a new leader", timeout=timeout)
    assert found is not None
    return found


def _submit(address: str, count: int, prefix: str, *, batch: int = 500) -> list[str]:
    """Register examples.echo and submit `count` echo tasks in batches, each with an idempotency key
    (so a batch retried after UNAVAILABLE creates nothing twice); their ids, in order."""
    ids: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        contract = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        retry_unavailable(lambda: stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=contract), timeout=10))
        for start in range(0, count, batch):
            specs = [
                task_pb2.TaskSpec(
                    type=ECHO,
                    payload_json=json.dumps({"text": f"{prefix}-{i}"}),
                    idempotency_key=f"{prefix}-{i}",
                    retry=RETRY,
                )
                for i in range(start, min(start + batch, count))
            ]
            request = pb.SubmitTasksRequest(specs=specs)
            reply: pb.SubmitTasksResponse = retry_unavailable(functools.partial(stub.SubmitTasks, request, timeout=30))
            assert all(r.code == 0 for r in reply.results), [r for r in reply.results if r.code][:3]
            ids += [r.task.id for r in reply.results]
    return ids


def _stored_tasks(endpoints: Sequence[str], namespace: str) -> dict[str, task_pb2.Task]:
    """Every task record of the namespace, read from etcd (any member that answers)."""
    prefix = keys.tasks_prefix(keys.prefix(namespace))
    for endpoint in endpoints:
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(endpoint) as channel:
            reply = rpc.KVStub(channel).Range(rpc.RangeRequest(key=prefix, range_end=prefix_end(prefix)), timeout=10)
            tasks = (task_pb2.Task.FromString(kv.value) for kv in reply.kvs)
            return {t.id: t for t in tasks}
    raise AssertionError(f"no etcd member of {endpoints} answered")


def _executions(log: Path) -> list[tuple[str, int, int]]:
    """(task_id, attempt, pid) for every execution recorded so far."""
    if not log.exists():
        return []
    rows = []
    # A line being written as we read is left for the next read.
    for line in log.read_text().split("\n")[:-1]:
        task_id, attempt, pid, _ = line.split()
        rows.append((task_id, int(attempt), int(pid)))
    return rows


def _all_finished(endpoints: Sequence[str], namespace: str, count: int) -> bool:
    tasks = _stored_tasks(endpoints, namespace)
    return len(tasks) == count and all(t.state == S.TASK_STATE_SUCCEEDED for t in tasks.values())


def _check_exactly_once(tasks: dict[str, task_pb2.Task], runs: list[tuple[str, int, int]], ids: list[str]) -> int:
    """Assert the guarantees (module docstring); the number of tasks executed more than once."""
    assert set(tasks) == set(ids), f"lost {len(set(ids) - set(tasks))}, unexpected {len(set(tasks) - set(ids))}"
    states = Counter(S.Name(t.state) for t in tasks.values())
    assert states == {"TASK_STATE_SUCCEEDED": len(ids)}, states
    for task in tasks.values():
        output = examples_pb2.EchoResponse()
        assert task.result.Unpack(output) and output.text, task.id
    pairs = Counter((task_id, attempt) for task_id, attempt, _ in runs)
    doubled = {pair: n for pair, n in pairs.items() if n > 1}
    assert not doubled, f"{len(doubled)} (task, attempt) pairs executed twice, e.g. {list(doubled.items())[:5]}"
    late = [(t, a) for t, a, _ in runs if a > tasks[t].attempt]
    assert not late, f"attempts executed after the task's final attempt: {late[:5]}"
    never = set(ids) - {t for t, _, _ in runs}
    assert not never, f"{len(never)} tasks succeeded without a recorded execution, e.g. {sorted(never)[:3]}"
    per_task = Counter(task_id for task_id, _, _ in runs)
    rerun = [t for t, n in per_task.items() if n > 1]
    for task_id in rerun:
        # Each earlier attempt ended without an accepted result: its worker was lost or never confirmed it.
        task = tasks[task_id]
        assert len(task.attempt_errors) >= per_task[task_id] - 1, (task_id, list(task.attempt_errors))
    return len(rerun)


def _wait_executions(log: Path, at_least: int, timeout: float = 60.0) -> None:
    eventually_sync(lambda: len(_executions(log)) >= at_least, what=f"{at_least} executions", timeout=timeout)


@pytest.mark.timeout(180)
def test_leader_killed_twice_under_load_loses_and_doubles_nothing(
    cluster: EtcdCluster, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "executions.log"
    count = 2000
    with ExitStack() as stack:
        nodes = _replicas(cluster, namespace, 3, stack, heartbeat_timeout=3.0, ack_timeout=3.0)
        addresses = [n.address for n in nodes]
        ids = _submit(nodes[0].address, count, "load")
        for name in ("w1", "w2"):
            stack.enter_context(_worker(log, addresses, name, slots=4, work=0.02))
        leader = nodes[0]
        for kill in range(2):
            _wait_executions(log, (kill + 1) * count // 4)
            killed_at = time.monotonic()
            leader.kill()
            leader = _new_leader(nodes, leader)
            before = len(_executions(log))
            _wait_executions(log, before + 1)
            print(f"kill {kill + 1}: first execution on the new leader after {time.monotonic() - killed_at:.2f}s")
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, count), what="every task done", timeout=90)
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
    rerun = _check_exactly_once(tasks, runs, ids)
    print(f"{count} tasks, {len(runs)} executions, {rerun} tasks re-ran after the two leader kills")


def test_a_killed_leader_is_replaced_before_its_lease_runs_out(cluster: EtcdCluster, namespace: str) -> None:
    with ExitStack() as stack:
        old, follower = _replicas(cluster, namespace, 2, stack, lease_ttl=10)
        killed_at = time.monotonic()
        old.kill()
        # The follower finds nothing listening at the leader's address and ends its term.
        assert _new_leader([old, follower], old, timeout=8) is follower
        took = time.monotonic() - killed_at
        assert "its process is gone; ending its term" in follower.log_tail()
    print(f"new leader {took:.2f}s after the kill, with a 10 s lease")


def test_results_finished_during_a_failover_are_delivered_to_the_new_leader(
    cluster: EtcdCluster, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "executions.log"
    with ExitStack() as stack:
        nodes = _replicas(cluster, namespace, 2, stack, heartbeat_timeout=3.0)
        ids = _submit(nodes[0].address, 4, "carry")
        # Each attempt ends while no leader is reachable: its result waits in the worker for the next session.
        stack.enter_context(_worker(log, [n.address for n in nodes], "w1", slots=4, work=0.3))
        _wait_executions(log, 4)
        nodes[0].kill()
        new = _new_leader(nodes, nodes[0])
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, 4), what="the results accepted")
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
        worker_log = (tmp_path / "w1.log").read_text()
    assert _check_exactly_once(tasks, runs, ids) == 0
    assert len(runs) == 4, "a re-claimed attempt ran again"
    assert all(t.attempt == 1 and t.worker_id == "w1" and not t.attempt_errors for t in tasks.values())
    assert re.search(rf"connected to {new.address} \(session \w+, 4 reclaimed, 0 rejected\)", worker_log), worker_log


def test_with_probing_off_a_killed_leader_is_replaced_when_its_lease_expires(
    cluster: EtcdCluster, namespace: str
) -> None:
    with ExitStack() as stack:
        nodes = _replicas(cluster, namespace, 2, stack, lease_ttl=3, extra_args=("--leader-probe-interval", "0"))
        killed_at = time.monotonic()
        nodes[0].kill()
        assert _new_leader(nodes, nodes[0]) is nodes[1]
        took = time.monotonic() - killed_at
        assert "ending its term" not in nodes[1].log_tail()
    # Its last refresh came at most a third of the TTL before the kill.
    assert took >= 3 * 2 / 3 - 0.1, took


def test_frozen_leader_is_fenced_and_steps_down(cluster: EtcdCluster, namespace: str, tmp_path: Path) -> None:
    log = tmp_path / "executions.log"
    count = 400
    with ExitStack() as stack:
        nodes = _replicas(cluster, namespace, 2, stack, lease_ttl=2)
        old, other = nodes
        ids = _submit(old.address, count, "frozen")
        stack.enter_context(_worker(log, [n.address for n in nodes], "w1", slots=4, work=0.05))
        _wait_executions(log, 50)
        old.freeze()
        frozen_at = time.monotonic()
        assert _new_leader(nodes, old) is other
        # Past its lease for sure, while the worker moves to the new leader.
        eventually_sync(lambda: time.monotonic() - frozen_at > 4, what="the lease to run out", timeout=10)
        old.resume()
        eventually_sync(lambda: "lost leadership" in old.log_tail(20000), what="the old leader stepping down")
        eventually_sync(lambda: not old.is_leader(), what="the old leader refusing leader calls")
        eventually_sync(lambda: old.status().leader_address == other.address, what="the old leader naming the new one")
        assert other.is_leader()
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, count), what="every task done", timeout=60)
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
        old_log = old.log_tail(50000)
    rerun = _check_exactly_once(tasks, runs, ids)
    fenced = "fence no longer matches" in old_log
    # The replica's lease (which carries the leader key) seen to run out: it then sends no write at all.
    expired = bool(re.search(r"replica lease \w+ (could not be refreshed in time|expired)", old_log))
    assert fenced or expired, old_log[-3000:]
    print(f"frozen leader: fence rejected a write: {fenced}; saw its lease run out: {expired}; {rerun} re-ran")


def test_frozen_worker_is_replaced_and_its_late_results_are_refused(
    cluster: EtcdCluster, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "executions.log"
    with ExitStack() as stack:
        (node,) = _replicas(cluster, namespace, 1, stack, heartbeat_timeout=2.0)
        ids = _submit(node.address, 4, "zombie")
        zombie = stack.enter_context(_worker(log, [node.address], "zombie", slots=4, work=1.0))
        _wait_executions(log, 4)
        os.killpg(zombie.pid, signal.SIGSTOP)
        stack.callback(lambda: os.killpg(zombie.pid, signal.SIGCONT) if zombie.poll() is None else None)
        eventually_sync(lambda: "missed its heartbeats" in node.log_tail(), what="the zombie's session closing")
        stack.enter_context(_worker(log, [node.address], "rescuer", slots=4, work=0.01))
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, 4), what="the rescuer finishing")
        os.killpg(zombie.pid, signal.SIGCONT)
        zombie_log = tmp_path / "zombie.log"
        # Its handlers end (their 4 s have passed) and it reconnects: its attempts are not its own any more.
        eventually_sync(
            lambda: re.search(r"connected to .* \(session \w+, 0 reclaimed, 4 rejected\)", zombie_log.read_text()),
            what="the zombie reconnecting as a new session",
        )
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
    assert _check_exactly_once(tasks, runs, ids) == 4
    assert {t.worker_id for t in tasks.values()} == {"rescuer"}
    assert all([e.type for e in t.attempt_errors] == ["herder.worker_lost"] for t in tasks.values())
    print(zombie_log.read_text()[-2000:])


@pytest.mark.parametrize("victim", ["raft-leader", "connected"])
def test_losing_one_etcd_member_under_load_is_a_short_stall(
    cluster: EtcdCluster, namespace: str, tmp_path: Path, victim: str
) -> None:
    """`raft-leader`: etcd elects a new leader. `connected`: the member every coordinator talks to
    (the first endpoint): the leader's commits fail, it steps down and leads again through another."""
    log = tmp_path / "executions.log"
    count = 600
    with ExitStack() as stack:
        # The default lease TTL (5 s): its trust window (TTL minus a refresh interval) outlasts an etcd election.
        nodes = _replicas(cluster, namespace, 2, stack, lease_ttl=5)
        ids = _submit(nodes[0].address, count, "member")
        stack.enter_context(_worker(log, [n.address for n in nodes], "w1", slots=4, work=0.02))
        _wait_executions(log, 100)
        index = 0
        if victim == "raft-leader":
            (etcd_leader,) = [m for m in nodes[0].status().etcd_members if m.leader]
            index = next(
                i for i, e in enumerate(cluster.endpoints) if any(u.endswith(e) for u in etcd_leader.client_urls)
            )
        stack.callback(_bring_back, cluster, index)
        cluster.kill(index)
        killed_at = time.monotonic()
        before = len(_executions(log))
        _wait_executions(log, before + 50, timeout=30)
        stall = time.monotonic() - killed_at
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, count), what="every task done", timeout=60)
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
    rerun = _check_exactly_once(tasks, runs, ids)
    print(f"killed etcd member {index} ({victim}): 50 more executions after {stall:.2f}s; {rerun} re-ran")
    # Shorter than waiting out the leader's lease, or etcd's own request timeout for a transaction
    # caught in its raft election (the committer gives up on one after CommitLimits.timeout).
    assert stall < 5, "a stall as long as the lease"


@pytest.mark.timeout(150)
def test_losing_etcd_quorum_is_unavailable_then_recovers_without_restart(
    cluster: EtcdCluster, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "executions.log"
    with ExitStack() as stack:
        nodes = _replicas(cluster, namespace, 2, stack, lease_ttl=3)
        leader, follower = nodes
        ids = _submit(leader.address, 20, "before")
        stack.enter_context(_worker(log, [n.address for n in nodes], "w1", slots=4, work=0.01))
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, 20), what="the first tasks done")
        for i in (1, 2):
            stack.callback(_bring_back, cluster, i)
        lost_at = time.monotonic()
        cluster.kill(1)
        cluster.kill(2)
        # The leader cannot refresh its lease: it must stop before the lease could run out.
        eventually_sync(lambda: leader.health(SERVICE) == "NOT_SERVING", what="the leader not serving", timeout=10)
        stepped_down = time.monotonic() - lost_at
        eventually_sync(lambda: follower.health(SERVICE) == "NOT_SERVING", what="the follower not serving", timeout=10)
        assert leader.health("") == "SERVING"  # alive: no restart needed
        for node in nodes:
            error = _submit_error(node)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error  # type: ignore[attr-defined]
            assert "cannot reach an etcd quorum" in error.details(), error  # type: ignore[attr-defined]
            print(f"{node.address} during quorum loss: UNAVAILABLE {error.details()}")  # type: ignore[attr-defined]
        assert "could not be refreshed in time" in leader.log_tail(20000)
        cluster.restart(1)
        cluster.restart(2)
        cluster.wait_writable(20)
        new = _new_leader(nodes, None)
        for node in nodes:
            eventually_sync(functools.partial(_serving, node), what=f"{node.address} serving")
        more = _submit(new.address, 20, "after")
        eventually_sync(lambda: _all_finished(cluster.endpoints, namespace, 40), what="the later tasks done")
        tasks = _stored_tasks(cluster.endpoints, namespace)
        runs = _executions(log)
    _check_exactly_once(tasks, runs, ids + more)
    print(f"quorum lost: leader not serving after {stepped_down:.2f}s (lease TTL 3s)")
    assert stepped_down < 3, "the leader kept serving past its lease"


def _bring_back(cluster: EtcdCluster, index: int) -> None:
    """Restart a killed member (if it is not running) and wait for quorum, for the next test."""
    if not cluster.members[index].running:
        cluster.restart(index)
    cluster.wait_writable()


def _submit_error(node: Coordinator) -> grpc.RpcError:
    spec = task_pb2.TaskSpec(type=ECHO, payload_json='{"text": "x"}')
    with grpc.insecure_channel(node.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), timeout=10)
    return caught.value


def _serving(node: Coordinator) -> bool:
    return node.health(SERVICE) == "SERVING"
