"""What `herder` prints and how it exits: snake_case JSON everywhere, a task's spec and shortened payloads,
watched progress, and the documented exit codes. The real binary against a real coordinator."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _cli import HERDER
from _cluster import Coordinator
from _timing import eventually_sync as eventually

from herder.clients import errors, exit_codes
from herder.clients.client import SyncClient
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.exit_codes import UsageError, WaitTimeoutError, exit_code
from herder.clients.proto.examples.v1 import examples_pb2

pytestmark = pytest.mark.timeout(90)


def herder(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`herder --coordinator ADDRESS ARGS` as a process; its exit code, stdout and stderr."""
    return subprocess.run(
        [HERDER, "--coordinator", address, *args], capture_output=True, text=True, timeout=30, check=False
    )


def spawn(address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [HERDER, "--coordinator", address, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=15)


@pytest.fixture
def client(coordinator: Coordinator) -> Iterator[SyncClient]:
    with SyncClient(coordinator.address) as value:
        value.register_task_type("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        value.register_task_type("examples.sleep", examples_pb2.SleepRequest, examples_pb2.SleepResponse)
        yield value


@pytest.fixture
def worker(coordinator: Coordinator, client: SyncClient) -> Iterator[subprocess.Popen[str]]:
    process = spawn(coordinator.address, "worker", "--slots", "2")
    try:
        eventually(lambda: bool(client.nodes()) or process.poll() is not None, timeout=20)
        assert process.poll() is None, process.communicate()
        yield process
    finally:
        stop(process)


def camel_keys(document: Any, path: str = "") -> list[str]:
    """Keys of the document (payloads' fields too) that are not the .proto's snake_case names."""
    if isinstance(document, list):
        return [k for i, item in enumerate(document) for k in camel_keys(item, f"{path}[{i}]")]
    if not isinstance(document, dict):
        return []
    found = [f"{path}.{k}" for k in document if k != k.lower() and not k.startswith("@")]
    return found + [k for key, value in document.items() for k in camel_keys(value, f"{path}.{key}")]


def test_every_json_output_uses_the_proto_field_names(coordinator: Coordinator, client: SyncClient, worker) -> None:
    address = coordinator.address
    submitted = herder(address, "--output", "json", "submit", "examples.echo", "--json", '{"text": "t"}',
                       "--idempotency-key", "snake", "--concurrency-key", "k", "--ttl", "60", "--wait")  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    assert task["spec"]["idempotency_key"] == "snake" and task["spec"]["payload"]["text"] == "t"
    assert task["result"]["text"] == "t" and "create_time" in task and task["created"] is True
    herder(address, "limits", "set", "key", "k", "--weight", "2")
    commands = [
        ("tasks", "get", task["id"]),
        ("tasks", "list"),
        ("tasks", "watch", task["id"]),
        ("queues",),
        ("limits",),
        ("status",),
        ("nodes",),
        ("alerts",),
        ("types",),
        ("types", "get", "examples.echo"),
        ("tasks", "retry", "--state", "failed", "--dry-run"),
        ("tasks", "cancel", "--state", "queued", "--dry-run"),
        ("queues", "pause", "spare"),
        ("queues", "resume", "spare"),
    ]
    for command in commands:
        done = herder(address, "--output", "json", *command)
        assert done.returncode == 0, (command, done.stderr)
        documents = [json.loads(line) for line in done.stdout.splitlines()] if command[1:2] == ("watch",) else [
            json.loads(done.stdout)
        ]  # fmt: skip
        assert camel_keys(documents) == [], command
    status = json.loads(herder(address, "--output", "json", "status").stdout)
    assert status["cluster"]["leader_address"] and status["nodes"][0]["worker_id"]


def test_tasks_get_shows_the_spec_and_shortens_a_large_payload(coordinator: Coordinator, client: SyncClient) -> None:
    text = "x" * 5000
    handle = client.submit(
        "examples.echo", examples_pb2.EchoRequest(text=text), queue="later", concurrency_key="tenant-a",
        idempotency_key="shown", delay=60, ttl=600, timeout=30, tags=["t1"], metadata={"k": "v"},
    )  # fmt: skip
    shown = herder(coordinator.address, "tasks", "get", handle.id)
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("  ")[0]: line for line in shown.stdout.splitlines()}
    for name, value in [("queue", "later"), ("concurrency key", "tenant-a"), ("idempotency key", "shown"),
                        ("ttl", "10m00s"), ("timeout", "30.0s"), ("tags", "t1"), ("metadata", "k=v")]:  # fmt: skip
        assert value in rows.get(name, ""), (name, shown.stdout)
    assert "not before" in rows and text not in shown.stdout
    assert "more bytes; --full shows all)" in shown.stdout
    whole = herder(coordinator.address, "tasks", "get", handle.id, "--full")
    unfolded = "".join(line.strip() for line in whole.stdout.splitlines())  # long values wrap
    assert whole.returncode == 0 and text in unfolded and "--full shows all" not in whole.stdout


def test_tasks_watch_shows_progress(coordinator: Coordinator, client: SyncClient, worker) -> None:
    payload = '{"duration": "1s", "steps": 4}'
    task_id = json.loads(herder(coordinator.address, "--output", "json", "submit", "examples.sleep",
                                "--json", payload).stdout)["id"]  # fmt: skip
    watched = herder(coordinator.address, "--output", "json", "tasks", "watch", task_id)
    assert watched.returncode == 0, watched.stderr
    progress = [e["task"]["progress"] for e in map(json.loads, watched.stdout.splitlines()) if "progress" in e["task"]]
    assert progress and {"fraction", "message", "update_time"} <= set(progress[-1]), watched.stdout
    task_id = client.submit("examples.sleep", examples_pb2.SleepRequest(steps=4, duration={"seconds": 1})).id
    lines = herder(coordinator.address, "tasks", "watch", task_id).stdout.splitlines()
    assert any("%" in line and "slept" in line and "RUNNING" in line for line in lines), lines


def test_a_task_canceled_while_waited_for_exits_1(coordinator: Coordinator, client: SyncClient) -> None:
    waiting = spawn(coordinator.address, "submit", "examples.echo", "--json", "{}", "--wait")
    try:
        tasks = eventually(lambda: client.list()[0], "the submitted task")
        client.cancel(tasks[0].id)
        _, err = waiting.communicate(timeout=30)
    finally:
        stop(waiting)
    assert waiting.returncode == exit_codes.TASK_FAILED and "ended CANCELED" in err and err.count("\n") == 1, err


def test_ctrl_c_while_waiting_prints_the_task_id_and_exits_130(coordinator: Coordinator, client: SyncClient) -> None:
    waiting = spawn(coordinator.address, "submit", "examples.echo", "--json", "{}", "--wait")
    try:
        tasks = eventually(lambda: client.list()[0], "the submitted task")
        time.sleep(0.3)  # let the submit call return and the wait begin
        os.killpg(waiting.pid, signal.SIGINT)
        out, err = waiting.communicate(timeout=30)
    finally:
        stop(waiting)
    assert waiting.returncode == exit_codes.INTERRUPTED, err
    assert err.count("\n") == 1 and tasks[0].id in err and f"herder tasks get {tasks[0].id}" in err, err
    assert "Traceback" not in err and out == ""


def test_a_coordinator_that_cannot_reach_etcd_exits_3(namespace: str) -> None:
    with EmbeddedEtcd(fsync=False) as etcd, Coordinator(etcd.endpoint, namespace) as coordinator:
        etcd.stop()
        done = herder(coordinator.address, "--rpc-timeout", "5", "tasks", "list")
    assert done.returncode == exit_codes.UNREACHABLE, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("herder: ") and done.stdout == "", done.stderr


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.TaskFailedError("failed", task_id="t", state="FAILED"), 1),
        (errors.LockHeldError("held"), 1),
        (UsageError("bad"), 2),
        (errors.UnavailableError("etcd unreachable"), 3),
        (errors.NotLeaderError("no leader"), 3),
        (errors.DeadlineExceededError("slow"), 3),
        (ConnectionRefusedError("refused"), 3),
        (errors.InvalidArgumentError("bad field"), 4),
        (errors.NotFoundError("no such task"), 4),
        (errors.FailedPreconditionError("finished"), 4),
        (errors.AlreadyExistsError("exists"), 4),
        (errors.ResourceExhaustedError("full"), 4),
        (WaitTimeoutError("still running"), 5),
        (RuntimeError("a bug"), 70),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exit_code_table(error: BaseException, code: int) -> None:
    assert exit_code(error) == code
