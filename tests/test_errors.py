"""Errors cross the wire as gRPC statuses with BadRequest details and come back as the same class."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from herder.clients import errors

pytestmark = pytest.mark.timeout(30)

_METHOD = "/test.Errors/Raise"


async def _serve(error: errors.HerderError) -> tuple[grpc.aio.Server, int]:
    async def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort_with_status(errors.to_status(error))
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Errors", {"Raise": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def call() -> AsyncIterator[object]:
    servers: list[grpc.aio.Server] = []

    async def invoke(error: errors.HerderError) -> errors.HerderError:
        server, port = await _serve(error)
        servers.append(server)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await channel.unary_unary(_METHOD)(b"")
            except grpc.aio.AioRpcError as exc:
                return errors.from_rpc_error(exc)
        raise AssertionError("the call succeeded")

    yield invoke
    for server in servers:
        await server.stop(None)


async def test_invalid_argument_keeps_field_violations(call) -> None:  # type: ignore[no-untyped-def]
    sent = errors.bad_request("invalid task", [("spec.type", "must not be empty"), ("spec.priority", "too high")])
    got = await call(sent)
    assert type(got) is errors.InvalidArgumentError
    assert got.violations == sent.violations
    assert "spec.type: must not be empty" in str(got)


async def test_not_leader_carries_leader_address(call) -> None:  # type: ignore[no-untyped-def]
    got = await call(errors.NotLeaderError("not the leader", leader_address="10.0.0.7:50051"))
    assert isinstance(got, errors.NotLeaderError)
    assert got.leader_address == "10.0.0.7:50051"


@pytest.mark.parametrize(
    "cls", [errors.NotFoundError, errors.FailedPreconditionError, errors.UnimplementedError, errors.UnavailableError]
)
async def test_each_code_maps_back_to_its_class(call, cls: type[errors.HerderError]) -> None:  # type: ignore[no-untyped-def]
    got = await call(cls("nope"))
    assert type(got) is cls
    assert got.message == "nope"
