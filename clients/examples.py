"""The example task types: examples.echo, examples.sleep and examples.flaky, served by one Worker.

Run it with `python -m herder.clients.examples --coordinator 127.0.0.1:50051` (or HERDER_COORDINATOR).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from herder.clients.errors import HerderError
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.worker import NonRetryableError, TaskContext, Worker, WorkerSettings, run_worker


class FlakyError(Exception):
    """The retryable failure examples.flaky raises on its first `fail_attempts` attempts."""


async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
    """Return the payload's text and attributes unchanged."""
    return examples_pb2.EchoResponse(text=request.text, attributes=dict(request.attributes))


async def sleep(request: examples_pb2.SleepRequest, ctx: TaskContext) -> examples_pb2.SleepResponse:
    """Sleep `duration` in `steps` equal steps, reporting progress after each; 0 steps sleeps once, silently.

    On cancellation the sleep stops at once (CancelledError) and the worker reports the attempt
    canceled. A negative duration fails without retry (examples.invalid_duration).
    """
    total = request.duration.ToNanoseconds() / 1e9
    if total < 0:
        raise NonRetryableError(f"duration must not be negative, got {total:g}s", type="examples.invalid_duration")
    steps = request.steps
    loop = asyncio.get_running_loop()
    started = loop.time()
    for step in range(1, max(steps, 1) + 1):
        await asyncio.sleep(total / max(steps, 1))
        if steps:
            await ctx.progress(step / steps, f"slept {step} of {steps} steps")
    slept = duration_pb2.Duration()
    slept.FromNanoseconds(round((loop.time() - started) * 1e9))
    return examples_pb2.SleepResponse(slept=slept)


async def flaky(request: examples_pb2.FlakyRequest, ctx: TaskContext) -> examples_pb2.FlakyResponse:
    """Fail with a retryable FlakyError while the attempt number is at most `fail_attempts`, then succeed."""
    if ctx.attempt <= request.fail_attempts:
        raise FlakyError(f"attempt {ctx.attempt} fails: the first {request.fail_attempts} attempts fail")
    return examples_pb2.FlakyResponse(attempt=ctx.attempt)


def build_example_worker(address: str | Sequence[str], **kw: Any) -> Worker:
    """A Worker serving examples.echo, examples.sleep and examples.flaky; `kw` goes to Worker."""
    worker = Worker(address, **kw)
    worker.add_task("examples.echo", echo, description="Returns its payload.")
    worker.add_task("examples.sleep", sleep, description="Sleeps the requested time, reporting progress.")
    worker.add_task("examples.flaky", flaky, description="Fails its first fail_attempts attempts, then succeeds.")
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example worker until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m herder.clients.examples", description=__doc__)
    parser.add_argument(
        "--coordinator",
        default=os.environ.get("HERDER_COORDINATOR", "127.0.0.1:50051"),
        help="coordinator address (default $HERDER_COORDINATOR or 127.0.0.1:50051)",
    )
    parser.add_argument("--slots", type=int, default=8, help="tasks run at once (default 8)")
    parser.add_argument("--worker-id", default=None, help="worker id (default host-pid-random)")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=10.0,
        help="seconds running tasks may finish after SIGINT/SIGTERM before they are cancelled (default 10)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error(f"--slots must be at least 1, got {args.slots}")
    if args.shutdown_grace < 0:
        parser.error(f"--shutdown-grace must be >= 0, got {args.shutdown_grace}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings(shutdown_grace=args.shutdown_grace)
    worker = build_example_worker(args.coordinator, slots=args.slots, worker_id=args.worker_id, settings=settings)
    print(
        f"herder example worker {worker.worker_id} serving {', '.join(worker.registrations)} "
        f"for coordinator {args.coordinator}",
        flush=True,
    )
    try:
        run_worker(worker)
    except HerderError as exc:
        print(f"herder example worker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
