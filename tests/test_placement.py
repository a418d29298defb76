"""Placement by resources end to end: a real coordinator process, raw protocol workers offering
crafted capacities and samples, the Python Worker and the supervisor.

A task goes only to a node whose free capacity fits its request; one that fits nowhere stays QUEUED
with the reason in GetTask and ListQueues until a big enough node joins; a node under memory
pressure gets nothing; the least loaded node is offered a task first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _cluster import Coordinator
from _helpers import process_group
from _raw_worker import RawWorker
from _scheduling import ECHO, Api, S, complete, connect, get, queue_stats, submit
from _timing import eventually, quiet

from herder.clients import errors
from herder.clients.backoff import Backoff
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.examples import build_example_worker
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import supervisor_pb2, task_pb2
from herder.clients.worker import WorkerSettings

pytestmark = pytest.mark.timeout(60)

GIB = 1 << 30
SMALL = task_pb2.Resources(cpu_millis=1000, memory_bytes=1 * GIB)
BIG = task_pb2.Resources(cpu_millis=8000, memory_bytes=16 * GIB)
HANDLER = str(Path(__file__).with_name("_plain_handler.py"))


def sample(used: float, total: int = 64 * GIB, cpus: int = 16) -> supervisor_pb2.ResourceSample:
    """A plausible node sample with memory used/total = `used`."""
    value = supervisor_pb2.ResourceSample(
        cpu_percent=10.0, cpu_count=cpus, memory_total_bytes=total, memory_used_bytes=int(total * used)
    )
    value.sample_time.GetCurrentTime()
    return value


async def succeed(worker: RawWorker, task: task_pb2.Task) -> None:
    """Succeed an attempt already acknowledged (start_next): its reservation ends."""
    ack = await worker.succeed(task.id, task.attempt, examples_pb2.EchoResponse(text="done"))
    assert ack.accepted, ack.reason


async def node(api: Api, worker_id: str) -> pb.Node | None:
    reply = await api.stub.ListNodes(pb.ListNodesRequest())
    return next((n for n in reply.nodes if n.worker_id == worker_id), None)


async def succeeded(api: Api, task_id: str) -> task_pb2.Task:
    async def check() -> task_pb2.Task | None:
        task = await get(api, task_id)
        return task if task.state == S.TASK_STATE_SUCCEEDED else None

    return await eventually(check, f"task {task_id} to succeed", timeout=30)


async def queued_with_reason(api: Api, task_id: str) -> task_pb2.Task | None:
    task = await get(api, task_id)
    return task if task.state == S.TASK_STATE_QUEUED and task.waiting_reason else None


async def test_a_task_goes_to_the_node_it_fits(api: Api, coordinator: Coordinator) -> None:
    small = RawWorker(coordinator.address, "small", [ECHO], slots=4, capacity=SMALL)
    big = RawWorker(coordinator.address, "big", [ECHO], slots=4, capacity=BIG)
    async with small, big:
        task = await submit(api, resources=task_pb2.Resources(cpu_millis=4000, memory_bytes=8 * GIB))
        assigned = await big.start_next()
        assert assigned.id == task.id and assigned.worker_id == "big"
        await quiet(small.assignments, 0.5, what="an assignment to the small node")
        listed = await node(api, "big")
        assert listed is not None and listed.capacity.cpu_millis == 8000
        # Reserved while it runs: the big node has its request less free.
        assert listed.free.cpu_millis == 4000 and listed.free.memory_bytes == 8 * GIB
        await succeed(big, assigned)


async def test_a_task_that_fits_nowhere_waits_with_a_reason_until_a_big_node_joins(
    api: Api, coordinator: Coordinator
) -> None:
    async with RawWorker(coordinator.address, "small", [ECHO], slots=4, capacity=SMALL) as small:
        task = await submit(api, queue="gpu", resources=BIG)
        plain = await submit(api, queue="gpu")
        # The big task does not block the plain one behind it.
        assert (await small.start_next()).id == plain.id
        waiting = await eventually(lambda: queued_with_reason(api, task.id), "a waiting reason")
        reason = waiting.waiting_reason
        assert "8000m cpu and 16 GiB memory" in reason and "largest: 1000m cpu and 1 GiB memory" in reason, reason
        stats = await queue_stats(api, "gpu")
        assert stats is not None and stats.waiting_for_resources == 1 and stats.resources_reason == reason
        await quiet(small.assignments, 0.5, what="the big task on the small node")
        async with RawWorker(coordinator.address, "big", [ECHO], slots=1, capacity=BIG) as big:
            assigned = await big.next_assignment()
            assert assigned.id == task.id
            stats = await queue_stats(api, "gpu")
            assert stats is not None and stats.waiting_for_resources == 0 and not stats.resources_reason
            await complete(big, assigned)


async def test_a_busy_node_frees_its_reservation_when_a_task_ends(api: Api, coordinator: Coordinator) -> None:
    half = task_pb2.Resources(cpu_millis=600)
    async with RawWorker(coordinator.address, "one", [ECHO], slots=4, capacity=SMALL) as worker:
        first = await submit(api, resources=half)
        second = await submit(api, resources=half)
        running = await worker.start_next()
        assert running.id == first.id
        waiting = await eventually(lambda: queued_with_reason(api, second.id), "a waiting reason")
        assert "free (most free: 400m cpu" in waiting.waiting_reason, waiting.waiting_reason
        await succeed(worker, running)
        assert (await worker.next_assignment()).id == second.id


async def test_a_node_without_capacity_or_sample_gets_no_requests(api: Api, coordinator: Coordinator) -> None:
    async with RawWorker(coordinator.address, "blind", [ECHO], slots=2) as worker:
        task = await submit(api, resources=task_pb2.Resources(memory_bytes=GIB))
        await eventually(lambda: queued_with_reason(api, task.id), "a waiting reason")
        await quiet(worker.assignments, 0.3, what="an assignment to a node of unknown capacity")
        # Its first sample says how much memory it has: now it fits.
        await worker.send(heartbeat=pb.Heartbeat(resources=sample(0.1)))
        assert (await worker.next_assignment()).id == task.id


async def test_a_node_under_memory_pressure_gets_no_tasks_until_it_recovers(api: Api, coordinator: Coordinator) -> None:
    async with RawWorker(coordinator.address, "pressed", [ECHO], slots=2) as worker:
        await worker.send(heartbeat=pb.Heartbeat(resources=sample(0.99)))

        async def pressed() -> bool:
            listed = await node(api, "pressed")
            return listed is not None and listed.memory_pressure

        await eventually(pressed, "ListNodes to show memory pressure")
        task = await submit(api)
        waiting = await eventually(lambda: queued_with_reason(api, task.id), "a waiting reason")
        assert "under memory pressure" in waiting.waiting_reason, waiting.waiting_reason
        await quiet(worker.assignments, 0.5, what="an assignment under memory pressure")
        await worker.send(heartbeat=pb.Heartbeat(resources=sample(0.5)))
        assert (await worker.next_assignment()).id == task.id
        listed = await node(api, "pressed")
        assert listed is not None and not listed.memory_pressure


async def test_the_least_loaded_node_is_offered_tasks_first(api: Api, coordinator: Coordinator) -> None:
    capacity = task_pb2.Resources(cpu_millis=4000, memory_bytes=8 * GIB)
    async with RawWorker(coordinator.address, "busy", [ECHO], slots=4, capacity=capacity) as busy:
        for _ in range(2):
            await submit(api)
            await busy.start_next()
        async with RawWorker(coordinator.address, "idle", [ECHO], slots=4, capacity=capacity) as idle:
            # busy runs 2 of 4 slots; idle takes the next two (0 then 1 of 4 < 2 of 4).
            for _ in range(2):
                task = await submit(api)
                assert (await idle.start_next()).id == task.id
            await quiet(busy.assignments, 0.3, what="an assignment to the busier node")


async def test_hello_capacity_out_of_bounds_is_invalid_argument(coordinator: Coordinator) -> None:
    raw = RawWorker(coordinator.address, "huge", [ECHO], capacity=task_pb2.Resources(cpu_millis=4_000_000_000))
    with pytest.raises(RuntimeError, match="no welcome"):
        await raw.__aenter__()
    try:
        assert raw.error is not None and raw.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        refused = errors.from_rpc_error(raw.error)
        assert isinstance(refused, errors.InvalidArgumentError)
        assert [v.field for v in refused.violations] == ["hello.capacity.cpu_millis"]
    finally:
        await raw.close()


async def test_the_python_worker_takes_part_in_placement(api: Api, coordinator: Coordinator) -> None:
    settings = WorkerSettings(backoff=Backoff(initial=0.05, max=0.3), resource_interval=0.2)
    capacity = task_pb2.Resources(cpu_millis=500)
    worker = build_example_worker(coordinator.address, worker_id="py", capacity=capacity, settings=settings)
    async with worker:
        too_big = await submit(api, "big", resources=task_pb2.Resources(cpu_millis=1000))
        fits = await submit(api, "small", resources=task_pb2.Resources(cpu_millis=250, memory_bytes=1 << 20))
        done = await succeeded(api, fits.id)
        assert done.worker_id == "py"
        waiting = await eventually(lambda: queued_with_reason(api, too_big.id), "a waiting reason")
        assert "largest: 500m cpu" in waiting.waiting_reason, waiting.waiting_reason
        listed = await node(api, "py")
        assert listed is not None and listed.capacity.cpu_millis == 500 and listed.capacity.memory_bytes > 0


@contextlib.contextmanager
def _supervisor(coordinator: Coordinator, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["HERDER_MEMORY"] = "2GiB"  # the flag's environment variable
    args = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address]
    args += ["--handler", f"127.0.0.1:{port}", "--slots", "2", "--node-id", "sidecar", *extra]
    with process_group(args, env=env, stdout=subprocess.DEVNULL) as process:
        yield process


async def test_supervisor_cpu_and_memory_flags_set_its_capacity(api: Api, coordinator: Coordinator) -> None:
    port = free_port()
    with (
        process_group([sys.executable, HANDLER, "--port", str(port), "--mode", "echo"]),
        _supervisor(coordinator, port, "--cpu", "1500m"),
    ):

        async def offered() -> pb.Node | None:
            listed = await node(api, "sidecar")
            return listed if listed is not None and listed.capacity.cpu_millis else None

        listed = await eventually(offered, "the supervisor's session", timeout=30)
        assert listed.capacity.cpu_millis == 1500 and listed.capacity.memory_bytes == 2 * GIB
        too_big = await submit(api, "big", resources=task_pb2.Resources(cpu_millis=2000))
        fits = await submit(api, "ok", resources=task_pb2.Resources(cpu_millis=1500, memory_bytes=GIB))
        done = await succeeded(api, fits.id)
        assert done.worker_id == "sidecar"
        assert (await get(api, too_big.id)).state == S.TASK_STATE_QUEUED


async def test_cli_shows_tasks_waiting_for_resources(api: Api, coordinator: Coordinator) -> None:
    async with RawWorker(coordinator.address, "small", [ECHO], capacity=SMALL):
        task = await submit(api, queue="big", resources=BIG)
        await eventually(lambda: queued_with_reason(api, task.id), "a waiting reason")
        herder = str(Path(sys.executable).with_name("herder"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        env["COLUMNS"] = "250"

        async def run(*args: str) -> str:
            process = await asyncio.create_subprocess_exec(
                herder, "--coordinator", coordinator.address, *args, stdout=asyncio.subprocess.PIPE, env=env
            )
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0
            return out.decode()

        queues = await run("queues")
        assert "NO ROOM" in queues and "big: no node serving 'examples.echo' has 8000m cpu" in queues, queues
        shown = json.loads(await run("--output", "json", "tasks", "get", task.id))
        assert "8000m cpu" in shown["waiting_reason"], shown


async def test_the_memory_pressure_threshold_is_the_coordinators_flag(etcd: EmbeddedEtcd, namespace: str) -> None:
    with Coordinator(etcd.endpoint, namespace, extra_args=["--memory-pressure", "0.5"]) as coordinator:
        async with connect(coordinator) as api, RawWorker(coordinator.address, "half", [ECHO]) as worker:
            await worker.send(heartbeat=pb.Heartbeat(resources=sample(0.6)))

            async def pressed() -> bool:
                listed = await node(api, "half")
                return listed is not None and listed.memory_pressure

            await eventually(pressed, "pressure at 60 % with a threshold of 50 %")


def test_a_bad_memory_pressure_flag_is_one_line_and_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["HERDER_MEMORY_PRESSURE"] = "1.5"
    done = subprocess.run(
        [sys.executable, "-m", "herder.server"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "memory_pressure (env HERDER_MEMORY_PRESSURE)" in done.stderr, done.stderr
