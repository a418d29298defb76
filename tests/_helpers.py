"""Small things the end-to-end tests share: a stub with the echo type registered, submitting, reading back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import IO, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from herder.clients.descriptors import task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2

ECHO = "examples.echo"
Stub = coordinator_pb2_grpc.CoordinatorServiceStub


@asynccontextmanager
async def echo_stub(address: str) -> AsyncIterator[Stub]:
    """A CoordinatorService stub on `address`, with the echo task type registered."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        task_type = task_type_for(ECHO, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
        yield stub


def echo_spec(text: str = "hi", **fields: object) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(type=ECHO, payload_json=json.dumps({"text": text}), **fields)  # type: ignore[arg-type]


async def submit(stub: Stub, text: str = "hi", **fields: object) -> task_pb2.Task:
    return (await stub.SubmitTask(pb.SubmitTaskRequest(spec=echo_spec(text, **fields)))).task


async def get(stub: Stub, task_id: str) -> task_pb2.Task:
    return (await stub.GetTask(pb.GetTaskRequest(id=task_id))).task


async def fence(stub: Stub) -> int:
    """The leader key's revision: it changes whenever leadership changes hands or is re-won."""
    return (await stub.GetClusterStatus(pb.GetClusterStatusRequest())).leader_revision


@contextlib.contextmanager
def process_group(
    args: Sequence[str], *, stdout: IO[Any] | int = subprocess.DEVNULL, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """`args` as its own process group (stderr with stdout), SIGKILLed at exit whatever happens."""
    process = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True, **popen
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def violations(exc: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest details of a failed call."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    found = []
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found += [v.field for v in bad.field_violations]
    return found
