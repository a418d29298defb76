"""Real processes killed with SIGKILL: the work they held is finished elsewhere, once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from _cluster import Coordinator
from _helpers import process_group
from google.protobuf import duration_pb2

from herder.clients import Client
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(90)

S = task_pb2.TaskState


@contextlib.contextmanager
def worker_process(address: str, worker_id: str) -> Iterator[subprocess.Popen[bytes]]:
    """The example worker as its own process (group), killed at exit whatever happens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    args = [sys.executable, "-m", "herder.clients.examples", "--coordinator", address, "--worker-id", worker_id]
    with process_group(args, env=env) as process:
        yield process


async def _wait_for(client: Client, task_id: str, check: object, timeout: float = 30) -> task_pb2.Task:
    async with asyncio.timeout(timeout):
        while True:
            task = await client.get(task_id)
            if check(task):  # type: ignore[operator]
                return task
            await asyncio.sleep(0.05)


async def _nodes(client: Client, count: int, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if len(await client.nodes()) == count:
                return
            await asyncio.sleep(0.05)


async def test_killed_worker_task_is_finished_by_another_worker_once(coordinator: Coordinator) -> None:
    async with Client(coordinator.address) as client:
        with worker_process(coordinator.address, "doomed") as doomed:
            await _nodes(client, 1)
            handle = await client.submit(
                "examples.sleep", examples_pb2.SleepRequest(duration=duration_pb2.Duration(seconds=2), steps=4)
            )
            running = await _wait_for(client, handle.id, lambda t: t.state == S.TASK_STATE_RUNNING)
            assert running.worker_id == "doomed"
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
        with worker_process(coordinator.address, "rescuer"):
            result = await handle.result(60, output_type=examples_pb2.SleepResponse)
            assert result.slept.seconds == 2
        done = await client.get(handle.id)
    assert (done.state, done.attempt, done.worker_id) == (S.TASK_STATE_SUCCEEDED, 2, "rescuer")
    assert [e.type for e in done.attempt_errors] == ["herder.worker_lost"]
