"""End-to-end throughput and latency of the coordinator, on a real etcd with fsync on.

Starts its own etcd, coordinator and worker processes, then measures:
- idle submit-to-start latency: one task at a time, from the SubmitTask call to the
  first line of the handler, p50 and p99;
- one RPC per task: N tasks from many concurrent submitters, submit to SUCCEEDED;
- batches: N tasks through SubmitTasks, every task tracked to SUCCEEDED;
- fair: the last two again with tasks spread over --keys concurrency keys and global,
  queue and key limits set (loose enough not to throttle), to show what fairness costs;
- open_loop: one SubmitTask per task at each of --rates tasks/s for --rate-seconds each, every
  submission sent at its time on a shared clock whatever the answers (at most --max-in-flight
  unanswered; a submission sent more than 10 ms after its time counts as `late`, failed ones are
  counted per status code); per rate the
  achieved submitted/s and started/s and the submit-to-start p50 and p99 (the handler's start times
  read from one WatchTasks stream, joined with the submit times the bench recorded), and the highest
  rate held (started/s within 5% of offered, no failures, at most 1% late) with p99 under 25 ms;
- supervisor (alias: sidecar; its JSON stays under "sidecar"): idle latency, one RPC each and batches
  again for a task type served by a plain-grpc handler process (bench/_sidecar_handler.py) behind
  `herder supervisor` with the same slots, with the in-process worker's idle latency measured
  alongside (alternate submissions; sidecar_added_p50_ms is the difference) and each process's CPU
  per 1,000 tasks for both paths; when open_loop is among the phases too, the open-loop rates again
  through the supervisor;
- ha: --followers more coordinator replicas on the same etcd and namespace (followers watching etcd;
  the first coordinator stays leader), one RPC each and batches against the leader, the leader's and
  each follower's CPU per 1,000 tasks, and the leader's beside the coordinator's alone in the same two
  runs just before the followers start (leader_cost_vs_single_pct). The followers serve no watchers
  here, so their task feeds (started by a WatchTasks) do not run.
For every run of N tasks end to end: CPU per 1,000 tasks of the coordinator(s), workers, etcd and this
bench process, and etcd's durable work per task from its /metrics before and after (proposals committed,
multi-op txns, puts, deletes, WAL fsyncs and bytes).
Prints a human summary and, on its last line, the figures as JSON. A measurement, not a test.
Every process it starts is stopped when it ends, also on Ctrl-C, SIGTERM or an error.
Tracing's cost: run it with OTEL_TRACES_EXPORTER set (the processes it starts read OTEL_*), e.g. OTLP
over HTTP to `python bench/_otlp_sink.py PORT`, a receiver that accepts and drops every span.

    python bench/throughput.py [--tasks 5000] [--submitters 64] [--batch 500] [--workers 1] [--slots 256]
                               [--keys 100] [--rates 500,1000,2000,4000] [--rate-seconds 20]
                               [--max-in-flight 20000] [--followers 2]
                               [--phases idle,single,batches,fair,open_loop,supervisor,ha]
                               [--coordinator-arg ARG ...]
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
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil

from herder.clients import tracing
from herder.clients.client import WATCH_MAX_EVENTS
from herder.clients.descriptors import task_type_for
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop
from herder.clients.worker import TaskContext, Worker
from herder.clients.worker import run_worker as serve_worker

if TYPE_CHECKING:
    from herder.clients.proto.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

TASK_TYPE = "bench.noop"
SIDECAR_TYPE = "bench.sidecar"  # served only by the supervisor, so its tasks never reach the in-process worker
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
NAMESPACE = "default"  # every coordinator replica's, spelled out for the ha phase's followers
LATE_AFTER = 0.010  # an open-loop submission sent later than this after its time is late
PHASES = ("idle", "single", "batches", "fair", "open_loop", "supervisor", "ha")
ALIASES = {"sidecar": "supervisor"}


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
        self._spawn(self._coordinator(self.address), "coordinator.log")
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            await _until(lambda: _answers(stub.ListNodes(pb.ListNodesRequest(), timeout=1)), 30, "coordinator")
            task_type = task_type_for(TASK_TYPE, examples_pb2.EchoRequest, examples_pb2.EchoResponse)
            await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
            for i in range(self.workers):
                self._spawn([__file__, "--worker", self.address, "--slots", str(self.slots)], f"worker-{i}.log")

            async def connected() -> bool:
                nodes = await stub.ListNodes(pb.ListNodesRequest())
                return len(nodes.nodes) == self.workers

            await _until(connected, 30, "workers")

    def _coordinator(self, listen: str) -> list[str]:
        args = ["-m", "herder.server", "--etcd", self.etcd.endpoint, "--namespace", NAMESPACE, "--listen", listen]
        return [*args, "--log-level", "warning", *self.coordinator_args]

    async def start_followers(self, count: int) -> list[str]:
        """`count` more coordinator replicas on the same etcd and namespace, started after the first
        (which leads); returns their names, follower-<i>, once the leader lists them all."""
        names = [f"follower-{i + 1}" for i in range(count)]
        for name in names:
            self._spawn(self._coordinator(f"127.0.0.1:{free_port()}"), f"{name}.log")
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

            async def listed() -> bool:
                status = await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
                return len(status.replicas) == count + 1

            await _until(listed, 30, "followers")
            status = await stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5)
            if status.leader_address != self.address:
                raise SystemExit(f"bench: {status.leader_address} leads, not the first coordinator {self.address}")
        return names

    async def start_sidecar(self) -> None:
        """The handler process and `herder supervisor` in front of it, with the workers' slots."""
        handler = f"127.0.0.1:{free_port()}"
        script = str(Path(__file__).with_name("_sidecar_handler.py"))
        self._spawn([script, "--port", handler.rsplit(":", 1)[1], "--type", SIDECAR_TYPE], "handler.log")
        supervisor = ["-m", "herder.supervisor", "--coordinator", self.address, "--handler", handler]
        self._spawn([*supervisor, "--slots", str(self.slots), "--log-level", "warning"], "supervisor.log")
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

            async def connected() -> bool:
                nodes = await stub.ListNodes(pb.ListNodesRequest())
                return len(nodes.nodes) == self.workers + 1

            await _until(connected, 30, "supervisor")

    def stop(self) -> None:
        """Stop every process it started (SIGTERM, SIGKILL after 10 s), then etcd; safe to call twice."""
        for process in reversed(self.processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
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


def _watch_succeeded(
    stub: CoordinatorServiceAsyncStub, queue: str
) -> grpc.aio.UnaryStreamCall[pb.WatchTasksRequest, pb.WatchTasksResponse]:
    """The queue's tasks as they succeed, from now on, batched like the SDK's watches."""
    request = pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True, max_events=WATCH_MAX_EVENTS)
    return stub.WatchTasks(request)


def _events(reply: pb.WatchTasksResponse) -> Sequence[task_pb2.TaskEvent]:
    """A response's events: several with max_events (as the SDK asks), else the one."""
    return reply.events or [reply.event]


def _keys(count: int) -> list[str]:
    return [f"tenant-{i}" for i in range(count)] if count else [""]


async def _track(stub: CoordinatorServiceAsyncStub, queue: str, count: int) -> asyncio.Task[float]:
    """Watch a queue until `count` tasks have SUCCEEDED; the task's result is the time of the last one."""
    call = stub.WatchTasks(
        pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True, max_events=WATCH_MAX_EVENTS)
    )
    ready = asyncio.Event()

    async def consume() -> float:
        done: set[str] = set()
        ready.set()
        async for reply in call:
            done.update(event.task.id for event in _events(reply))
            if len(done) >= count:
                call.cancel()
                return time.perf_counter()
        raise RuntimeError("watch ended early")

    task = asyncio.create_task(consume())
    await ready.wait()
    await asyncio.sleep(0.2)  # let the watch register on the coordinator
    return task


async def one_rpc_each(
    stub: CoordinatorServiceAsyncStub,
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
    stub: CoordinatorServiceAsyncStub,
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
    stub: CoordinatorServiceAsyncStub,
    samples: int,
    tag: str = "",
    task_types: tuple[str, ...] = (TASK_TYPE,),
) -> list[dict[str, float]]:
    """Submit one task at a time; submit-to-start runs from the SubmitTask call to the handler's first line.

    With several task types, their submissions alternate (`samples` each) so that noise and drift
    fall on all alike; one result per type, in the given order.
    """
    queue = f"idle{tag}"
    call = stub.WatchTasks(
        pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True, max_events=WATCH_MAX_EVENTS)
    )
    finished: asyncio.Queue[task_pb2.Task] = asyncio.Queue()

    async def consume() -> None:
        async for reply in call:
            for event in _events(reply):
                await finished.put(event.task)

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
    stub: CoordinatorServiceAsyncStub, meter: Meter, args: argparse.Namespace
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
    single = await measured(meter, one_rpc_each(stub, args.tasks, args.submitters, args.keys, "-fair"))
    batched = await measured(meter, batches(stub, args.tasks, args.batch, args.batch_concurrency, args.keys, "-fair"))
    return {"one_rpc_each": single, "batches": batched}


# etcd's counters of durable work, by the name each figure has per task.
ETCD_COUNTERS = {
    "etcd_proposals_per_task": "etcd_server_proposals_committed_total",  # raft entries: one per write request
    "etcd_txns_per_task": "etcd_mvcc_txn_total",  # write transactions of more than one operation
    "etcd_puts_per_task": "etcd_mvcc_put_total",
    "etcd_deletes_per_task": "etcd_mvcc_delete_total",
    "etcd_fsyncs_per_task": "etcd_disk_wal_fsync_duration_seconds_count",
    "etcd_wal_bytes_per_task": "etcd_disk_wal_write_bytes_total",
}


def _etcd_counters(url: str) -> dict[str, float]:
    """etcd's Prometheus counters named in ETCD_COUNTERS (unlabelled), from its /metrics."""
    wanted = set(ETCD_COUNTERS.values())
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            counters[name] = float(value)
    return counters


class Meter:
    """What a run of N tasks cost, between start() and report(N): CPU seconds (user + system) of the
    named processes, of etcd and of this bench process, and etcd's durable work from its /metrics."""

    def __init__(self, stack: Stack, names: Iterable[str]) -> None:
        self.processes = {name: psutil.Process(stack.named[name].pid) for name in names}
        assert stack.etcd.pid is not None, "etcd runs"
        self.processes["etcd"] = psutil.Process(stack.etcd.pid)
        self.processes["bench"] = psutil.Process()
        self.metrics_url = f"http://{stack.etcd.endpoint}/metrics"
        self.cpu: dict[str, float] = {}
        self.counters: dict[str, float] = {}

    async def start(self) -> None:
        self.cpu = {name: _cpu(p) for name, p in self.processes.items()}
        self.counters = await asyncio.to_thread(_etcd_counters, self.metrics_url)

    async def report(self, tasks: int) -> dict[str, object]:
        """`cpu_per_1000_tasks` (milliseconds per process) and etcd's counters per task; etcd's are
        those present in this version (an absent counter has no figure)."""
        cpu = {
            f"{name}_cpu_ms": round((_cpu(p) - self.cpu[name]) * 1e6 / tasks, 1) for name, p in self.processes.items()
        }
        counters = await asyncio.to_thread(_etcd_counters, self.metrics_url)
        etcd = {
            figure: round((counters[name] - self.counters[name]) / tasks, 2 if "bytes" not in name else 0)
            for figure, name in ETCD_COUNTERS.items()
            if name in counters and name in self.counters
        }
        return {"cpu_per_1000_tasks": cpu, **etcd}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measured(meter: Meter, run: Awaitable[dict[str, float]]) -> dict[str, object]:
    """A run's figures with what it cost (Meter.report), the meter started just before it."""
    await meter.start()
    figures = await run
    return {**figures, **await meter.report(int(figures["tasks"]))}


async def open_loop(
    stub: CoordinatorServiceAsyncStub,
    rate: int,
    seconds: float,
    max_in_flight: int,
    tag: str = "",
    task_type: str = TASK_TYPE,
) -> dict[str, float]:
    """rate * seconds tasks, one SubmitTask each, each sent at its time from the start whatever the answers.

    Sends wait only when max_in_flight submissions are unanswered; a send more than LATE_AFTER behind
    its time is counted late. Submit-to-start joins the time each SubmitTask was called (by the task id
    it returned) with the handler's start time from the task's result, read on one WatchTasks stream.
    Returns once every accepted task has SUCCEEDED; raises RuntimeError when they have not 600 s after
    the last answer, or when the watch ends first (the coordinator ends a watcher that falls behind).
    """
    queue = f"open-loop-{rate}{tag}"
    total = max(int(rate * seconds), 1)
    request = pb.SubmitTaskRequest(spec=_spec(queue, task_type=task_type))
    call = stub.WatchTasks(
        pb.WatchTasksRequest(queue=queue, states=[SUCCEEDED], skip_initial=True, max_events=WATCH_MAX_EVENTS)
    )
    started: dict[str, float] = {}
    submitted: dict[str, float] = {}
    expected = total  # lowered to the accepted submissions once all are answered
    all_started = asyncio.Event()

    async def consume() -> None:
        output = examples_pb2.EchoResponse()
        async for reply in call:
            for event in _events(reply):
                event.task.result.Unpack(output)
                started[event.task.id] = float(output.text)
            if len(started) >= expected:
                all_started.set()

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.2)  # let the watch register on the coordinator
    in_flight = peak = late = 0
    failed: dict[str, int] = {}  # by status code
    slot_free = asyncio.Event()
    last_answer = 0.0

    async def submit() -> None:
        nonlocal in_flight, last_answer
        t0 = time.time()
        try:
            reply = await stub.SubmitTask(request)
            submitted[reply.task.id] = t0
        except grpc.aio.AioRpcError as exc:
            failed[exc.code().name] = failed.get(exc.code().name, 0) + 1
        finally:
            in_flight -= 1
            last_answer = time.time()
            slot_free.set()

    loop = asyncio.get_running_loop()
    sends: set[asyncio.Task[None]] = set()
    begin, wall_begin = loop.time(), time.time()
    sent = 0
    try:
        while sent < total:
            now = loop.time()
            due = min(total, int((now - begin) * rate) + 1)
            while sent < due and in_flight < max_in_flight:
                late += now - (begin + sent / rate) > LATE_AFTER
                in_flight += 1
                peak = max(peak, in_flight)
                send = asyncio.create_task(submit())
                sends.add(send)
                send.add_done_callback(sends.discard)
                sent += 1
            if sent < due:  # at the in-flight bound: the next send waits for an answer
                slot_free.clear()
                await slot_free.wait()
            else:
                await asyncio.sleep(max(0.0, begin + sent / rate - loop.time()))
        await asyncio.gather(*sends)
        expected = len(submitted)
        if len(started) >= expected:
            all_started.set()
        # The coordinator ends a watch that falls too far behind (RESOURCE_EXHAUSTED): stop waiting then.
        waiter = asyncio.create_task(all_started.wait())
        await asyncio.wait((waiter, consumer), timeout=600, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not all_started.is_set():
            error = consumer.exception() if consumer.done() else None
            why = f"the watch ended ({error or 'no error'})" if consumer.done() else "not within 600 s"
            raise RuntimeError(f"open loop at {rate}/s: {len(started)} of {expected} tasks seen started: {why}")
    finally:
        for send in sends:
            send.cancel()
        call.cancel()
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await consumer
    to_start = [started[task_id] - t0 for task_id, t0 in submitted.items() if task_id in started]
    last_start = max(started.values(), default=0.0)
    return {
        "tasks": total,
        "accepted": len(submitted),
        "offered_per_s": rate,
        "submitted_per_s": round(len(submitted) / (last_answer - wall_begin)),
        "started_per_s": round(len(started) / (last_start - wall_begin)) if started else 0,
        "submit_to_start_p50_ms": round(_pct(to_start, 50) * 1000, 2),
        "submit_to_start_p99_ms": round(_pct(to_start, 99) * 1000, 2),
        "late": late,
        "failed": sum(failed.values()),
        **{f"failed_{code.lower()}": count for code, count in sorted(failed.items())},
        "peak_in_flight": peak,
    }


def _held(run: dict[str, float]) -> bool:
    """The rate was held: started/s within 5% of offered, no failed submission, at most 1% late."""
    return (
        run["started_per_s"] >= 0.95 * run["offered_per_s"]
        and run["failed"] == 0
        and run["late"] <= 0.01 * run["tasks"]
    )


async def open_loop_rates(
    stub: CoordinatorServiceAsyncStub,
    meter: Meter,
    args: argparse.Namespace,
    tag: str = "",
    task_type: str = TASK_TYPE,
) -> dict[str, object]:
    """open_loop at each of args.rates, each metered (per accepted task), and the highest rate held with
    p99 under 25 ms."""
    runs: list[dict[str, object]] = []
    good: list[int] = []
    for rate in args.rates:
        await meter.start()
        run = await open_loop(stub, rate, args.rate_seconds, args.max_in_flight, tag, task_type)
        runs.append({**run, **await meter.report(max(int(run["accepted"]), 1))})
        if _held(run) and run["submit_to_start_p99_ms"] < 25:
            good.append(rate)
        print(
            f"  open loop{tag} {rate}/s: submitted {run['submitted_per_s']}/s, started {run['started_per_s']}/s,"
            f" submit-to-start p50 {run['submit_to_start_p50_ms']} ms p99 {run['submit_to_start_p99_ms']} ms,"
            f" late {run['late']}, failed {run['failed']}",
            flush=True,
        )
        await asyncio.sleep(1)  # let the last run's writes settle before the next is metered
    return {"rates": runs, "highest_rate_p99_under_25ms": max(good, default=None)}


async def through_supervisor(
    stack: Stack, stub: CoordinatorServiceAsyncStub, args: argparse.Namespace
) -> dict[str, object]:
    """Idle latency, one RPC each and batches for a task type served through the supervisor, and the
    open-loop rates when open_loop is among the phases.

    The in-process worker's idle latency is measured again, its submissions alternating with the
    sidecar's, so that the difference is not drift between two runs.
    """
    await stack.start_sidecar()
    inprocess, sidecar = await idle_latency(stub, args.latency_samples, "-sidecar", (TASK_TYPE, SIDECAR_TYPE))
    meter = Meter(stack, ("coordinator", "supervisor", "handler"))
    single = await measured(
        meter, one_rpc_each(stub, args.tasks, args.submitters, tag="-sidecar", task_type=SIDECAR_TYPE)
    )
    batched = await measured(
        meter, batches(stub, args.tasks, args.batch, args.batch_concurrency, tag="-sidecar", task_type=SIDECAR_TYPE)
    )
    figures: dict[str, object] = {
        "sidecar_added_p50_ms": round(sidecar["submit_to_start_p50_ms"] - inprocess["submit_to_start_p50_ms"], 2),
        "sidecar_added_p99_ms": round(sidecar["submit_to_start_p99_ms"] - inprocess["submit_to_start_p99_ms"], 2),
        "inprocess_idle": inprocess,
        "idle": sidecar,
        "one_rpc_each": single,
        "batches": batched,
    }
    if "open_loop" in args.phases:
        figures["open_loop"] = await open_loop_rates(stub, meter, args, "-sidecar", SIDECAR_TYPE)
    return figures


async def high_availability(
    stack: Stack,
    stub: CoordinatorServiceAsyncStub,
    args: argparse.Namespace,
) -> dict[str, object]:
    """One RPC each and batches against the leader with args.followers follower replicas running,
    beside the same two runs with the coordinator alone, measured just before the followers start
    (not taken from the single and batches phases: the coordinator's state and the machine's load
    by then are closer to the runs they are compared with); then, with the followers, the idle
    latency and (when open_loop is among the phases) the open-loop rates."""
    workers = [f"worker-{i}" for i in range(args.workers)]
    alone = Meter(stack, ("coordinator", *workers))
    runs: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
        "one_rpc_each": lambda tag: one_rpc_each(stub, args.tasks, args.submitters, tag=tag),
        "batches": lambda tag: batches(stub, args.tasks, args.batch, args.batch_concurrency, tag=tag),
    }
    baseline = {name: await measured(alone, run("-ha-single")) for name, run in runs.items()}
    followers = await stack.start_followers(args.followers)
    await asyncio.sleep(1)  # past the followers' start-up reads of etcd
    meter = Meter(stack, ("coordinator", *followers, *workers))
    figures: dict[str, object] = {"followers": len(followers)}
    for name, run in runs.items():
        ha = await measured(meter, run("-ha"))
        cpu = ha["cpu_per_1000_tasks"]
        single_cpu = baseline[name]["cpu_per_1000_tasks"]
        assert isinstance(cpu, dict) and isinstance(single_cpu, dict)
        leader, single = float(cpu["coordinator_cpu_ms"]), float(single_cpu["coordinator_cpu_ms"])
        figures[name] = {
            **ha,
            "leader_cpu_ms": leader,
            "follower_cpu_ms": [cpu[f"{f}_cpu_ms"] for f in followers],
            "single_coordinator_cpu_ms": single,
            "single_end_to_end_per_s": baseline[name]["end_to_end_per_s"],
            "leader_cost_vs_single_pct": round((leader / single - 1) * 100, 1),
        }
    (figures["idle"],) = await idle_latency(stub, args.latency_samples, "-ha")
    if "open_loop" in args.phases:
        figures["open_loop"] = await open_loop_rates(stub, meter, args, "-ha")
    return figures


async def main(args: argparse.Namespace) -> dict[str, object]:
    # SIGTERM ends the run like Ctrl-C does: through the finally that stops every process.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    stack = Stack(args.workers, args.slots, tuple(args.coordinator_arg))
    try:
        await stack.start()
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            figures: dict[str, object] = {}
            if "idle" in args.phases:
                (figures["idle"],) = await idle_latency(stub, args.latency_samples)
                print(f"idle latency: {figures['idle']}", flush=True)
            # The in-process path's costs, to set beside the sidecar's and the ha phase's.
            meter = Meter(stack, list(stack.named))  # the coordinator and worker-<i>
            if "single" in args.phases:
                figures["one_rpc_each"] = await measured(meter, one_rpc_each(stub, args.tasks, args.submitters))
                print(f"one RPC each: {figures['one_rpc_each']}", flush=True)
            if "batches" in args.phases:
                figures["batches"] = await measured(
                    meter, batches(stub, args.tasks, args.batch, args.batch_concurrency)
                )
                print(f"batches:      {figures['batches']}", flush=True)
            if "fair" in args.phases:
                figures["fair"] = await fairness_and_limits(stub, meter, args)
                print(f"with {args.keys} keys and limits: {figures['fair']}", flush=True)
            if "open_loop" in args.phases:
                print(f"open loop, {args.rate_seconds:g} s per rate:", flush=True)
                figures["open_loop"] = await open_loop_rates(stub, meter, args)
                print(f"open loop: {figures['open_loop']}", flush=True)
            if "supervisor" in args.phases:
                figures["sidecar"] = await through_supervisor(stack, stub, args)
                print(f"through the supervisor: {figures['sidecar']}", flush=True)
            if "ha" in args.phases:  # last: the followers run until the end
                figures["ha"] = await high_availability(stack, stub, args)
                print(f"with {args.followers} followers: {figures['ha']}", flush=True)
        return {**figures, "cpus": os.cpu_count()}
    finally:
        stack.stop()


def _phases(value: str) -> set[str]:
    phases = {ALIASES.get(name, name) for name in value.split(",") if name}
    unknown = phases - set(PHASES)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {', '.join(sorted(unknown))}; known: {', '.join(PHASES)}")
    return phases


def _rates(value: str) -> list[int]:
    return [int(rate) for rate in value.split(",")]


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
        type=_phases,
        default=",".join(PHASES),
        help="comma-separated: idle, single, batches, fair (the last two again over --keys keys with limits), "
        "open_loop (one SubmitTask per task at each of --rates), supervisor or its alias sidecar (idle, single, "
        "batches and, with open_loop, the rates through herder supervisor and a plain-grpc handler), "
        "ha (single and batches with --followers more coordinators)",
    )
    parser.add_argument(
        "--rates", type=_rates, default=[500, 1000, 2000, 4000], help="open-loop tasks/s, comma-separated"
    )
    parser.add_argument("--rate-seconds", type=float, default=20, help="how long each open-loop rate is held")
    parser.add_argument("--max-in-flight", type=int, default=20000, help="open loop: unanswered submissions at most")
    parser.add_argument("--followers", type=int, default=2, help="follower coordinators in the ha phase")
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
        try:
            print(json.dumps(run_loop(main(args))))
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise SystemExit("bench: interrupted; every process it started is stopped") from None
