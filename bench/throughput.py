"""End-to-end throughput and idle latency of one coordinator, on a real etcd with fsync on.

Starts its own etcd, coordinator and worker processes, then measures:
- one RPC per task: N tasks from many concurrent submitters, submit to SUCCEEDED;
- batches: N tasks through SubmitTasks, every task tracked to SUCCEEDED;
- idle submit-to-start latency: one task at a time, from the SubmitTask call to the
  first line of the handler, p50 and p99;
- fair: the first two again with tasks spread over --keys concurrency keys and global,
  queue and key limits set (loose enough not to throttle), to show what fairness costs;
- sidecar: idle latency, one RPC each and batches again for a task type served by a plain-grpc
  handler process (bench/_sidecar_handler.py) behind `herder supervisor` with the same slots,
  with the in-process worker's idle latency measured alongside (alternate submissions;
  sidecar_added_p50_ms is the difference) and each process's CPU per 1,000 tasks for both paths.
Prints a human summary and, on its last line, the figures as JSON. A measurement, not a test.
Tracing's cost: run it with OTEL_TRACES_EXPORTER set (the processes it starts read OTEL_*), e.g. OTLP
over HTTP to `python bench/_otlp_sink.py PORT`, a receiver that accepts and drops every span.

    python bench/throughput.py [--tasks 5000] [--submitters 64] [--batch 500] [--workers 1] [--slots 256]
                               [--keys 100] [--phases idle,single,batches,fair,sidecar] [--coordinator-arg ARG ...]
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
import psutil

from herder.clients import tracing
from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop
from herder.clients.worker import TaskContext, Worker
from herder.clients.worker import run_worker as serve_worker

TASK_TYPE = "bench.noop"
SIDECAR_TYPE = "bench.sidecar"  # served only by the supervisor, so its tasks never reach the in-process worker
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED


def run_worker(address: str, slots: int) -> None:
    """Worker process: a no-op handler on the SDK Worker (traced when OTEL_TRACES_EXPORTER is set)."""
    tracing.configure_from_env("herder-bench-worker")
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
        self.named: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(Path(self.dir) / log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes.append(process)
        self.named[log.removesuffix(".log")] = process
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

    async def start_sidecar(self) -> None:
        """The handler process and `herder supervisor` in front of it, with the workers' slots."""
        handler = f"127.0.0.1:{free_port()}"
        script = str(Path(__file__).with_name("_sidecar_handler.py"))
        self._spawn([script, "--port", handler.rsplit(":", 1)[1], "--type", SIDECAR_TYPE], "handler.log")
        supervisor = ["-m", "herder.supervisor", "--coordinator", self.address, "--handler", handler]
        self._spawn([*supervisor, "--slots", str(self.slots), "--log-level", "warning"], "supervisor.log")
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

            async def connected() -> bool:
                nodes = await stub.ListNodes(pb.ListNodesRequest())
                return len(nodes.nodes) == self.workers + 1

            await _until(connected, 30, "supervisor")

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


def _spec(queue: str, key: str = "", task_type: str = TASK_TYPE) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(type=task_type, queue=queue, concurrency_key=key)
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
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    total: int,
    submitters: int,
    keys: int = 0,
    tag: str = "",
    task_type: str = TASK_TYPE,
) -> dict[str, float]:
    queue = f"one-rpc{tag}"
    tracker = await _track(stub, queue, total)
    requests = [pb.SubmitTaskRequest(spec=_spec(queue, key, task_type)) for key in _keys(keys)]
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
    task_type: str = TASK_TYPE,
) -> dict[str, float]:
    queue = f"batched{tag}"
    tracker = await _track(stub, queue, total)
    names = _keys(keys)
    request = pb.SubmitTasksRequest(specs=[_spec(queue, names[i % len(names)], task_type) for i in range(batch)])
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


async def idle_latency(
    stub: coordinator_pb2_grpc.CoordinatorServiceStub,
    samples: int,
    tag: str = "",
    task_types: tuple[str, ...] = (TASK_TYPE,),
) -> list[dict[str, float]]:
    """Submit one task at a time; submit-to-start runs from the SubmitTask call to the handler's first line.

    With several task types, their submissions alternate (`samples` each) so that noise and drift
    fall on all alike; one result per type, in the given order.
    """
    queue = f"idle{tag}"
    call = stub.WatchTasks(pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True))
    finished: asyncio.Queue[task_pb2.Task] = asyncio.Queue()

    async def consume() -> None:
        async for reply in call:
            await finished.put(reply.event.task)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    requests = [pb.SubmitTaskRequest(spec=_spec(queue, task_type=kind)) for kind in task_types]
    to_start: list[list[float]] = [[] for _ in task_types]
    to_ack: list[list[float]] = [[] for _ in task_types]
    for _ in range(samples):
        for i, request in enumerate(requests):
            t0 = time.time()
            reply = await stub.SubmitTask(request)
            to_ack[i].append(time.time() - t0)
            while True:
                task = await asyncio.wait_for(finished.get(), 10)
                if task.id == reply.task.id:
                    break
            output = examples_pb2.EchoResponse()
            task.result.Unpack(output)
            to_start[i].append(float(output.text) - t0)
            await asyncio.sleep(0.01)  # idle: nothing else in flight
    call.cancel()
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await consumer
    return [
        {
            "samples": samples,
            "submit_to_start_p50_ms": round(_pct(starts, 50) * 1000, 2),
            "submit_to_start_p99_ms": round(_pct(starts, 99) * 1000, 2),
            "submit_ack_p50_ms": round(_pct(acks, 50) * 1000, 2),
        }
        for starts, acks in zip(to_start, to_ack, strict=True)
    ]


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


class CpuMeter:
    """CPU seconds (user + system) the named processes use between start() and per_1000(tasks)."""

    def __init__(self, processes: dict[str, subprocess.Popen[bytes]]) -> None:
        self.processes = {name: psutil.Process(p.pid) for name, p in processes.items()}
        self.start()

    def start(self) -> None:
        self.cpu = {name: _cpu(p) for name, p in self.processes.items()}

    def per_1000(self, tasks: int) -> dict[str, float]:
        """Milliseconds of CPU per 1,000 tasks, per process."""
        return {
            f"{name}_cpu_ms": round((_cpu(p) - self.cpu[name]) * 1e6 / tasks, 1) for name, p in self.processes.items()
        }


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def through_sidecar(
    stack: Stack, stub: coordinator_pb2_grpc.CoordinatorServiceStub, args: argparse.Namespace
) -> dict[str, object]:
    """Idle latency, one RPC each and batches for a task type served through the supervisor.

    The in-process worker's idle latency is measured again, its submissions alternating with the
    sidecar's, so that the difference is not drift between two runs.
    """
    await stack.start_sidecar()
    inprocess, sidecar = await idle_latency(stub, args.latency_samples, "-sidecar", (TASK_TYPE, SIDECAR_TYPE))
    names = ("coordinator", "supervisor", "handler")
    meter = CpuMeter({name: stack.named[name] for name in names})
    single = await one_rpc_each(stub, args.tasks, args.submitters, tag="-sidecar", task_type=SIDECAR_TYPE)
    single_cpu = meter.per_1000(int(single["tasks"]))
    meter.start()
    batched = await batches(
        stub, args.tasks, args.batch, args.batch_concurrency, tag="-sidecar", task_type=SIDECAR_TYPE
    )
    batched_cpu = meter.per_1000(int(batched["tasks"]))
    return {
        "sidecar_added_p50_ms": round(sidecar["submit_to_start_p50_ms"] - inprocess["submit_to_start_p50_ms"], 2),
        "sidecar_added_p99_ms": round(sidecar["submit_to_start_p99_ms"] - inprocess["submit_to_start_p99_ms"], 2),
        "inprocess_idle": inprocess,
        "idle": sidecar,
        "one_rpc_each": {**single, "cpu_per_1000_tasks": single_cpu},
        "batches": {**batched, "cpu_per_1000_tasks": batched_cpu},
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    stack = Stack(args.workers, args.slots, tuple(args.coordinator_arg))
    try:
        await stack.start()
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            figures: dict[str, object] = {}
            if "idle" in args.phases:
                (figures["idle"],) = await idle_latency(stub, args.latency_samples)
                print(f"idle latency: {figures['idle']}", flush=True)
            # The in-process path's CPU, to set beside the sidecar's.
            meter = CpuMeter(dict(stack.named))  # the coordinator and worker-<i>
            if "single" in args.phases:
                meter.start()
                single = await one_rpc_each(stub, args.tasks, args.submitters)
                figures["one_rpc_each"] = {**single, "cpu_per_1000_tasks": meter.per_1000(int(single["tasks"]))}
                print(f"one RPC each: {figures['one_rpc_each']}", flush=True)
            if "batches" in args.phases:
                meter.start()
                batched = await batches(stub, args.tasks, args.batch, args.batch_concurrency)
                figures["batches"] = {**batched, "cpu_per_1000_tasks": meter.per_1000(int(batched["tasks"]))}
                print(f"batches:      {figures['batches']}", flush=True)
            if "fair" in args.phases:
                figures["fair"] = await fairness_and_limits(stub, args)
                print(f"with {args.keys} keys and limits: {figures['fair']}", flush=True)
            if "sidecar" in args.phases:
                figures["sidecar"] = await through_sidecar(stack, stub, args)
                print(f"through the sidecar: {figures['sidecar']}", flush=True)
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
        default="idle,single,batches,fair,sidecar",
        help="comma-separated: idle, single, batches, fair (the last two again over --keys keys with limits), "
        "sidecar (idle, single and batches through herder supervisor and a plain-grpc handler)",
    )
    parser.add_argument("--keys", type=int, default=100, help="concurrency keys in the fair phase")
    parser.add_argument(
        "--coordinator-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra coordinator flag, repeatable; what metrics and logs cost:"
        " --coordinator-arg=--log-level=info --coordinator-arg=--metrics=127.0.0.1:9464",
    )
    parser.add_argument("--worker", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.slots)
    else:
        print(json.dumps(run_loop(main(args))))
