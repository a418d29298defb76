"""The `herder` command line in tests: the installed binary, a run in this process, and the
coordinator and `herder worker` the CLI tests talk to."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _timing import eventually_sync

from herder.clients.cli import main
from herder.clients.client import SyncClient
from herder.clients.proto.examples.v1 import examples_pb2

HERDER = str(Path(sys.executable).parent / "herder")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`herder ARGS` in this process: exit code, stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def register_examples(address: str) -> str:
    """Register examples.echo and examples.sleep at `address`; returns the address."""
    with SyncClient(address) as client:
        client.register_task_type("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        client.register_task_type("examples.sleep", examples_pb2.SleepRequest, examples_pb2.SleepResponse)
    return address


@contextlib.contextmanager
def herder_worker(address: str, slots: int = 4) -> Iterator[subprocess.Popen[str]]:
    """`herder worker` serving the example types, connected before the block starts; SIGKILLed after."""
    process = subprocess.Popen(
        [HERDER, "worker", "--coordinator", address, "--slots", str(slots)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        with SyncClient(address) as client:
            eventually_sync(lambda: process.poll() is None and client.nodes(), "the worker to connect")
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=15)
