"""End-to-end throughput and idle latency of one coordinator, on a real etcd with fsync on.

Starts its own etcd, coordinator and worker processes, then measures:
- one RPC per task: N tasks from many concurrent submitters, submit to SUCCEEDED;
- batches: N tasks through SubmitTasks, every task tracked to SUCCEEDED;
- idle submit-to-start latency: one task at a time, from the SubmitTask call to the
  first line of the handler, p50 and p99;
- fair: the first two again with tasks spread over --keys concurrency keys and global,
  queue and key limits set (loose enough not to throttle), to show what fairness costs.
Prints a human summary and, on its last line, the figures as JSON. A measurement, not a test.

    python bench/throughput.py [--tasks 5000] [--submitters 64] [--batch 500] [--workers 1] [--slots 256]
                               [--keys 100] [--phases idle,single,batches,fair]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop
from herder.clients.worker import TaskContext, Worker
from herder.clients.worker import run_worker as serve_worker

TASK_TYPE = "bench.noop"
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED


def run_worker(address: str, slots: int) -> None:
    """Worker process: a no-op handler on the SDK Worker."""
    worker = Worker(address, slots=slots)

    @worker.task(TASK_TYPE)
    async def noop(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        # The handler's start time, for the submit-to-start latency (one clock: same machine).
        return examples_pb2.EchoResponse(text=repr(time.time()))

    serve_worker(worker)


class Stack:
    """etcd (fsync on) + one coordinator (given coordinator_args as extra flags) + worker processes,
    all stopped on exit."""

    def __init__(self, workers: int, slots: int, coordinator_args: tuple[str, ...] = ()) -> None:
        self.workers = workers
        self.slots = slots
        self.coordinator_args = coordinator_args
        self.dir = tempfile.mkdtemp(prefix="herder-bench-")
        self.etcd = EmbeddedEtcd(data_dir=Path(self.dir), fsync=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(Path(self.dir) / log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        return process

    async def start(self) -> None:
        self.etcd.start()
        args = ["-m", "herder.server", "--etcd", self.etcd.endpoint, "--listen", self.address, "--log-level", "warning"]
        self._spawn([*args, *self.coordinator_args], "coordinator.log")
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            await _until(lambda: _answers(stub.ListNodes(pb.ListNodesRequest(), timeout=1)), 30, "coordinator")
            task_type = task_type_for(TASK_TYPE, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
            await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
            for i in range(self.workers):
                self._spawn([__file__, "--worker", self.address, "--slots", str(self.slots)], f"worker-{i}.log")

            async def connected() -> bool:
                nodes = await stub.ListNodes(pb.ListNodesRequest())
                return len(nodes.nodes) == self.workers

            await _until(connected, 30, "workers")

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.etcd.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def _answers(call: object) -> bool:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError:
        return False
    return True


async def _until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not ready after {timeout:.0f}s")
        await asyncio.sleep(0.05)


def _spec(queue: str, key: str = "") -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(type=TASK_TYPE, queue=queue, concurrency_key=key)
    spec.payload.Pack(examples_pb2.EchoRequest())
    return spec


def _keys(count: int) -> list[str]:
    return [f"tenant-{i}" for i in range(count)] if count else [""]


async def _track(stub: coordinator_pb2_grpc.CoordinatorServiceStub, queue: str, count: int) -> asyncio.Task[float]:
    """Watch a queue until `count` tasks have SUCCEEDED; the task's result is the time of the last one."""
    call = stub.WatchTasks(pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True))
    ready = asyncio.Event()

    async def consume() -> float:
        done: set[str] = set()
        ready.set()
        async for reply in call:
            done.add(reply.event.task.id)
            if len(done) >= count:
                call.cancel()
                return time.perf_counter()
        raise RuntimeError("watch ended early")

    task = asyncio.create_task(consume())
    await ready.wait()
    await asyncio.sleep(0.2)  # let the watch register on the coordinator
    return task


async def one_rpc_each(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, total: int, submitters: int, keys: int = 0, tag: str = ""
) -> dict[str, float]:
    queue = f"one-rpc{tag}"
    tracker = await _track(stub, queue, total)
    requests = [pb.SubmitTaskRequest(spec=_spec(queue, key)) for key in _keys(keys)]
    remaining = total
    latencies: list[float] = []

    async def submitter() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await stub.SubmitTask(requests[remaining % len(requests)])
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    submitted = time.perf_counter()
    finished = await asyncio.wait_for(tracker, 600)
    return {
        "tasks": total,
        "submit_per_s": round(total / (submitted - start)),
        "end_to_end_per_s": round(total / (finished - start)),
        "submit_rpc_p50_ms": round(_pct(latencies, 50) * 1000, 2),
        "submit_rpc_p99_ms": round(_pct(latencies, 99) * 1000, 2),
    }


async def batches(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    total: int,
    batch: int,
    concurrency: int,
    keys: int = 0,
    tag: str = "",
) -> dict[str, float]:
    queue = f"batched{tag}"
    tracker = await _track(stub, queue, total)
    names = _keys(keys)
    request = pb.SubmitTasksRequest(specs=[_spec(queue, names[i % len(names)]) for i in range(batch)])
    remaining = total // batch

    async def submitter() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            reply = await stub.SubmitTasks(request)
            assert all(r.code == 0 for r in reply.results)

    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    submitted = time.perf_counter()
    count = (total // batch) * batch
    finished = await asyncio.wait_for(tracker, 600)
    return {
        "tasks": count,
        "batch": batch,
        "submit_per_s": round(count / (submitted - start)),
        "end_to_end_per_s": round(count / (finished - start)),
    }


async def idle_latency(stub: coordinator_pb2_grpc.CoordinatorServiceStub, samples: int) -> dict[str, float]:
    """Submit one task at a time; submit-to-start runs from the SubmitTask call to the handler's first line."""
    queue = "idle"
    call = stub.WatchTasks(pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True))
    finished: asyncio.Queue[task_pb2.Task] = asyncio.Queue()

    async def consume() -> None:
        async for reply in call:
            await finished.put(reply.event.task)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    request = pb.SubmitTaskRequest(spec=_spec(queue))
    to_start: list[float] = []
    to_ack: list[float] = []
    for _ in range(samples):
        t0 = time.time()
        reply = await stub.SubmitTask(request)
        to_ack.append(time.time() - t0)
        while True:
            task = await asyncio.wait_for(finished.get(), 10)
            if task.id == reply.task.id:
                break
        output = examples_pb2.EchoResponse()
        task.result.Unpack(output)
        to_start.append(float(output.text) - t0)
        await asyncio.sleep(0.01)  # idle: nothing else in flight
    call.cancel()
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await consumer
    return {
        "samples": samples,
        "submit_to_start_p50_ms": round(_pct(to_start, 50) * 1000, 2),
        "submit_to_start_p99_ms": round(_pct(to_start, 99) * 1000, 2),
        "submit_ack_p50_ms": round(_pct(to_ack, 50) * 1000, 2),
    }


def _pct(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def fairness_and_limits(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub, args: argparse.Namespace
) -> dict[str, object]:
    """The same two runs with tasks spread over concurrency keys and every kind of limit set.

    The limits are loose enough not to throttle (the point is their bookkeeping's cost):
    each key may run a quarter of the slots, each queue all of them, the namespace ten times that.
    """
    slots = args.workers * args.slots
    scopes = [
        pb.Limit(scope=pb.LIMIT_SCOPE_GLOBAL, max_running=slots * 10),
        pb.Limit(scope=pb.LIMIT_SCOPE_QUEUE, name="one-rpc-fair", max_running=slots),
        pb.Limit(scope=pb.LIMIT_SCOPE_QUEUE, name="batched-fair", max_running=slots),
        *(
            pb.Limit(scope=pb.LIMIT_SCOPE_CONCURRENCY_KEY, name=key, max_running=max(slots // 4, 1))
            for key in _keys(args.keys)
        ),
    ]
    for limit in scopes:
        await stub.SetLimit(pb.SetLimitRequest(limit=limit))
    single = await one_rpc_each(stub, args.tasks, args.submitters, args.keys, "-fair")
    batched = await batches(stub, args.tasks, args.batch, args.batch_concurrency, args.keys, "-fair")
    return {"one_rpc_each": single, "batches": batched}


async def main(args: argparse.Namespace) -> dict[str, object]:
    stack = Stack(args.workers, args.slots)
    try:
        await stack.start()
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            figures: dict[str, object] = {}
            if "idle" in args.phases:
                figures["idle"] = await idle_latency(stub, args.latency_samples)
                print(f"idle latency: {figures['idle']}", flush=True)
            if "single" in args.phases:
                figures["one_rpc_each"] = await one_rpc_each(stub, args.tasks, args.submitters)
                print(f"one RPC each: {figures['one_rpc_each']}", flush=True)
            if "batches" in args.phases:
                figures["batches"] = await batches(stub, args.tasks, args.batch, args.batch_concurrency)
                print(f"batches:      {figures['batches']}", flush=True)
            if "fair" in args.phases:
                figures["fair"] = await fairness_and_limits(stub, args)
                print(f"with {args.keys} keys and limits: {figures['fair']}", flush=True)
        return {**figures, "cpus": os.cpu_count()}
    finally:
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--batch-concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument(
        "--phases",
        default="idle,single,batches,fair",
        help="comma-separated: idle, single, batches, fair (the last two again over --keys keys with limits)",
    )
    parser.add_argument("--keys", type=int, default=100, help="concurrency keys in the fair phase")
    parser.add_argument("--worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.slots)
    else:
        print(json.dumps(run_loop(main(args))))
