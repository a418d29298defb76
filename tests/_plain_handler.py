"""A TaskHandlerService for examples.echo written only with the generated stubs and plain grpc.aio,
as a service in another language would be: run as its own process by tests/test_supervisor.py.

    python tests/_plain_handler.py --port P --mode MODE [--seconds S] [--marker DIR]

Modes: echo (answer at once), sleep (sleep S seconds, then answer), crash (exit the process
before answering), no-result (end the stream without output or error), progress (three progress
messages S seconds apart, then answer). With --marker, each call writes DIR/<task_id>.<event>
(started, cancelled, metadata) so the test sees what the handler saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from herder.clients.descriptors import descriptor_set_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import handler_pb2, handler_pb2_grpc, task_pb2


class Handler(handler_pb2_grpc.TaskHandlerServiceServicer):
    def __init__(self, mode: str, seconds: float, marker: Path | None) -> None:
        self.mode = mode
        self.seconds = seconds
        self.marker = marker

    def _mark(self, task_id: str, event: str, text: str = "") -> None:
        if self.marker is not None:
            (self.marker / f"{task_id}.{event}").write_text(text)

    async def Describe(
        self, request: handler_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> handler_pb2.DescribeResponse:
        handled = handler_pb2.HandledType(
            name="examples.echo",
            input_type=examples_pb2.EchoRequest.DESCRIPTOR.full_name,
            output_type=examples_pb2.EchoResponse.DESCRIPTOR.full_name,
            descriptors=descriptor_set_for(examples_pb2.EchoRequest, examples_pb2.EchoResponse),
        )
        return handler_pb2.DescribeResponse(task_types=[handled], pid=os.getpid())

    async def Execute(
        self, request: handler_pb2.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[handler_pb2.ExecuteResponse]:
        task = request.task
        self._mark(task.id, "started")
        self._mark(task.id, "metadata", json.dumps(dict(context.invocation_metadata() or ())))
        echo = examples_pb2.EchoRequest()
        task.spec.payload.Unpack(echo)
        try:
            if self.mode == "crash":
                os._exit(3)
            if self.mode == "no-result":
                return
            if self.mode == "sleep":
                await asyncio.sleep(self.seconds)
            if self.mode == "progress":
                for step in range(1, 4):
                    yield handler_pb2.ExecuteResponse(progress=task_pb2.Progress(fraction=step / 4, message=f"{step}"))
                    await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self._mark(task.id, "cancelled")
            raise
        output = handler_pb2.ExecuteResponse()
        output.output.Pack(examples_pb2.EchoResponse(text=echo.text, attributes={"attempt": str(task.attempt)}))
        yield output


async def serve(port: int, handler: Handler) -> None:
    server = grpc.aio.server()
    handler_pb2_grpc.add_TaskHandlerServiceServicer_to_server(handler, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="echo", choices=["echo", "sleep", "crash", "no-result", "progress"])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--marker", type=Path)
    args = parser.parse_args()
    asyncio.run(serve(args.port, Handler(args.mode, args.seconds, args.marker)))


if __name__ == "__main__":
    main()
