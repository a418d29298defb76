"""The example task types: examples.echo, examples.sleep and examples.flaky, served by one Worker.

Run it with `python -m herder.clients.examples --coordinator 127.0.0.1:50051` (or HERDER_COORDINATOR).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from herder.clients import logs, tracing
from herder.clients.errors import HerderError
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.settings import load
from herder.clients.worker import NonRetryableError, TaskContext, Worker, run_worker
from herder.clients.worker_config import SETTINGS, worker_arguments


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


def build_example_worker(address: str | Sequence[str] | None, **kw: Any) -> Worker:
    """A Worker serving examples.echo, examples.sleep and examples.flaky; `kw` goes to Worker."""
    worker = Worker(address, **kw)
    worker.add_task("examples.echo", echo, description="Returns its payload.")
    worker.add_task("examples.sleep", sleep, description="Sleeps the requested time, reporting progress.")
    worker.add_task("examples.flaky", flaky, description="Fails its first fail_attempts attempts, then succeeds.")
    return worker


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example worker until SIGINT or SIGTERM; its settings are the [worker] ones."""
    prog = "python -m herder.clients.examples"
    settings = load(prog, "worker", SETTINGS, argv, description=__doc__ or "")
    logs.configure(settings["log_level"], settings["log_format"])
    # Before the worker's channels are made, so its calls are traced too.
    tracing.configure_from_env("herder-example-worker")
    worker = build_example_worker(**worker_arguments(settings))
    print(
        f"herder example worker {worker.worker_id} serving {', '.join(worker.registrations)} "
        f"for coordinator {settings['coordinator']}",
        flush=True,
    )
    try:
        run_worker(worker)
    except HerderError as exc:
        print(f"herder example worker: {exc}", file=sys.stderr)
        return 1
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
