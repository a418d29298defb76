"""The `herder` command line against a real etcd, coordinator and example worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import HERDER, register_examples, run
from _cluster import Coordinator

from herder.clients.client import SyncClient
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.server import keys
from herder.server._etcd import Etcd, prefix_end

pytestmark = pytest.mark.timeout(90)


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [HERDER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def stop(process: subprocess.Popen[str], sig: int = signal.SIGKILL) -> tuple[str, str]:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        return process.communicate(timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def worker(coordinator: Coordinator) -> Iterator[subprocess.Popen[str]]:
    """`herder worker` serving the example types, connected before the test starts."""
    process = spawn("worker", "--coordinator", coordinator.address, "--slots", "2")
    try:
        with SyncClient(coordinator.address) as client:
            deadline = time.monotonic() + 20
            while not client.nodes():
                assert process.poll() is None, stop(process)
                assert time.monotonic() < deadline, "the worker did not connect"
                time.sleep(0.05)
        yield process
    finally:
        stop(process, signal.SIGTERM)


@pytest.fixture
def address(coordinator: Coordinator) -> str:
    """The coordinator's address, with the example task types registered."""
    return register_examples(coordinator.address)


def submit_json(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> dict[str, object]:
    code, out, err = run(capsys, "--coordinator", address, "--output", "json", "submit", *args)
    assert code == 0, err
    document: dict[str, object] = json.loads(out)
    return document


def test_submit_wait_prints_the_result(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    code, out, err = run(
        capsys, "submit", "examples.echo", "--json", '{"text": "hello cli"}', "--wait", "--coordinator", address
    )
    assert code == 0, err
    assert "SUCCEEDED" in out and "hello cli" in out


def test_submit_wait_json(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    task = submit_json(capsys, address, "examples.echo", "--json", '{"text": "j"}', "--wait", "--wait-timeout", "20")
    assert task["state"] == "TASK_STATE_SUCCEEDED"
    # The result is an object in the proto JSON mapping, once: no result_json string beside it.
    assert task["result"] == {"@type": "type.googleapis.com/herder.examples.v1.EchoResponse", "text": "j"}
    assert "result_json" not in task and task["created"] is True


def test_a_failed_task_exits_1_with_one_line(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    code, out, err = run(
        capsys, "--coordinator", address, "submit", "examples.flaky", "--json", '{"failAttempts": 3}',
        "--max-attempts", "1", "--wait",
    )  # fmt: skip
    assert code == 1 and "FAILED" in out
    assert err.count("\n") == 1 and err.startswith("herder: task ") and "ended FAILED" in err


def test_wait_timeout_exits_5(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, _, err = run(capsys, "--coordinator", address, "submit", "examples.echo", "--json", "{}", "--wait",
                       "--wait-timeout", "0.2")  # fmt: skip
    assert code == 5 and "timed out after 0.2s" in err and "QUEUED" in err and err.count("\n") == 1


def test_submit_options_and_get(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    task = submit_json(
        capsys, address, "examples.echo", "--json", '{"text": "later"}', "--queue", "slow", "--priority", "7",
        "--delay", "60", "--tag", "a", "--tag", "b", "--meta", "k=v", "--idempotency-key", "key-1",
    )  # fmt: skip
    assert (task["state"], task["spec"]["queue"], task["spec"]["priority"]) == ("TASK_STATE_PENDING", "slow", 7)  # type: ignore[index]
    assert task["spec"]["tags"] == ["a", "b"] and task["spec"]["metadata"] == {"k": "v"}  # type: ignore[index]
    code, out, _ = run(capsys, "--coordinator", address, "tasks", "get", str(task["id"]))
    assert code == 0 and "PENDING" in out and "slow" in out and '"text": "later"' in out
    again = submit_json(capsys, address, "examples.echo", "--json", "{}", "--idempotency-key", "key-1")
    assert again["id"] == task["id"] and (task["created"], again["created"]) == (True, False)


def test_tasks_list_filters(capsys: pytest.CaptureFixture[str], address: str) -> None:
    ids = [str(submit_json(capsys, address, "examples.echo", "--json", "{}", "--tag", "mine")["id"]) for _ in range(3)]
    submit_json(capsys, address, "examples.echo", "--json", "{}")
    code, out, _ = run(capsys, "--coordinator", address, "--output", "json", "tasks", "list", "--tag", "mine")
    assert code == 0 and sorted(t["id"] for t in json.loads(out)) == sorted(ids)
    code, out, _ = run(capsys, "tasks", "list", "--coordinator", address, "--state", "queued", "--limit", "2")
    assert code == 0 and out.count("QUEUED") == 2
    code, out, _ = run(capsys, "tasks", "list", "--coordinator", address, "--state", "failed")
    assert code == 0 and "no tasks" in out


def test_tasks_cancel(capsys: pytest.CaptureFixture[str], address: str) -> None:
    task_id = str(submit_json(capsys, address, "examples.echo", "--json", "{}")["id"])
    code, out, _ = run(capsys, "--coordinator", address, "tasks", "cancel", task_id, "--reason", "test")
    assert code == 0 and "canceled" in out
    code, _, err = run(capsys, "--coordinator", address, "tasks", "cancel", task_id)
    assert code == 4 and err.startswith("herder: ") and err.count("\n") == 1, "refused: already finished"


def test_types_and_status(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    code, out, _ = run(capsys, "--coordinator", address, "types")
    assert code == 0 and "examples.echo" in out and "herder.examples.v1.EchoRequest" in out
    code, out, _ = run(capsys, "--coordinator", address, "--output", "json", "types")
    assert code == 0 and {t["name"] for t in json.loads(out)} >= {"examples.echo", "examples.sleep"}
    code, out, _ = run(capsys, "--coordinator", address, "status")
    assert code == 0 and address in out and "leader" in out and "examples.echo" in out
    code, out, _ = run(capsys, "--coordinator", address, "--output", "json", "status")
    document = json.loads(out)
    assert document["cluster"]["leader_address"] == address and len(document["nodes"]) == 1


def test_unreachable_coordinator_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--coordinator", "127.0.0.1:1", "tasks", "list")
    assert (code, out, err) == (3, "", "herder: cannot reach the coordinator at 127.0.0.1:1\n")


def test_environment_names_the_coordinator(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERDER_COORDINATOR", "127.0.0.1:2")
    code, _, err = run(capsys, "status")
    assert code == 3 and "127.0.0.1:2" in err


def test_not_found_is_one_line(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, _, err = run(capsys, "--coordinator", address, "tasks", "get", "nope")
    assert code == 4 and err.startswith("herder: ") and err.count("\n") == 1


def test_invalid_input_is_reported_with_its_field(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, _, err = run(capsys, "--coordinator", address, "submit", "examples.echo", "--json", '{"bogus": 1}')
    assert code == 4 and "spec.payload_json" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        ("submit", "examples.echo", "--json", "{not json"),
        ("submit", "examples.echo", "--json", "@/no/such/file"),
        ("submit", "examples.echo", "--meta", "novalue"),
        ("submit", "examples.echo", "--delay", "-1"),
        ("tasks", "list", "--state", "sleeping"),
        ("tasks",),
        ("frobnicate",),
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], args: tuple[str, ...]) -> None:
    code, _, err = run(capsys, "--coordinator", "127.0.0.1:1", *args)
    assert code == 2 and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--priority", "99999999999"), "--priority"),
        (("--priority", "-3000000000"), "--priority"),
        (("--delay", "1e12"), "--delay"),
        (("--timeout", "1e15"), "--timeout"),
        (("--ttl", "1e300"), "--ttl"),
        (("--max-attempts", "99999999999999"), "--max-attempts"),
        (("--json", "@NOT_UTF8"), "--json"),
    ],
)
def test_out_of_range_options_are_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], named: str
) -> None:
    not_utf8 = tmp_path / "payload.json"
    not_utf8.write_bytes(b'\xff\xfe{"text": "x"}')
    args = tuple(a.replace("NOT_UTF8", str(not_utf8)) for a in args)
    code, out, err = run(capsys, "--coordinator", "127.0.0.1:1", "submit", "examples.echo", *args)
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("herder: ") and named in err, err
    assert "unexpected error" not in err and "Error" not in err


def test_submit_json_from_a_file(capsys: pytest.CaptureFixture[str], address: str, tmp_path: Path) -> None:
    path = tmp_path / "input.json"
    path.write_text('{"text": "from file"}')
    task = submit_json(capsys, address, "examples.echo", "--json", f"@{path}")
    request = examples_pb2.EchoRequest()
    with SyncClient(address) as client:
        assert client.get(str(task["id"])).spec.payload.Unpack(request)
    assert request.text == "from file"


def test_watch_streams_until_ctrl_c(address: str) -> None:
    with SyncClient(address) as client:
        handle = client.submit("examples.echo", examples_pb2.EchoRequest(text="watched"))
        # A filter, not the id: a watch of named tasks ends by itself once they finish.
        watcher = spawn("--coordinator", address, "--output", "json", "tasks", "watch", "--type", "examples.echo")
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            assert (first["task"]["id"], first["task"]["state"], first["initial"]) == (
                handle.id,
                "TASK_STATE_QUEUED",
                True,
            )
            client.cancel(handle.id)
            second = json.loads(watcher.stdout.readline())
            assert second["task"]["state"] == "TASK_STATE_CANCELED"
            assert watcher.poll() is None
        finally:
            _, err = stop(watcher, signal.SIGINT)
    assert watcher.returncode == 0 and err == ""


def test_watch_table_lines(capsys: pytest.CaptureFixture[str], address: str) -> None:
    with SyncClient(address) as client:
        handle = client.submit("examples.echo", examples_pb2.EchoRequest(text="watched"))
        client.cancel(handle.id)
    code, out, _ = run(capsys, "--coordinator", address, "tasks", "watch", handle.id, "--state", "canceled")
    assert code == 0 and handle.id in out and "CANCELED" in out


def test_subprocess_decodes_results_with_registered_descriptors(address: str, worker: object) -> None:
    with SyncClient(address) as client:
        handle = client.submit("examples.sleep", examples_pb2.SleepRequest())
        handle.result(timeout=20)
    # A fresh process has no generated class imported for the result: it uses the registered descriptors.
    done = subprocess.run(
        [HERDER, "--coordinator", address, "--output", "json", "tasks", "get", handle.id],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["result"]["@type"] == "type.googleapis.com/herder.examples.v1.SleepResponse"


def test_coordinator_command_runs_the_server(etcd: EmbeddedEtcd, namespace: str) -> None:
    with Coordinator(etcd.endpoint, namespace, launcher=[HERDER, "coordinator"]) as node:
        assert node.is_leader()
    done = subprocess.run([HERDER, "coordinator", "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0 and "--etcd" in done.stdout


def lock_command(address: str, name: str, *options: str, script: str) -> list[str]:
    return [HERDER, "lock", name, "--coordinator", address, *options, "--", sys.executable, "-c", script]


def test_lock_runs_a_command_with_the_token_and_exits_with_its_code(address: str) -> None:
    script = "import os, sys; print('token', os.environ['HERDER_LOCK_TOKEN']); sys.exit(3)"
    command = lock_command(address, "cli", "--ttl", "5", script=script)
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 3, done.stderr
    assert int(done.stdout.split()[1]) > 0


def test_lock_held_elsewhere_is_one_line(address: str) -> None:
    with SyncClient(address) as client, client.lock("cli-held", ttl=10, wait=0):
        command = lock_command(address, "cli-held", "--wait", "0", script="print('ran')")
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "held" in done.stderr


def test_a_lost_lock_stops_the_command(address: str, etcd: EmbeddedEtcd, namespace: str) -> None:
    script = "import time; print('started', flush=True); time.sleep(60)"
    process = spawn("lock", "cli-lost", "--coordinator", address, "--ttl", "3", "--", sys.executable, "-c", script)
    try:
        assert process.stdout is not None and process.stdout.readline() == "started\n"
        asyncio.run(_revoke_lock_leases(etcd.endpoint, keys.lock_prefix(keys.prefix(namespace), "cli-lost")))
        _, err = process.communicate(timeout=30)
    finally:
        stop(process)
    assert process.returncode == 1
    assert err.count("\n") == 1 and "was lost" in err


async def _revoke_lock_leases(endpoint: str, prefix: bytes) -> None:
    """Revoke the leases of a lock's keys behind their holders' backs."""
    kv = Etcd([endpoint])
    await kv.connect()
    try:
        found, _, _ = await kv.range(prefix, prefix_end(prefix))
        assert found, "nobody holds the lock"
        for item in found:
            await kv.revoke(item.lease)
    finally:
        await kv.close()
