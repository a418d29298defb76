"""A Worker says when it connects, reconnects and stops, on stderr, in a script that sets up no logging."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _cluster import Coordinator

pytestmark = pytest.mark.timeout(90)


def _wait_until(check: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s; the worker's stderr:\n{log.read_text()}"
        time.sleep(0.05)


# As a user writes it: no logging.basicConfig, no handler anywhere.
SCRIPT = textwrap.dedent(
    """
    from herder.clients import TaskContext, Worker, run_worker
    from herder.clients.proto.examples.v1 import examples_pb2

    worker = Worker(None, slots=3)

    @worker.task("examples.echo")
    async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        return examples_pb2.EchoResponse(text=request.text)

    run_worker(worker)
    """
)


def test_a_worker_without_logging_setup_logs_connect_reconnect_and_stop(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    err = tmp_path / "worker.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["HERDER_COORDINATOR"] = coordinator.address
    with open(err, "wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, str(script)], stderr=stderr, stdout=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:

        def connected(count: int) -> bool:
            return len(re.findall(r"INFO herder\.clients\.worker: worker \S+ connected to", err.read_text())) >= count

        _wait_until(lambda: connected(1), 30, err)
        first = err.read_text()
        assert re.search(
            rf"connected to {re.escape(coordinator.address)} \(session \w+, 0 reclaimed, 0 rejected\);"
            r" serving examples\.echo with 3 slots",
            first,
        ), first

        coordinator.restart()
        _wait_until(lambda: connected(2), 30, err)
        # Why the session ended, and when the next try is.
        assert re.search(
            r"WARNING herder\.clients\.worker: worker \S+: session with \S+ failed \(.+\); reconnect try 1 in",
            err.read_text(),
        )

        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=30) == 0, err.read_text()
        text = err.read_text()
        assert re.search(r"INFO herder\.clients\.worker: worker \S+ stopped", text), text
        assert len(re.findall(r"stopped", text)) == 1, text  # shown once: no second handler
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_a_worker_leaves_configured_logging_alone(coordinator: Coordinator, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    # The application's own logging: warnings only, in its own format; the worker must not add INFO lines.
    script.write_text('import logging\nlogging.basicConfig(level="WARNING", format="app %(message)s")\n' + SCRIPT)
    err = tmp_path / "worker.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["HERDER_COORDINATOR"] = coordinator.address
    with open(err, "wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, str(script)], stderr=stderr, stdout=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        # Connected once the coordinator lists its session.
        _wait_until(lambda: coordinator.status().sessions > 0, 30, err)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(timeout=30) == 0, err.read_text()
        assert "connected to" not in err.read_text() and "stopped" not in err.read_text(), err.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def test_logging_configured_after_the_worker_started_takes_over_its_lines(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    script = tmp_path / "worker.py"
    # The application sets up logging once the worker runs: from then on its handler alone shows the lines.
    script.write_text(
        textwrap.dedent(
            """
            import asyncio, logging, signal
            from herder.clients import TaskContext, Worker
            from herder.clients.proto.examples.v1 import examples_pb2

            worker = Worker(None, slots=3)

            @worker.task("examples.echo")
            async def echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
                return examples_pb2.EchoResponse(text=request.text)

            async def main() -> None:
                async with worker:
                    await worker.wait_connected(30)
                    logging.basicConfig(level="INFO", format="app %(name)s: %(message)s")

            asyncio.run(main())
            """
        )
    )
    err = tmp_path / "worker.err"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    env["HERDER_COORDINATOR"] = coordinator.address
    with open(err, "wb") as stderr:
        worker = subprocess.Popen(
            [sys.executable, str(script)], stderr=stderr, stdout=subprocess.DEVNULL, env=env, start_new_session=True
        )
    try:
        assert worker.wait(timeout=60) == 0, err.read_text()
        text = err.read_text()
        assert re.search(r"INFO herder\.clients\.worker: worker \S+ connected to", text), text  # before: ours
        assert re.search(r"^app herder\.clients\.worker: worker \S+ stopped$", text, re.M), text  # after: theirs
        assert text.count(" stopped") == 1, text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
