"""The sidecar phase's handler: a no-op TaskHandlerService written only with the generated stubs and
plain grpc.aio, as a service in another language would be; run by bench/throughput.py behind
`herder supervisor`.

    python bench/_sidecar_handler.py --port P --type NAME

Execute answers at once with EchoResponse(text=repr(time.time())) taken on its first line: the
handler's start, for the submit-to-start latency (one clock: same machine).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from herder.clients.descriptors import descriptor_set_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import handler_pb2, handler_pb2_grpc


class Handler(handler_pb2_grpc.TaskHandlerServiceServicer):
    def __init__(self, task_type: str) -> None:
        self.described = handler_pb2.DescribeResponse(
            task_types=[
                handler_pb2.HandledType(
                    name=task_type,
                    input_type=examples_pb2.EchoRequest.DESCRIPTOR.full_name,
                    output_type=examples_pb2.EchoResponse.DESCRIPTOR.full_name,
                    descriptors=descriptor_set_for(examples_pb2.EchoRequest, examples_pb2.EchoResponse),
                )
            ]
        )

    async def Describe(
        self, request: handler_pb2.DescribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> handler_pb2.DescribeResponse:
        return self.described

    async def Execute(
        self, request: handler_pb2.ExecuteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[handler_pb2.ExecuteResponse]:
        started = time.time()
        response = handler_pb2.ExecuteResponse()
        response.output.Pack(examples_pb2.EchoResponse(text=repr(started)))
        yield response


async def serve(port: int, task_type: str) -> None:
    server = grpc.aio.server()
    handler_pb2_grpc.add_TaskHandlerServiceServicer_to_server(Handler(task_type), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--type", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.type))
