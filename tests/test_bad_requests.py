"""Undecodable request bytes, on every service the coordinator serves, are INVALID_ARGUMENT, never a traceback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import grpc
import pytest
from _cluster import Coordinator
from _timing import eventually
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from herder.clients.embedded_etcd import EmbeddedEtcd
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2
from herder.clients.reflection import V1ServerReflectionRequest, V1ServerReflectionResponse
from herder.server.decoding import LogLimiter

pytestmark = pytest.mark.timeout(60)

SERVICE = "/herder.v1.CoordinatorService/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
LOG_LINE = "undecodable request"

# Seeded, so the same bytes every run; each test first checks they really do not parse.
RANDOM = random.Random(6).randbytes(64)
SUBMIT = pb.SubmitTaskRequest(spec=task_pb2.TaskSpec(type="examples.echo", payload_json='{"text": "hello"}'))
HELLO = pb.ConnectRequest(hello=pb.WorkerHello(worker_id="w-bad-bytes", task_types=["examples.echo"], slots=1))


def bad_utf8(message: Message, text: str) -> bytes:
    """The message's bytes with the string field holding `text` made invalid UTF-8."""
    data = message.SerializeToString()
    assert data.count(text.encode()) == 1
    return data.replace(text.encode(), b"\xff\xfe" + text.encode()[2:])


def truncated(message: Message) -> bytes:
    return message.SerializeToString()[:-3]


def undecodable(message_type: type[Message], data: bytes) -> bytes:
    with pytest.raises(DecodeError):
        message_type.FromString(data)
    return data


@pytest.fixture
async def channel(coordinator: Coordinator) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        yield channel


async def call_unary(channel: grpc.aio.Channel, method: str, data: bytes) -> grpc.aio.AioRpcError:
    """Send raw bytes to a unary method; the error it answers with."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await channel.unary_unary(method)(data, timeout=10)
    return failed.value


async def still_serves(channel: grpc.aio.Channel) -> None:
    """The coordinator still leads and answers valid requests, on its own service and on Health."""
    listed = await channel.unary_unary(SERVICE + "ListTasks")(pb.ListTasksRequest().SerializeToString(), timeout=10)
    pb.ListTasksResponse.FromString(listed)
    check = health_pb2.HealthCheckRequest(service="herder.v1.CoordinatorService").SerializeToString()
    reply = health_pb2.HealthCheckResponse.FromString(await channel.unary_unary(HEALTH + "Check")(check, timeout=10))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def decode_lines(coordinator: Coordinator) -> list[str]:
    """The coordinator's log lines about undecodable requests; the log must hold no traceback."""
    text = coordinator.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text
    return [line for line in text.splitlines() if LOG_LINE in line]


async def test_undecodable_unary_requests_are_invalid_argument(coordinator: Coordinator, channel) -> None:
    cases = [
        (SERVICE + "SubmitTask", undecodable(pb.SubmitTaskRequest, RANDOM), "herder.v1.SubmitTaskRequest"),
        (SERVICE + "SubmitTask", undecodable(pb.SubmitTaskRequest, truncated(SUBMIT)), "herder.v1.SubmitTaskRequest"),
        (SERVICE + "GetTask", bad_utf8(pb.GetTaskRequest(id="0123456789abcdef"), "0123456789abcdef"), "GetTaskRequest"),
        (SERVICE + "ListTasks", undecodable(pb.ListTasksRequest, RANDOM), "herder.v1.ListTasksRequest"),
        (HEALTH + "Check", bad_utf8(health_pb2.HealthCheckRequest(service="herder.v1"), "herder.v1"), "HealthCheck"),
    ]
    for method, data, message_name in cases:
        error = await call_unary(channel, method, data)
        assert error.code() == INVALID, (method, error)
        assert error.details().startswith("the request is not a valid "), error.details()
        assert message_name in error.details()
    error = await call_unary(channel, SERVICE + "GetTask", bad_utf8(pb.GetTaskRequest(id="abcdef"), "abcdef"))
    assert error.details() == "the request is not a valid herder.v1.GetTaskRequest: String field had bad UTF-8"
    await still_serves(channel)
    assert decode_lines(coordinator)


async def test_an_undecodable_watch_request_is_invalid_argument(coordinator: Coordinator, channel) -> None:
    for method, data in [
        (SERVICE + "WatchTasks", undecodable(pb.WatchTasksRequest, RANDOM)),
        (HEALTH + "Watch", undecodable(health_pb2.HealthCheckRequest, RANDOM)),
    ]:
        call = channel.unary_stream(method)(data, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in call:
                pass
        assert failed.value.code() == INVALID, (method, failed.value)
    await still_serves(channel)
    decode_lines(coordinator)


@pytest.mark.parametrize(
    ("method", "request_type", "response_type"),
    [
        (REFLECTION, reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse),
        (REFLECTION_V1, V1ServerReflectionRequest, V1ServerReflectionResponse),
    ],
    ids=["v1alpha", "v1"],
)
async def test_an_undecodable_reflection_request_is_invalid_argument(
    coordinator: Coordinator, channel, method: str, request_type: type[Message], response_type: type[Message]
) -> None:
    call = channel.stream_stream(method)(timeout=10)
    await call.write(request_type(list_services="").SerializeToString())
    listed = response_type.FromString(await call.read())
    assert "herder.v1.CoordinatorService" in {s.name for s in listed.list_services_response.service}
    await call.write(undecodable(request_type, RANDOM))
    assert await call.code() == INVALID
    assert request_type.DESCRIPTOR.full_name in await call.details()
    await still_serves(channel)
    decode_lines(coordinator)


async def test_an_undecodable_hello_is_invalid_argument(coordinator: Coordinator, channel) -> None:
    call = channel.stream_stream(SERVICE + "Connect")(timeout=10)
    await call.write(bad_utf8(HELLO, "w-bad-bytes"))
    assert await call.code() == INVALID
    assert "herder.v1.ConnectRequest" in await call.details()
    await still_serves(channel)
    decode_lines(coordinator)


async def test_an_undecodable_message_mid_connect_ends_the_stream_and_its_session(
    etcd: EmbeddedEtcd, namespace: str
) -> None:
    # Heartbeats would not be missed for a minute: only the end of the stream can close the session.
    with Coordinator(etcd.endpoint, namespace, heartbeat_timeout=60) as coordinator:
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            await _bad_message_mid_connect(coordinator, channel)


async def _bad_message_mid_connect(coordinator: Coordinator, channel: grpc.aio.Channel) -> None:
    call = channel.stream_stream(SERVICE + "Connect")(timeout=30)
    await call.write(HELLO.SerializeToString())
    assert pb.ConnectResponse.FromString(await call.read()).HasField("welcome")

    async def nodes() -> list[str]:
        reply = await channel.unary_unary(SERVICE + "ListNodes")(pb.ListNodesRequest().SerializeToString())
        return [node.worker_id for node in pb.ListNodesResponse.FromString(reply).nodes]

    assert await nodes() == ["w-bad-bytes"]
    later = pb.ConnectRequest(ack=pb.AssignmentAck(refs=[pb.AttemptRef(task_id="0123456789", attempt=1)]))
    await call.write(bad_utf8(later, "0123456789"))
    assert await call.code() == INVALID
    assert await call.details() == "the request is not a valid herder.v1.ConnectRequest: String field had bad UTF-8"

    async def closed() -> bool:
        return not await nodes()

    await eventually(closed, timeout=10, what="the session closed")
    await still_serves(channel)
    decode_lines(coordinator)


async def test_a_flood_of_bad_requests_from_one_host_logs_one_line(coordinator: Coordinator) -> None:
    methods = {
        "GetTask": pb.GetTaskRequest,
        "SubmitTask": pb.SubmitTaskRequest,
        "CancelTask": pb.CancelTaskRequest,
        "ListQueues": pb.ListQueuesRequest,
    }
    # Several connections: each has its own port, the host is the same.
    for _ in range(3):
        async with grpc.aio.insecure_channel(coordinator.address) as channel:
            for method, request_type in methods.items():
                data = undecodable(request_type, RANDOM)
                for _ in range(10):
                    assert (await call_unary(channel, SERVICE + method, data)).code() == INVALID
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        await still_serves(channel)
    lines = await eventually(lambda: _lines(coordinator), what="the decode-failure log line")
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0]


async def _lines(coordinator: Coordinator) -> list[str]:
    return decode_lines(coordinator)


def test_the_log_limiter_allows_a_line_per_interval_and_counts_the_dropped() -> None:
    limiter = LogLimiter(interval=60, max_keys=8)
    assert limiter.allow("ipv4:10.0.0.1", 0.0) == 0
    assert limiter.allow("ipv4:10.0.0.1", 30.0) is None
    assert limiter.allow("ipv4:10.0.0.1", 59.0) is None
    assert limiter.allow("ipv4:10.0.0.2", 59.0) == 0
    assert limiter.allow("ipv4:10.0.0.1", 60.0) == 2


def test_the_log_limiter_forgets_the_oldest_host_beyond_its_bound() -> None:
    limiter = LogLimiter(interval=60, max_keys=2)
    for host in ("a", "b", "c"):
        assert limiter.allow(host, 0.0) == 0
    # "a" was forgotten to make room for "c", so it logs again and pushes out "b", now the oldest.
    assert limiter.allow("a", 1.0) == 0
    assert limiter.allow("c", 1.0) is None
    assert limiter.allow("b", 1.0) == 0
