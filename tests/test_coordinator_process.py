"""The coordinator as a program: configuration, clear failures, clean shutdown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _timing import SLACK, assert_between, retry_unavailable

from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2

pytestmark = pytest.mark.timeout(60)


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    return subprocess.run(
        [sys.executable, "-m", "herder.server", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_unreachable_etcd_is_one_clear_line() -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = _run(["--etcd", dead, "--listen", f"127.0.0.1:{free_port()}"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach etcd" in lines[0] and dead in lines[0], result.stderr


def test_port_in_use_is_one_clear_line(etcd: EmbeddedEtcd) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(["--etcd", etcd.endpoint, "--listen", f"127.0.0.1:{port}"])
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_bad_flags_are_usage_errors() -> None:
    result = _run(["--etcd", "nonsense", "--heartbeat-timeout", "0"])
    assert result.returncode == 2
    assert "--etcd" in result.stderr and "Traceback" not in result.stderr


def test_settings_come_from_environment_variables(etcd: EmbeddedEtcd, namespace: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env.update(HERDER_ETCD=etcd.endpoint, HERDER_LISTEN=f"127.0.0.1:{port}", HERDER_NAMESPACE=namespace)
    process = subprocess.Popen(
        [sys.executable, "-m", "herder.server"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"listening on 127.0.0.1:{port} (namespace {namespace})" in line
    finally:
        process.terminate()
        process.wait(10)


def test_sigterm_steps_down_at_once_so_a_successor_leads_without_waiting(etcd: EmbeddedEtcd, namespace: str) -> None:
    first = Coordinator(etcd.endpoint, namespace, lease_ttl=30)
    second = Coordinator(etcd.endpoint, namespace, lease_ttl=30)
    with first:
        second.start(wait_leader=False)
        try:
            assert not second.is_leader()
            started = time.monotonic()
            assert first.stop() == 0
            second.wait_leader(timeout=15)
            # Well under the 30 s lease: the leader key was released, not left to expire.
            assert time.monotonic() - started < 15
        finally:
            second.kill()


def test_the_first_etcd_endpoint_that_answers_is_used(etcd: EmbeddedEtcd, namespace: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with Coordinator(etcd.endpoint, namespace, extra_args=["--etcd", f"{dead},{etcd.endpoint}"]) as node:
        status = node.status()
        assert status.leader_address == node.address
        assert list(status.etcd_endpoints) == [dead, etcd.endpoint]


def test_coordinator_rides_out_an_etcd_restart(tmp_path: Path, namespace: str) -> None:
    store = EmbeddedEtcd(data_dir=tmp_path, fsync=True).start()
    try:
        with (
            Coordinator(store.endpoint, namespace, accept_unregistered_types=True) as node,
            grpc.insecure_channel(node.address) as channel,
        ):
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            spec = task_pb2.TaskSpec(type="any.thing")
            spec.payload.Pack(task_pb2.Resources())
            before = stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), timeout=5).task
            store.stop()
            store = EmbeddedEtcd(
                data_dir=tmp_path, client_port=store.client_port, peer_port=store.peer_port, fsync=True
            ).start()
            node.wait_leader(timeout=30)
            # The leader may yet step down (its lease could not be refreshed while etcd was away) and
            # lead again: like any client, retry what is UNAVAILABLE meanwhile.
            after = retry_unavailable(lambda: stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), timeout=5).task)
            assert after.id != before.id
            assert stub.GetTask(pb.GetTaskRequest(id=before.id), timeout=5).task.state == task_pb2.TASK_STATE_QUEUED
            # The lease keep-alive and watches were closed cleanly, not left for the garbage collector.
            log = node.log_tail(1_000_000)
            for sign in ("Task was destroyed but it is pending", "already running", "Traceback"):
                assert sign not in log, log
    finally:
        store.stop()


def test_a_restarted_coordinator_leads_within_the_lease_ttl_plus_a_second(etcd: EmbeddedEtcd, namespace: str) -> None:
    """What bounds it is the killed process's lease: etcd deletes the leader key when the lease expires."""
    ttl = 3
    with Coordinator(etcd.endpoint, namespace, lease_ttl=ttl) as node:
        node.kill()
        node.start(wait_leader=False)
        started = time.monotonic()
        node.wait_leader(timeout=30)
        assert_between(time.monotonic() - started, 0.0, ttl + 1.0 + SLACK, "restart to leading")
