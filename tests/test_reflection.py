"""Server reflection: the real grpcurl against a real coordinator and a supervisor's admin API.

Reflection serves what a client needs with no .proto at hand: both reflection versions,
single methods, the .proto comments, registered task types, and the google.rpc error details.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator, start_replicas
from _helpers import ECHO, echo_stub
from google.protobuf.descriptor_pb2 import FieldDescriptorProto, FileDescriptorProto

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.reflection import (
    Limits,
    V1ServerReflectionRequest,
    V1ServerReflectionResponse,
    enable_reflection,
    static_catalog,
)
from herder.server import keys
from herder.server._etcd import Etcd, put
from herder.server.reflection import ContractReflection
from herder.supervisor.admin import AdminServer, Status

pytestmark = pytest.mark.timeout(60)

GRPCURL = Path(sys.executable).parent / "grpcurl"
BUF = Path(sys.executable).parent / "buf"
V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def grpcurl(address: str, *args: str, data: object = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    command = [str(GRPCURL), "-plaintext", "-max-time", "10"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=30, check=False)
    if ok:
        assert result.returncode == 0, f"grpcurl {' '.join(args)} failed: {result.stderr}"
    return result


async def run_grpcurl(
    address: str, *args: str, data: object = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    # In a thread: a test's event loop stays free while grpcurl waits on the server.
    return await asyncio.to_thread(grpcurl, address, *args, data=data, ok=ok)


def test_grpcurl_lists_both_reflection_versions(coordinator: Coordinator) -> None:
    services = grpcurl(coordinator.address, "list").stdout.split()
    assert services == sorted(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "herder.v1.CoordinatorService",
            "herder.v1.LockService",
        ]
    )


def test_describe_a_method_shows_its_comment(coordinator: Coordinator) -> None:
    out = grpcurl(coordinator.address, "describe", "herder.v1.CoordinatorService.SubmitTask").stdout
    assert "herder.v1.CoordinatorService.SubmitTask is a method" in out
    assert "Stores a task and answers once it is committed to etcd." in out


def test_describe_a_message_shows_field_comments(coordinator: Coordinator) -> None:
    out = grpcurl(coordinator.address, "describe", "herder.v1.TaskSpec").stdout
    assert "What a caller asks to run." in out
    assert 'Registered task type, such as "images.resize".' in out


def test_describe_the_error_details(coordinator: Coordinator) -> None:
    out = grpcurl(coordinator.address, "describe", "google.rpc.BadRequest.FieldViolation").stdout
    assert "google.rpc.BadRequest.FieldViolation is a message" in out


async def test_a_registered_task_types_message_is_describable(coordinator: Coordinator) -> None:
    missing = await run_grpcurl(coordinator.address, "describe", "herder.examples.v1.EchoRequest", ok=False)
    assert missing.returncode != 0 and "not found" in missing.stderr.lower()
    async with echo_stub(coordinator.address):
        out = (await run_grpcurl(coordinator.address, "describe", "herder.examples.v1.EchoRequest")).stdout
    assert "herder.examples.v1.EchoRequest is a message" in out
    assert "string text = 1;" in out


async def test_replies_print_proto_field_names(coordinator: Coordinator) -> None:
    # As before reflection served protoc's descriptor set: scripts read `task_types`, `input_type`.
    async with echo_stub(coordinator.address):
        out = (await run_grpcurl(coordinator.address, "herder.v1.CoordinatorService/ListTaskTypes")).stdout
    listed = json.loads(out)
    assert listed["task_types"][0]["input_type"] == "herder.examples.v1.EchoRequest"


async def test_a_follower_serves_the_types_registered_on_the_leader(etcd: EmbeddedEtcd, namespace: str) -> None:
    with contextlib.ExitStack() as stack:
        leader, follower = start_replicas(etcd.endpoint, namespace, 2, stack)
        async with echo_stub(leader.address):
            deadline = time.monotonic() + 10
            while True:
                described = await run_grpcurl(follower.address, "describe", "herder.examples.v1.EchoRequest", ok=False)
                if described.returncode == 0:
                    break
                assert time.monotonic() < deadline, described.stderr
                await asyncio.sleep(0.2)
        assert "herder.examples.v1.EchoRequest is a message" in described.stdout


async def test_the_newest_registration_of_a_shared_file_wins(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address) as stub:
        newer = task_type_for("examples.echo2", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        examples = next(f for f in newer.descriptors.file if f.name == "herder/examples/v1/examples.proto")
        echo = next(m for m in examples.message_type if m.name == "EchoRequest")
        echo.field.add(name="added_later", number=99, type=FieldDescriptorProto.TYPE_STRING)
        echo.field[-1].label = FieldDescriptorProto.LABEL_OPTIONAL
        await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=newer))
        out = (await run_grpcurl(coordinator.address, "describe", "herder.examples.v1.EchoRequest")).stdout
    assert "added_later = 99;" in out


async def test_an_invalid_submit_shows_the_field_violations_as_json(coordinator: Coordinator) -> None:
    async with echo_stub(coordinator.address):
        spec = {"type": "examples.echo", "payload_json": json.dumps({"text": 5})}
        result = await run_grpcurl(
            coordinator.address, "herder.v1.CoordinatorService/SubmitTask", data={"spec": spec}, ok=False
        )
    assert "Code: InvalidArgument" in result.stderr
    # grpcurl prints each detail as JSON when reflection resolves its type, base64 when it does not.
    detail = json.loads(result.stderr.split("1)", 1)[1])
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in detail["field_violations"]] == ["spec.payload_json"]


def test_buf_curl_lists_the_services_through_reflection_v1(coordinator: Coordinator) -> None:
    # buf curl asks v1 first and would fall back to v1alpha: -v shows which it used.
    command = [str(BUF), "curl", "-v", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services"]
    result = subprocess.run(
        [*command, f"http://{coordinator.address}"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "herder.v1.CoordinatorService" in result.stdout.split()
    assert "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in result.stderr
    assert "/grpc.reflection.v1alpha." not in result.stderr


async def test_the_v1_service_answers_through_a_python_stub(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call = channel.stream_stream(
            V1,
            request_serializer=V1ServerReflectionRequest.SerializeToString,
            response_deserializer=V1ServerReflectionResponse.FromString,
        )(timeout=10)
        await call.write(V1ServerReflectionRequest(file_containing_symbol="herder.v1.LockService.Acquire"))
        first = await call.read()
        names = [_file_name(data) for data in first.file_descriptor_response.file_descriptor_proto]
        # The file and its imports, imports first.
        assert names[-1] == "herder/v1/lock.proto"
        assert "google/protobuf/duration.proto" in names[:-1]
        await call.write(V1ServerReflectionRequest(file_containing_symbol="herder.v1.LockService.Release"))
        again = await call.read()
        # On the same stream, its imports were sent already: the file alone.
        assert [_file_name(d) for d in again.file_descriptor_response.file_descriptor_proto] == ["herder/v1/lock.proto"]
        await call.write(V1ServerReflectionRequest(file_containing_symbol="no.such.Symbol"))
        missing = await call.read()
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        await call.write(V1ServerReflectionRequest(file_by_filename="x" * 100_000))
        too_long = await call.read()
        assert too_long.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


SYMBOLS = {
    "herder.v1.CoordinatorService": "herder/v1/coordinator.proto",
    "herder.v1.TaskState": "herder/v1/task.proto",
    "herder.v1.TASK_STATE_QUEUED": "herder/v1/task.proto",
    "herder.v1.TaskSpec.queue": "herder/v1/task.proto",
    ".herder.v1.TaskSpec": "herder/v1/task.proto",
    "google.rpc.BadRequest.FieldViolation": "google/rpc/error_details.proto",
    "google.rpc.Status": "google/rpc/status.proto",
    "grpc.reflection.v1.ServerReflection": "grpc/reflection/v1/reflection.proto",
}


async def test_every_kind_of_symbol_resolves(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call = channel.stream_stream(
            V1,
            request_serializer=V1ServerReflectionRequest.SerializeToString,
            response_deserializer=V1ServerReflectionResponse.FromString,
        )(timeout=10)
        for symbol, file in SYMBOLS.items():
            await call.write(V1ServerReflectionRequest(file_containing_symbol=symbol))
            found = await call.read()
            # The file asked for comes last, after those of its imports not sent yet on this stream.
            names = [_file_name(d) for d in found.file_descriptor_response.file_descriptor_proto]
            assert names and names[-1] == file, (symbol, found.error_response)
        await call.done_writing()


async def test_files_and_extensions_are_answered(coordinator: Coordinator) -> None:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        call = channel.stream_stream(
            V1,
            request_serializer=V1ServerReflectionRequest.SerializeToString,
            response_deserializer=V1ServerReflectionResponse.FromString,
        )(timeout=10)
        await call.write(V1ServerReflectionRequest(file_by_filename="herder/v1/task.proto"))
        by_name = FileDescriptorProto.FromString((await call.read()).file_descriptor_response.file_descriptor_proto[-1])
        # The comments are there: the file was served with its source info.
        assert by_name.source_code_info.location
        await call.write(V1ServerReflectionRequest(all_extension_numbers_of_type="herder.v1.TaskSpec"))
        numbers = (await call.read()).all_extension_numbers_response
        assert numbers.base_type_name == "herder.v1.TaskSpec" and list(numbers.extension_number) == []
        extension = {"containing_type": "herder.v1.TaskSpec", "extension_number": 100}
        await call.write(V1ServerReflectionRequest(file_containing_extension=extension))
        missing = (await call.read()).error_response
        assert missing.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


def _file_name(data: bytes) -> str:
    return FileDescriptorProto.FromString(data).name


async def test_a_stream_answers_a_bounded_number_of_requests() -> None:
    server = grpc.aio.server()
    enable_reflection(server, (), static_catalog(), Limits(requests=3))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                V1,
                request_serializer=V1ServerReflectionRequest.SerializeToString,
                response_deserializer=V1ServerReflectionResponse.FromString,
            )(timeout=10)
            for _ in range(3):
                await call.write(V1ServerReflectionRequest(list_services=""))
                assert (await call.read()).HasField("list_services_response")
            await call.write(V1ServerReflectionRequest(list_services=""))
            assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)


async def test_grpcurl_describes_the_supervisor_admin_api() -> None:
    status = Status("w", "", "", False, False, 1, 0, (), False)

    async def drain() -> int:
        return 0

    admin = AdminServer("127.0.0.1:0", lambda: status, drain)
    await admin.start()
    try:
        address = f"127.0.0.1:{admin.port}"
        services = (await run_grpcurl(address, "list")).stdout.split()
        assert "herder.v1.SupervisorService" in services and "grpc.reflection.v1.ServerReflection" in services
        out = (await run_grpcurl(address, "describe", "herder.v1.SupervisorService.Drain")).stdout
        assert "herder.v1.SupervisorService.Drain is a method" in out
    finally:
        await admin.stop()


async def test_without_etcd_reflection_serves_what_it_read_before() -> None:
    with EmbeddedEtcd(fsync=False) as own:
        client = Etcd([own.endpoint], timeout=1.0)
        await client.connect()
        prefix = keys.prefix("reflection")
        echo = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        await client.txn([], [put(keys.task_type(prefix, ECHO), echo.SerializeToString())], [])
        reflection = ContractReflection(client, prefix, refresh=0.0, timeout=1.0)
        assert "herder.examples.v1.EchoRequest" in (await reflection.catalog()).symbols
    try:
        # etcd is gone: the next look-up fails fast and the catalog read before is served.
        catalog = await asyncio.wait_for(reflection.catalog(), 10)
        assert "herder.examples.v1.EchoRequest" in catalog.symbols
        assert "herder.v1.CoordinatorService.SubmitTask" in catalog.symbols
    finally:
        await client.close()
