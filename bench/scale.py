"""Scale: one coordinator with a large backlog of queued tasks, on a real etcd with fsync on.

Grows one stack (etcd, one coordinator; no worker serves the backlog, whose queue is paused) to
--small and then to --tasks queued tasks, and at each size measures:
- tasks_queued, submit_per_s: SubmitTasks batches of 500, --in-flight at once, into the paused queue;
- coordinator_rss_mb (the leader that took them), etcd_db_size_mb (and _in_use_mb, from etcd's
  /metrics), etcd_rss_mb;
- rebuild_s (the new leader's log line) and kill_to_serving_s: SIGKILL the coordinator, start a fresh
  one on a new address (so it probes the dead leader's address and ends its term without waiting out
  the lease), from the kill until ListQueues answers with every backlog task queued;
  coordinator_rss_after_rebuild_mb is the new leader's RSS then, kill_to_serving_cpu the CPU seconds
  the new coordinator and etcd spent from the kill until then;
- dispatch_per_s_with_backlog: --dispatch tasks submitted to a fresh queue, submit to SUCCEEDED, by a
  worker process (bench/throughput.py's) serving the backlog's type while the backlog stays paused;
  dispatch_per_s_empty is the same on the empty stack, before any backlog (each after an unmeasured
  round of 1,000 tasks in another fresh queue); dispatch_cpu_ms_per_1000_* is the coordinator's and
  etcd's CPU per 1,000 of those tasks;
- at the last size, backlog_drain_per_s: the backlog's queue resumed, until the worker has finished
  its first --dispatch tasks.
etcd's backend quota is EmbeddedEtcd's fixed 4 GiB (it takes no option for it) with revision
auto-compaction keeping 10,000 revisions. Prints a human summary and, on its last line, the figures
as JSON keyed by size. A measurement, not a test.

    python bench/scale.py [--tasks 1000000] [--small 100000] [--dispatch 20000] [--payload-bytes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).parent))

import throughput
from throughput import TASK_TYPE, Stack, _answers, _cpu, _track, _until, batches

from herder.clients.embedded_etcd import free_port
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, task_pb2
from herder.clients.runner import run as run_loop

if TYPE_CHECKING:
    from herder.clients.proto.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub as Stub

BACKLOG = "backlog"
BATCH = 500
REBUILT = re.compile(r"rebuilt (\d+) unfinished tasks from etcd in ([\d.]+)s")
MB = 2**20


class ScaleStack(Stack):
    """throughput.Stack with no worker at first, a coordinator logging at info (its rebuild line),
    and what this bench adds: restarting the coordinator, one worker at a time, etcd's figures."""

    def __init__(self, slots: int) -> None:
        super().__init__(workers=0, slots=slots, coordinator_args=("--log-level", "info"))
        self.generation = 0
        self.worker: psutil.Process | None = None

    @property
    def coordinator(self) -> psutil.Process:
        return psutil.Process(self.named[self._coordinator_log()].pid)

    def _coordinator_log(self) -> str:
        return "coordinator" if self.generation == 0 else f"coordinator-{self.generation}"

    def log_text(self) -> str:
        return (Path(self.dir) / f"{self._coordinator_log()}.log").read_text(errors="replace")

    def restart_coordinator(self) -> float:
        """SIGKILL the coordinator and start a fresh one on a new address; returns the kill's time."""
        process = self.named[self._coordinator_log()]
        killed = time.perf_counter()
        os.killpg(process.pid, signal.SIGKILL)
        self.generation += 1
        self.address = f"127.0.0.1:{free_port()}"
        args = ["-m", "herder.server", "--etcd", self.etcd.endpoint, "--listen", self.address]
        self._spawn([*args, *self.coordinator_args], f"{self._coordinator_log()}.log")
        process.wait()
        return killed

    async def start_worker(self, stub: Stub) -> None:
        """bench/throughput.py's worker process (a no-op handler for TASK_TYPE), connected."""
        script = throughput.__file__
        worker = self._spawn([script, "--worker", self.address, "--slots", str(self.slots)], "worker.log")
        self.worker = psutil.Process(worker.pid)

        async def connected() -> bool:
            return len((await stub.ListNodes(pb.ListNodesRequest())).nodes) == 1

        await _until(connected, 30, "worker")

    async def stop_worker(self, stub: Stub) -> None:
        worker = self.named.pop("worker")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        self.worker = None

        async def gone() -> bool:
            return not (await stub.ListNodes(pb.ListNodesRequest())).nodes

        await _until(gone, 60, "worker's session to end")

    def etcd_figures(self) -> dict[str, float]:
        """etcd's backend size (all pages, and those in use) from its /metrics, and its RSS."""
        with urllib.request.urlopen(f"http://{self.etcd.endpoint}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        values = dict(
            line.split(" ", 1)
            for line in text.splitlines()
            if line.startswith(("etcd_mvcc_db_total_size_in_bytes ", "etcd_mvcc_db_total_size_in_use_in_bytes "))
        )
        assert self.etcd.pid is not None
        return {
            "etcd_db_size_mb": round(float(values["etcd_mvcc_db_total_size_in_bytes"]) / MB, 1),
            "etcd_db_size_in_use_mb": round(float(values["etcd_mvcc_db_total_size_in_use_in_bytes"]) / MB, 1),
            "etcd_rss_mb": round(psutil.Process(self.etcd.pid).memory_info().rss / MB, 1),
        }


def _spec(payload: examples_pb2.EchoRequest) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(type=TASK_TYPE, queue=BACKLOG)
    spec.payload.Pack(payload)
    return spec


async def _queued(stub: Stub, queue: str = BACKLOG) -> int:
    reply = await stub.ListQueues(pb.ListQueuesRequest(), timeout=5)
    return next((q.queued for q in reply.queues if q.name == queue), 0)


async def submit(stub: Stub, count: int, in_flight: int, payload_bytes: int) -> float:
    """`count` tasks into the backlog in batches of BATCH, `in_flight` batches at once; returns tasks/s."""
    request = pb.SubmitTasksRequest(specs=[_spec(examples_pb2.EchoRequest(text="x" * payload_bytes))] * BATCH)
    remaining = count // BATCH
    done = 0
    report = time.perf_counter()

    async def submitter() -> None:
        nonlocal remaining, done, report
        while remaining > 0:
            remaining -= 1
            reply = await stub.SubmitTasks(request, timeout=120)
            if any(r.code for r in reply.results):
                raise SystemExit(f"bench: a submission failed: {next(r for r in reply.results if r.code)}")
            done += BATCH
            if time.perf_counter() - report > 15:
                report = time.perf_counter()
                print(f"  ... {done} submitted", flush=True)

    start = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(in_flight)))
    return done / (time.perf_counter() - start)


async def rebuild(stack: ScaleStack, expected: int) -> dict[str, object]:
    """Kill the coordinator, start a fresh one, and time it until it leads with the backlog rebuilt."""
    assert stack.etcd.pid is not None
    etcd = psutil.Process(stack.etcd.pid)
    etcd_cpu = _cpu(etcd)
    killed = stack.restart_coordinator()
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)

        async def serving() -> bool:
            try:
                return await _queued(stub) == expected
            except grpc.aio.AioRpcError:
                return False

        await _until(serving, 600, "the new leader")
        serving_s = time.perf_counter() - killed
        # Whose CPU the rebuild takes: the new coordinator's (its start included) and etcd's.
        cpu = {"coordinator_cpu_s": round(_cpu(stack.coordinator), 1), "etcd_cpu_s": round(_cpu(etcd) - etcd_cpu, 1)}
        match = REBUILT.search(stack.log_text())
        if match is None:
            raise SystemExit("bench: the new leader did not log its rebuild")
        return {
            "rebuild_s": float(match.group(2)),
            "rebuilt_tasks": int(match.group(1)),
            "kill_to_serving_s": round(serving_s, 3),
            "coordinator_rss_after_rebuild_mb": round(stack.coordinator.memory_info().rss / MB, 1),
            "kill_to_serving_cpu": cpu,
        }


async def dispatch(stack: ScaleStack, args: argparse.Namespace, tag: str) -> dict[str, object]:
    """--dispatch tasks into a fresh queue, submit to SUCCEEDED, with one worker: tasks/s, and the
    coordinator's and etcd's CPU milliseconds per 1,000 tasks."""
    assert stack.etcd.pid is not None
    etcd = psutil.Process(stack.etcd.pid)
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stack.start_worker(stub)
        try:
            # A first, unmeasured round: the worker's first tasks and the new queue's set-up are slower.
            await batches(stub, min(args.dispatch, 2 * BATCH), BATCH, args.in_flight, tag=f"{tag}-warm-up")
            cpu = {"coordinator": _cpu(stack.coordinator), "etcd": _cpu(etcd)}
            figures = await batches(stub, args.dispatch, BATCH, args.in_flight, tag=tag)
            tasks = int(figures["tasks"])
            per_1000 = {
                name: round((_cpu(process) - cpu[name]) * 1e6 / tasks, 1)
                for name, process in (("coordinator", stack.coordinator), ("etcd", etcd))
            }
        finally:
            await stack.stop_worker(stub)
    return {"per_s": round(figures["end_to_end_per_s"]), "cpu_ms_per_1000": per_1000}


async def drain(stack: ScaleStack, args: argparse.Namespace) -> float:
    """Resume the backlog's queue with a worker connected; tasks/s until --dispatch of them SUCCEEDED."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stack.start_worker(stub)
        tracker = await _track(stub, BACKLOG, args.dispatch)
        start = time.perf_counter()
        await stub.SetQueuePaused(pb.SetQueuePausedRequest(queue=BACKLOG, paused=False))
        finished = await asyncio.wait_for(tracker, 600)
        await stub.SetQueuePaused(pb.SetQueuePausedRequest(queue=BACKLOG, paused=True))
        await stack.stop_worker(stub)
    return float(args.dispatch / (finished - start))


async def grow(stack: ScaleStack, args: argparse.Namespace, size: int, queued: int) -> dict[str, object]:
    """Submit until `size` tasks are queued (`queued` are already), then measure at that size."""
    async with grpc.aio.insecure_channel(stack.address) as channel:
        stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        rate = await submit(stub, size - queued, args.in_flight, args.payload_bytes)
        count = await _queued(stub)
        figures: dict[str, object] = {
            "tasks_queued": count,
            "submit_per_s": round(rate),
            "coordinator_rss_mb": round(stack.coordinator.memory_info().rss / MB, 1),
            **stack.etcd_figures(),
        }
    print(f"{count} queued: {figures}", flush=True)
    rebuilt = await rebuild(stack, count)
    print(f"  rebuild: {rebuilt}", flush=True)
    figures |= rebuilt
    beside = await dispatch(stack, args, f"-backlog-{size}")
    figures["dispatch_per_s_with_backlog"] = beside["per_s"]
    figures["dispatch_cpu_ms_per_1000_with_backlog"] = beside["cpu_ms_per_1000"]
    print(f"  dispatch with the backlog: {beside}", flush=True)
    return figures


async def main(args: argparse.Namespace) -> dict[str, object]:
    stack = ScaleStack(args.slots)
    try:
        await stack.start()
        empty = await dispatch(stack, args, "-empty")
        print(f"dispatch on the empty stack: {empty}", flush=True)
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub: Stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            await stub.SetQueuePaused(pb.SetQueuePausedRequest(queue=BACKLOG, paused=True))
            await _until(lambda: _answers(stub.ListQueues(pb.ListQueuesRequest())), 10, "coordinator")
        figures: dict[str, object] = {}
        queued = 0
        sizes = sorted({s for s in (args.small, args.tasks) if s > 0})
        for size in sizes:
            at_size = await grow(stack, args, size, queued)
            at_size["dispatch_per_s_empty"] = empty["per_s"]
            at_size["dispatch_cpu_ms_per_1000_empty"] = empty["cpu_ms_per_1000"]
            queued = int(str(at_size["tasks_queued"]))
            figures[str(size)] = at_size
        if sizes and args.drain:
            drained = round(await drain(stack, args))
            figures[str(sizes[-1])]["backlog_drain_per_s"] = drained  # type: ignore[index]
            print(f"backlog drain (first {args.dispatch}): {drained}/s", flush=True)
        return {**figures, "payload_bytes": args.payload_bytes, "cpus": os.cpu_count()}
    finally:
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000, help="the first size measured (0: only --tasks)")
    parser.add_argument("--dispatch", type=int, default=20_000, help="tasks in each dispatch measurement")
    parser.add_argument("--in-flight", type=int, default=4, help="SubmitTasks batches of 500 in flight")
    parser.add_argument("--payload-bytes", type=int, default=100, help="each task's payload text")
    parser.add_argument("--slots", type=int, default=256, help="the worker's slots")
    parser.add_argument("--no-drain", dest="drain", action="store_false", help="skip the backlog drain")
    print(json.dumps(run_loop(main(parser.parse_args()))))
