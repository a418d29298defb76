"""Task type versions against a real etcd and coordinator: no-op re-registration, compatible changes,
refused and forced incompatible ones, the version a task records, workers refused, `herder types get`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _helpers import process_group
from _protos import message_classes, task_type
from _timing import eventually
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.cli import main
from herder.clients.client import Client
from herder.clients.embedded_etcd import free_port
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2
from herder.clients.worker import TaskContext, Worker, WorkerSettings
from herder.server.contracts import TaskTypeRegistry, hello_versions_refused

pytestmark = pytest.mark.timeout(60)

NAME = "images.resize"
V1 = 'syntax = "proto3";\npackage img.v1;\nmessage In { int32 width = 1; }\nmessage Out { bytes data = 1; }\n'
V2 = V1.replace("int32 width = 1;", "int32 width = 1; int32 height = 2;")
BROKEN = V1.replace("int32 width = 1;", "string width = 1;")
FAST = WorkerSettings(backoff=Backoff(initial=0.05, max=0.3), connect_timeout=5.0)


async def register(client: Client, text: str, description: str = "", *, force: bool = False) -> task_pb2.TaskType:
    input_class, output_class = message_classes(text)
    return await client.register_task_type(NAME, input_class, output_class, description, force=force)


async def test_registering_the_same_messages_again_keeps_version_and_description(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        first = await register(client, V1, "resizes images")
        again = await register(client, V1)  # a restarting worker registers without a description

        stored = await client.get_task_type(NAME)

    assert again == first
    assert (stored.version, stored.description) == (1, "resizes images")
    assert stored.register_time == first.register_time
    assert [v.version for v in stored.versions] == [1]


async def test_a_compatible_change_is_a_new_version_and_tasks_record_it(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1, "resizes images")
        await register(client, V2)
        handle = await client.submit(NAME, json={"width": 3, "height": 4})

        stored = await client.get_task_type(NAME)

    assert (stored.version, stored.description, stored.compatible_since, stored.forced) == (
        2,
        "resizes images",
        1,
        False,
    )
    assert list(stored.changes) == ["input_type:img.v1.In.height: field 2 (int32) added"]
    assert [v.version for v in stored.versions] == [2, 1]
    assert all(v.registered_by.startswith("client ") for v in stored.versions)
    assert handle.task.type_version == 2


async def test_an_incompatible_change_is_refused_with_a_violation_per_breaking_change(
    coordinator: Coordinator,
) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1)
        with pytest.raises(errors.FailedPreconditionError) as refused:
            await register(client, BROKEN)
        stored = await client.get_task_type(NAME)

    assert [(v.field, v.description) for v in refused.value.violations] == [
        ("task_type.input_type:img.v1.In.width", "field 1's type changed from int32 to string")
    ]
    assert "register with force" in refused.value.message
    assert stored.version == 1 and len(stored.versions) == 1


async def test_the_violations_are_readable_with_grpc_status(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1)
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        request = coordinator_pb2.RegisterTaskTypeRequest(task_type=task_type(BROKEN, name=NAME))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.RegisterTaskType(request, timeout=10)

    status = rpc_status.from_call(failed.value)
    assert status is not None and failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(details)
    assert [v.field for v in details.field_violations] == ["task_type.input_type:img.v1.In.width"]


async def test_force_accepts_an_incompatible_change_and_logs_it(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1)
        forced = await register(client, BROKEN, force=True)

    assert (forced.version, forced.forced, forced.compatible_since) == (2, True, 2)
    assert list(forced.changes) == ["breaking: input_type:img.v1.In.width: field 1's type changed from int32 to string"]
    await eventually(lambda: _logged(coordinator, "version 2 forced by"), what="the forced registration's warning")


async def _logged(coordinator: Coordinator, text: str) -> bool:
    return text in coordinator.log_tail(20000)


async def test_a_hello_declaring_a_version_before_a_forced_change_is_refused(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1)
        await register(client, BROKEN, force=True)
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call = coordinator_pb2_grpc.CoordinatorServiceStub(channel).Connect(timeout=10)
        hello = coordinator_pb2.WorkerHello(worker_id="old", task_types=[NAME], slots=1, type_versions={NAME: 1})
        await call.write(coordinator_pb2.ConnectRequest(hello=hello))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = errors.from_rpc_error(refused.value)
    assert [v.field for v in error.violations] == [f"hello.type_versions[{NAME}]"]
    assert "version 2 was forced" in error.violations[0].description


@pytest.mark.parametrize(
    ("declared", "refused"),
    [
        (0, ""),
        (
            1,
            "images.resize version 1 is incompatible with the registered version 3:"
            " version 2 was forced over breaking changes",
        ),
        (2, ""),
        (3, ""),
        (4, "version 4 of images.resize was never registered (latest: 3)"),
    ],
)
def test_which_declared_versions_a_hello_is_refused_for(declared: int, refused: str) -> None:
    registry = TaskTypeRegistry()
    current = task_type(V2, name=NAME)
    current.version, current.compatible_since = 3, 2
    registry.put(current)
    hello = coordinator_pb2.WorkerHello(worker_id="w", task_types=[NAME], slots=1, type_versions={NAME: declared})

    found = hello_versions_refused(hello, registry)

    assert [v.description for v in found] == ([refused] if refused else [])


async def test_a_worker_whose_messages_are_incompatible_stops_with_a_clear_error(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1)
    input_class, output_class = message_classes(BROKEN)
    worker = Worker(coordinator.address, settings=FAST)

    async def resize(request: object, ctx: TaskContext) -> object:
        return output_class()

    worker.add_task(NAME, resize, input_type=input_class, output_type=output_class)

    with pytest.raises(errors.FailedPreconditionError) as refused:
        await asyncio.wait_for(worker.run(), 20)

    assert "not wire- and JSON-compatible" in str(refused.value)
    assert "img.v1.In.width: field 1's type changed from int32 to string" in str(refused.value)


async def test_a_connected_worker_is_refused_after_a_forced_change_when_it_reconnects(
    coordinator: Coordinator,
) -> None:
    input_class, output_class = message_classes(V1)
    worker = Worker(coordinator.address, settings=FAST)

    async def resize(request: object, ctx: TaskContext) -> object:
        return output_class()

    worker.add_task(NAME, resize, input_type=input_class, output_type=output_class)
    running = asyncio.create_task(worker.run())
    try:
        await worker.wait_connected(15)
        async with Client(coordinator.address) as client:
            await register(client, BROKEN, force=True)
        coordinator.restart()  # the worker reconnects, declaring version 1

        with pytest.raises(errors.FailedPreconditionError) as refused:
            await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)

    assert [v.field for v in refused.value.violations] == [f"hello.type_versions[{NAME}]"]


async def test_herder_types_get_shows_versions_and_messages(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Client(coordinator.address) as client:
        await register(client, V1, "resizes images")
        await register(client, V2)

    code = await asyncio.to_thread(main, ["--coordinator", coordinator.address, "types", "get", NAME])
    out, err = capsys.readouterr()

    assert code == 0, err
    assert "resizes images" in out
    assert "input_type:img.v1.In.height: field 2 (int32) added" in out
    assert "messages (version 2)" in out
    assert "message In {\n  int32 width = 1;\n  int32 height = 2;\n}" in out

    code = await asyncio.to_thread(
        main, ["--coordinator", coordinator.address, "--output", "json", "types", "get", NAME, "--version", "1"]
    )
    document = json.loads(capsys.readouterr().out)

    assert code == 0
    assert [v["version"] for v in document["versions"]] == [2, 1]
    assert "int32 height" not in document["proto"]
    assert "descriptors" not in document


async def test_herder_types_get_of_an_unknown_type_is_one_line(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await asyncio.to_thread(main, ["--coordinator", coordinator.address, "types", "get", "nope"])
    _, err = capsys.readouterr()

    assert code == 4
    assert err == "herder: task type nope is not registered\n"


async def _register_conflicting_echo(address: str) -> None:
    """examples.echo registered with `text` as an int32, where the example messages have a string."""
    echo = V1.replace("package img.v1;", "package herder.examples.v1;").replace("int32 width = 1;", "int32 text = 1;")
    contract = task_type(echo, name="examples.echo")
    contract.descriptors.file[0].message_type[0].name = "EchoRequest"
    contract.descriptors.file[0].message_type[1].name = "EchoResponse"
    contract.input_type, contract.output_type = "herder.examples.v1.EchoRequest", "herder.examples.v1.EchoResponse"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.RegisterTaskType(coordinator_pb2.RegisterTaskTypeRequest(task_type=contract), timeout=10)


async def test_a_supervisor_whose_handler_is_incompatible_exits_with_one_line(coordinator: Coordinator) -> None:
    await _register_conflicting_echo(coordinator.address)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    handler = [sys.executable, str(Path(__file__).with_name("_plain_handler.py")), "--port", str(port)]
    command = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address]
    command += ["--handler", f"127.0.0.1:{port}", "--log-level", "error"]
    with process_group(handler), process_group(command, env=env, stdout=subprocess.PIPE) as process:
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)

    text = output.decode()
    assert process.returncode == 1, text
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("herder supervisor: the coordinator refused: task type examples.echo:")
    assert "herder.examples.v1.EchoRequest.text: field 1's type changed from int32 to string" in last


async def test_herder_worker_with_incompatible_messages_exits_with_one_line(coordinator: Coordinator) -> None:
    await _register_conflicting_echo(coordinator.address)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    herder = str(Path(sys.executable).parent / "herder")
    command = [herder, "worker", "--coordinator", coordinator.address]
    with process_group(command, env=env, stdout=subprocess.PIPE) as process:
        output, _ = await asyncio.to_thread(process.communicate, timeout=30)

    text = output.decode()
    assert process.returncode == 4, text
    assert "Traceback" not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("herder: task type examples.echo: the new messages are not wire- and JSON-compatible")


async def test_herder_types_register_refuses_an_incompatible_change_unless_forced(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    source = tmp_path / "img.proto"

    async def register_file(text: str, *extra: str) -> tuple[int, str, str]:
        await asyncio.to_thread(source.write_text, text)
        args = ["--coordinator", coordinator.address, "types", "register", NAME, "--input", "img.v1.In"]
        args += ["--output", "img.v1.Out", "--proto-path", str(tmp_path), "img.proto", *extra]
        code = await asyncio.to_thread(main, args)
        out, err = capsys.readouterr()
        return code, out, err

    assert (await register_file(V1))[0] == 0
    code, _, err = await register_file(BROKEN)
    assert code == 4
    assert err.startswith(f"herder: task type {NAME}: the new messages are not wire- and JSON-compatible")
    assert "task_type.input_type:img.v1.In.width: field 1's type changed from int32 to string" in err
    assert err.count("\n") == 1

    code, out, err = await register_file(BROKEN, "--force")

    assert code == 0, err
    assert f"registered task type {NAME} version 2" in out
