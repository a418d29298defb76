"""A worker that speaks Connect message by message, so tests control every ack and result."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, task_pb2


class RawWorker:
    """One Connect stream. Messages from the coordinator land in `inbox` by kind."""

    def __init__(
        self,
        address: str,
        worker_id: str,
        task_types: Sequence[str],
        *,
        slots: int = 1,
        running: Sequence[tuple[str, int]] = (),
        heartbeat: float = 0.3,
        capacity: task_pb2.Resources | None = None,
    ) -> None:
        self.address = address
        self.hello = coordinator_pb2.WorkerHello(
            worker_id=worker_id,
            task_types=list(task_types),
            slots=slots,
            running=[coordinator_pb2.AttemptRef(task_id=t, attempt=a) for t, a in running],
            capacity=capacity,
        )
        self.heartbeat = heartbeat
        self.assignments: asyncio.Queue[task_pb2.Task] = asyncio.Queue()
        self.cancels: asyncio.Queue[coordinator_pb2.CancelAttempt] = asyncio.Queue()
        self.result_acks: asyncio.Queue[coordinator_pb2.ResultAck] = asyncio.Queue()
        self.welcome: coordinator_pb2.Welcome | None = None
        self._out: asyncio.Queue[coordinator_pb2.ConnectRequest | None] = asyncio.Queue()
        self._channel: grpc.aio.Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None

    async def __aenter__(self) -> RawWorker:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        await self._out.put(coordinator_pb2.ConnectRequest(hello=self.hello))
        call = stub.Connect(self._requests())
        welcomed = asyncio.Event()

        async def read() -> None:
            try:
                async for message in call:
                    kind = message.WhichOneof("message")
                    if kind == "welcome":
                        self.welcome = message.welcome
                        welcomed.set()
                    elif kind == "assignments":
                        for task in message.assignments.tasks:
                            await self.assignments.put(task)
                    elif kind == "cancel":
                        await self.cancels.put(message.cancel)
                    elif kind == "result_acks":
                        for ack in message.result_acks.acks:
                            await self.result_acks.put(ack)
            except grpc.aio.AioRpcError as exc:
                self.error = exc
            finally:
                self.closed.set()
                welcomed.set()

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat)
                await self.send(heartbeat=coordinator_pb2.Heartbeat())

        self._tasks = [asyncio.create_task(read()), asyncio.create_task(beat())]
        await asyncio.wait_for(welcomed.wait(), 10)
        if self.welcome is None:
            raise RuntimeError(f"no welcome: {self.error}")
        return self

    async def _requests(self) -> AsyncIterator[coordinator_pb2.ConnectRequest]:
        while True:
            message = await self._out.get()
            if message is None:
                return
            yield message

    async def send(self, **kwargs: Any) -> None:
        """Queue one ConnectRequest; kwargs name its oneof field (heartbeat=..., results=...)."""
        await self._out.put(coordinator_pb2.ConnectRequest(**kwargs))

    async def send_result(self, result: coordinator_pb2.AttemptResult) -> None:
        await self.send(results=coordinator_pb2.AttemptResults(results=[result]))

    async def ack(self, task: task_pb2.Task) -> None:
        await self.send(ack=coordinator_pb2.AssignmentAck(refs=[ref(task.id, task.attempt)]))

    async def succeed(self, task_id: str, attempt: int, output: Message) -> coordinator_pb2.ResultAck:
        value = any_pb2.Any()
        value.Pack(output)
        await self.send_result(coordinator_pb2.AttemptResult(ref=ref(task_id, attempt), output=value))
        return await asyncio.wait_for(self.result_acks.get(), 10)

    async def fail(self, task_id: str, attempt: int, error: task_pb2.TaskError) -> coordinator_pb2.ResultAck:
        await self.send_result(coordinator_pb2.AttemptResult(ref=ref(task_id, attempt), error=error))
        return await asyncio.wait_for(self.result_acks.get(), 10)

    async def next_assignment(self, timeout: float = 10) -> task_pb2.Task:
        return await asyncio.wait_for(self.assignments.get(), timeout)

    async def start_next(self, timeout: float = 10) -> task_pb2.Task:
        """The next assignment, acknowledged: the attempt is RUNNING from the coordinator's view."""
        task = await self.next_assignment(timeout)
        await self.ack(task)
        return task

    def stop_heartbeats(self) -> None:
        self._tasks[1].cancel()

    async def close(self) -> None:
        """Half-close the stream (a clean goodbye) and release the channel."""
        await self._out.put(None)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._channel is not None:
            await self._channel.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def ref(task_id: str, attempt: int) -> coordinator_pb2.AttemptRef:
    return coordinator_pb2.AttemptRef(task_id=task_id, attempt=attempt)
