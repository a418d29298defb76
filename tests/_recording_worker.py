"""A worker process that records every execution: `python tests/_recording_worker.py LOG ADDRESS[,ADDRESS...]`.

It serves examples.echo on the SDK Worker with every coordinator address (so it follows the
leader through failovers). Each time the handler runs it appends "task_id attempt pid unix_time" to LOG
with O_APPEND (one write per line, so lines from several workers never interleave), then
sleeps --work seconds and returns the input text.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from herder.clients.backoff import Backoff
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.worker import TaskContext, Worker, WorkerSettings, run_worker


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("addresses", help="coordinator addresses, comma-separated")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--work", type=float, default=0.02, help="seconds each execution takes")
    parser.add_argument("--backoff-max", type=float, default=0.5, help="longest wait between reconnect tries")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Tests cap reconnect tries at 0.5 s apart (the SDK's default is 5 s): the worker is back well within
    # the new leader's short test heartbeat timeout to re-claim what it runs.
    settings = WorkerSettings(backoff=Backoff(max=args.backoff_max))
    worker = Worker(args.addresses.split(","), worker_id=args.worker_id, slots=args.slots, settings=settings)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @worker.task("examples.echo")
    async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        os.write(log_fd, f"{ctx.task_id} {ctx.attempt} {os.getpid()} {time.time():.6f}\n".encode())
        await asyncio.sleep(args.work)
        return examples_pb2.EchoResponse(text=request.text)

    run_worker(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
