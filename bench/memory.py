"""Coordinator memory with many queued tasks: resident set size before and after queueing N tasks.

Starts its own etcd (fsync on) and a coordinator with no worker, submits N small tasks
through SubmitTasks across --keys concurrency keys, and reads the
coordinator's RSS with psutil. Prints the figures; JSON on the last line.

    python bench/memory.py [--tasks 100000] [--keys 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).parent))

from throughput import Stack, _keys, _spec

from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc
from herder.clients.runner import run as run_loop


async def main(args: argparse.Namespace) -> dict[str, object]:
    stack = Stack(workers=0, slots=1)
    try:
        await stack.start()
        coordinator = psutil.Process(stack.processes[0].pid)
        async with grpc.aio.insecure_channel(stack.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            before = coordinator.memory_info().rss
            names = _keys(args.keys)
            batch = 1000
            for start in range(0, args.tasks, batch):
                specs = [
                    _spec("memory", names[(start + i) % len(names)]) for i in range(min(batch, args.tasks - start))
                ]
                reply = await stub.SubmitTasks(pb.SubmitTasksRequest(specs=specs))
                assert all(r.code == 0 for r in reply.results)
            queued = (await stub.ListQueues(pb.ListQueuesRequest())).queues[0].queued
            after = coordinator.memory_info().rss
        return {
            "tasks": args.tasks,
            "queued": queued,
            "keys": args.keys,
            "rss_before_mb": round(before / 2**20, 1),
            "rss_after_mb": round(after / 2**20, 1),
            "bytes_per_task": round((after - before) / max(args.tasks, 1)),
        }
    finally:
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1000)
    figures = run_loop(main(parser.parse_args()))
    print(
        f"coordinator RSS {figures['rss_before_mb']} MB -> {figures['rss_after_mb']} MB with {figures['queued']} queued"
    )
    print(json.dumps(figures))
