"""End-to-end throughput while many WatchTasks streams watch the whole namespace.

Starts its own etcd (fsync on), coordinator and worker (bench/throughput.py's Stack), then
runs the one-RPC-per-task measurement of bench/throughput.py: with no extra watchers, with
--watchers streams that read every event, and with --watchers streams that stop reading after
their first event (as in the defect report: 500 streams that do not read), twice: runs of
500 tasks until the coordinator has ended them all, then --tasks with the same streams still
open. The watchers live in a separate process, one channel per 50 streams, and watch
everything (no filter, skip_initial). For each run it prints tasks/s, the CPU of the
coordinator and of the watcher process, and how many watchers the coordinator ended for
falling behind; JSON on the last line.

The coordinator runs with --watch-backlog 2000 (its default is 10,000) so the non-reading
watchers are ended within a short run: until a stream's HTTP/2 window is full (thousands of
small events here) a watcher that does not read costs as much as one that does.

    python bench/watchers.py [--tasks 3000] [--watchers 500] [--reading-tasks 600] [--watch-backlog 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).parent))

from throughput import Stack, _spec, one_rpc_each

from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc
from herder.clients.runner import run as run_loop

if TYPE_CHECKING:
    from herder.clients.proto.v1.coordinator_pb2_grpc import CoordinatorServiceAsyncStub

STREAMS_PER_CHANNEL = 50
DROPPED = "ended and its backlog released"


async def run_watchers(address: str, count: int, read: bool) -> None:
    """Watcher process: `count` streams watching everything; prints "ready" once each has an event."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(-(-count // STREAMS_PER_CHANNEL))]
    started = 0
    ready = asyncio.Event()

    async def watch(channel: grpc.aio.Channel) -> None:
        nonlocal started
        call = coordinator_pb2_grpc.CoordinatorServiceStub(channel).WatchTasks(pb.WatchTasksRequest(skip_initial=True))
        first = True
        try:
            async for _ in call:
                if first:
                    first = False
                    started += 1
                    if started == count:
                        ready.set()
                    if not read:
                        await asyncio.Event().wait()  # never read again
        except grpc.aio.AioRpcError as exc:
            print(f"watch ended: {exc.code().name}", flush=True)

    tasks = [asyncio.create_task(watch(channels[i // STREAMS_PER_CHANNEL])) for i in range(count)]
    await ready.wait()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for task in tasks:
            task.cancel()


class Watchers:
    """The watcher process for one run; killed (its streams closed) on exit."""

    def __init__(self, stack: Stack, count: int, read: bool) -> None:
        self.stack, self.count, self.read = stack, count, read
        self.log = Path(stack.dir) / f"watchers-{'read' if read else 'stall'}.log"
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> Watchers:
        mode = "read" if self.read else "stall"
        args = [__file__, "--watch", self.stack.address, "--count", str(self.count), "--mode", mode]
        self.process = self.stack._spawn(args, self.log.name)
        # A stream's first event tells it is registered: submit markers until every one has had one.
        async with grpc.aio.insecure_channel(self.stack.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            deadline = time.monotonic() + 60
            while "ready" not in self.log.read_text(errors="replace"):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"bench: watchers not ready\n{self.log.read_text(errors='replace')[-2000:]}")
                await stub.SubmitTask(pb.SubmitTaskRequest(spec=_spec("marker")))
                await asyncio.sleep(0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None:
            _kill(self.process)


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _dropped(stack: Stack) -> int:
    return (Path(stack.dir) / "coordinator.log").read_text(errors="replace").count(DROPPED)


class Meter:
    """CPU of the coordinator and the watcher process, and watchers ended, over a run."""

    def __init__(self, stack: Stack, watchers: Watchers | None = None) -> None:
        self.stack = stack
        self.processes = {"coordinator": psutil.Process(stack.processes[0].pid)}
        if watchers is not None and watchers.process is not None:
            self.processes["watcher_process"] = psutil.Process(watchers.process.pid)
        self.cpu = {name: _cpu(p) for name, p in self.processes.items()}
        self.dropped = _dropped(stack)
        self.start = time.perf_counter()

    def figures(self) -> dict[str, object]:
        elapsed = time.perf_counter() - self.start
        cpu = {
            f"{name}_cpu_pct": round(100 * (_cpu(p) - self.cpu[name]) / elapsed) for name, p in self.processes.items()
        }
        return {**cpu, "watchers_ended": _dropped(self.stack) - self.dropped}


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def measured(
    stack: Stack,
    stub: CoordinatorServiceAsyncStub,
    tasks: int,
    submitters: int,
    tag: str,
    watchers: Watchers | None = None,
) -> dict[str, object]:
    """One one-RPC-per-task run of `tasks` tasks."""
    meter = Meter(stack, watchers)
    figures = await one_rpc_each(stub, tasks, submitters, tag=tag)
    return {"tasks": tasks, "end_to_end_per_s": figures["end_to_end_per_s"], **meter.figures()}


async def until_ended(
    stack: Stack, stub: CoordinatorServiceAsyncStub, args: argparse.Namespace, watchers: Watchers
) -> dict[str, object]:
    """Runs of 500 tasks until the coordinator has ended every non-reading watcher (or --give-up seconds pass)."""
    meter = Meter(stack, watchers)
    tasks = 0
    while _dropped(stack) - meter.dropped < args.watchers and time.perf_counter() - meter.start < args.give_up:
        await one_rpc_each(stub, 500, args.submitters, tag=f"-stalled-{tasks}")
        tasks += 500
    elapsed = time.perf_counter() - meter.start
    return {"tasks": tasks, "end_to_end_per_s": round(tasks / elapsed), "seconds": round(elapsed, 1), **meter.figures()}


async def main(args: argparse.Namespace) -> dict[str, object]:
    stack = Stack(args.workers, args.slots, ("--watch-backlog", str(args.watch_backlog)))
    try:
        await stack.start()
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub: CoordinatorServiceAsyncStub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            figures: dict[str, object] = {}
            figures["no_watchers"] = await measured(stack, stub, args.tasks, args.submitters, "-none")
            print(f"no watchers:                {figures['no_watchers']}", flush=True)
            async with Watchers(stack, args.watchers, read=True) as reading:
                figures["reading"] = await measured(stack, stub, args.reading_tasks, args.submitters, "-read", reading)
            print(f"{args.watchers} reading watchers:      {figures['reading']}", flush=True)
            async with Watchers(stack, args.watchers, read=False) as stalled:
                figures["not_reading"] = await until_ended(stack, stub, args, stalled)
                print(f"{args.watchers} non-reading, until ended: {figures['not_reading']}", flush=True)
                # The same streams, still open and still not read, once the coordinator has ended them.
                figures["not_reading_after"] = await measured(
                    stack, stub, args.tasks, args.submitters, "-after", stalled
                )
                print(f"  the same streams, ended:  {figures['not_reading_after']}", flush=True)
        return {**figures, "watchers": args.watchers, "watch_backlog": args.watch_backlog, "cpus": os.cpu_count()}
    finally:
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000, help="tasks in the runs without watchers and after")
    parser.add_argument("--reading-tasks", type=int, default=600, help="tasks in the run with reading watchers")
    parser.add_argument(
        "--watch-backlog", type=int, default=2000, help="the coordinator's --watch-backlog (its default is 10000)"
    )
    parser.add_argument("--give-up", type=float, default=60, help="seconds to wait for the non-reading to be ended")
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--watch", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["read", "stall"], default="read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watch:
        run_loop(run_watchers(args.watch, args.count, args.mode == "read"))
    else:
        print(json.dumps(run_loop(main(args))))
