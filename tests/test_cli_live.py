"""The live terminal views: `tasks watch` as a table, the `submit --wait` progress bar and `herder top`,
run in this process with --live forcing a terminal, against a real etcd, coordinator and worker."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import HERDER, herder_worker, register_examples
from _cli import run as run_cli
from _cluster import Coordinator
from _timing import eventually_sync as eventually

from herder.clients.client import Retry, SyncClient
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.top import SECTIONS

pytestmark = pytest.mark.timeout(90)

# Cursor movement and colours a forced terminal writes; the tests read the text between them.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`herder ARGS` in this process: exit code, stdout without terminal codes, stderr."""
    code, out, err = run_cli(capsys, *args)
    return code, _ANSI.sub("", out), err


@pytest.fixture
def address(coordinator: Coordinator) -> str:
    """The coordinator's address, with the example task types registered."""
    return register_examples(coordinator.address)


@pytest.fixture
def worker(address: str) -> Iterator[subprocess.Popen[str]]:
    """`herder worker` serving the example types, connected before the test starts."""
    with herder_worker(address) as process:
        yield process


def finished_echo(address: str, text: str) -> str:
    """The id of an examples.echo task that has succeeded."""
    with SyncClient(address) as client:
        handle = client.submit("examples.echo", examples_pb2.EchoRequest(text=text))
        assert handle.wait(20).state == handle.task.state
        return handle.id


def test_watch_live_draws_a_row_per_task(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    first, second = finished_echo(address, "a"), finished_echo(address, "b")
    code, out, err = run(capsys, "--coordinator", address, "tasks", "watch", first, second, "--live")
    assert code == 0, err
    for header in ("ID", "TYPE", "QUEUE", "STATE", "ATTEMPT", "PROGRESS", "MESSAGE", "AGE"):
        assert header in out
    assert re.search(rf"{first}\s+examples\.echo\s+default\s+SUCCEEDED\s+1", out), out
    assert re.search(rf"{second}\s+examples\.echo\s+default\s+SUCCEEDED\s+1", out), out


def test_watch_live_keeps_only_the_latest_rows(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    ids = [finished_echo(address, str(n)) for n in range(3)]
    code, out, err = run(capsys, "--coordinator", address, "tasks", "watch", *ids, "--live", "--rows", "2")
    assert code == 0, err
    # The last frame drawn is what stays on the screen: the two most recent tasks.
    last_frame = out[out.rindex("ID ") :]
    assert ids[0] not in last_frame and ids[1] in last_frame and ids[2] in last_frame


def test_watch_not_on_a_terminal_prints_lines(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    task_id = finished_echo(address, "piped")
    code, out, err = run(capsys, "--coordinator", address, "tasks", "watch", task_id)
    assert code == 0, err
    assert out.count("\n") == 1 and task_id in out and "SUCCEEDED" in out and "PROGRESS" not in out


def test_submit_wait_live_shows_the_progress_bar(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    code, out, err = run(
        capsys, "--coordinator", address, "submit", "examples.sleep", "--json", '{"duration": "0.6s", "steps": 3}',
        "--wait", "--live",
    )  # fmt: skip
    assert code == 0, err
    assert "100%" in out and "slept 3 of 3 steps" in out
    # Then the result, as without the bar.
    assert re.search(r"state\s+SUCCEEDED", out) and "slept" in out


def test_submit_wait_not_on_a_terminal_prints_no_bar(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    code, out, err = run(
        capsys, "--coordinator", address, "submit", "examples.sleep", "--json", '{"duration": "0.3s", "steps": 3}',
        "--wait",
    )  # fmt: skip
    assert code == 0, err
    # The task's own "progress" line is there, but no bar (rich draws it with "━").
    assert "━" not in out and "\r" not in out
    assert re.search(r"state\s+SUCCEEDED", out)


def failed_flaky(address: str) -> str:
    """The id of an examples.flaky task that failed its only attempt."""
    with SyncClient(address) as client:
        handle = client.submit(
            "examples.flaky", examples_pb2.FlakyRequest(fail_attempts=1), retry=Retry(max_attempts=1)
        )
        handle.wait(20)
        return handle.id


def test_top_once_prints_every_section_with_its_figures(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    finished_echo(address, "ok")
    failed = failed_flaky(address)
    code, out, err = run(capsys, "--coordinator", address, "top", "--once")
    assert code == 0, err
    assert [line.strip() for line in out.splitlines() if line.strip() in SECTIONS] == list(SECTIONS)
    assert re.search(rf"leader\s+\S+ at {re.escape(address)}", out), out
    assert re.search(r"default\s+0\s+0\s+0\s+\S+\s+\d+\.\d", out), out  # backlog, running, held, wait p99, rate
    # The worker, slots used of its 4 (its cpu and memory come with its first heartbeat's sample).
    assert re.search(r"\n \S+\s+0/4\s", out), out
    assert re.search(rf"{failed}\s+examples\.flaky\s+FlakyError\s+attempt 1 fails", out), out


def test_top_once_json(capsys: pytest.CaptureFixture[str], address: str, worker: object) -> None:
    failed = failed_flaky(address)
    code, out, err = run(capsys, "--coordinator", address, "--output", "json", "top", "--once")
    assert code == 0, err
    document = json.loads(out)
    assert document["cluster"]["leader_address"] == address
    assert [queue["name"] for queue in document["queues"]] == ["default"]
    assert len(document["nodes"]) == 1
    assert [task["id"] for task in document["recent_failures"]] == [failed]


def test_the_readme_capture_of_top_has_the_sections_top_prints(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    capture = readme.split("A capture of `herder top --once`", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    code, out, err = run(capsys, "--coordinator", address, "top", "--once")
    assert code == 0, err

    def headings(text: str) -> list[list[str]]:
        """Each section's title and its table's column headings, in order."""
        lines = [line.strip() for line in text.splitlines()]
        return [[title, *lines[n + 1].split("  ")] for n, title in enumerate(lines) if title in SECTIONS]

    def normalised(found: list[list[str]]) -> list[list[str]]:
        return [[cell.strip() for cell in row if cell.strip()] for row in found]

    # Leader's next line is a row, not headings: compare its label only.
    got, shown = normalised(headings(out)), normalised(headings(capture))
    assert [row[0] for row in got] == list(SECTIONS) == [row[0] for row in shown]
    assert got[1:] == shown[1:] and got[0][1] == shown[0][1] == "leader"


class Terminal:
    """`herder ARGS` on a pseudo-terminal 200 columns wide (stderr piped apart); reads what it drew."""

    def __init__(self, address: str, *args: str) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            [HERDER, "--coordinator", address, *args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, start_new_session=True,
            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "", "LINES": ""},
        )  # fmt: skip
        os.close(slave)
        self.seen = bytearray()

    def screen(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the process ended and closed its side
                break
            if not chunk:
                break
            self.seen.extend(chunk)
        return _ANSI.sub("", self.seen.decode(errors="replace"))

    def wait(self) -> tuple[int, str]:
        """The exit code and stderr, once it ended by itself (within 20 s)."""
        _, err = self.process.communicate(timeout=20)
        self.screen()
        return self.process.returncode, err.decode()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=15)
        os.close(self.master)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.close()


def test_watch_on_a_terminal_draws_the_table_unasked(address: str, worker: object, terminals: list[Terminal]) -> None:
    task_id = finished_echo(address, "tty")
    terminal = Terminal(address, "tasks", "watch", task_id)
    terminals.append(terminal)
    code, err = terminal.wait()
    assert code == 0, err
    assert re.search(rf"{task_id}\s+examples\.echo\s+default\s+SUCCEEDED", terminal.screen())
    assert "PROGRESS" in terminal.screen()


def test_ctrl_c_during_submit_wait_with_the_bar_exits_130_naming_the_task(
    address: str, worker: object, terminals: list[Terminal]
) -> None:
    terminal = Terminal(address, "submit", "examples.sleep", "--json", '{"duration": "30s", "steps": 60}', "--wait")
    terminals.append(terminal)
    eventually(lambda: "slept 1 of 60 steps" in terminal.screen(), "the bar's first progress", timeout=20)
    os.killpg(terminal.process.pid, signal.SIGINT)
    code, err = terminal.wait()
    assert code == 130 and "interrupted: task" in err and "goes on" in err, err


def test_top_on_a_terminal_follows_the_stream_and_ctrl_c_exits_0(
    address: str, worker: object, terminals: list[Terminal]
) -> None:
    # A long refresh interval: the failure can only have come from the task stream.
    terminal = Terminal(address, "top", "--interval", "60")
    terminals.append(terminal)
    eventually(lambda: "Recent failures" in terminal.screen(), "top's first frame")
    failed = failed_flaky(address)
    eventually(lambda: failed in terminal.screen(), "the failure on the screen", timeout=20)
    os.killpg(terminal.process.pid, signal.SIGINT)
    code, err = terminal.wait()
    assert code == 0, err


def test_top_moves_queue_counts_by_the_stream(address: str, worker: object, terminals: list[Terminal]) -> None:
    terminal = Terminal(address, "top", "--interval", "60")
    terminals.append(terminal)

    def last_frame() -> str:
        screen = terminal.screen()
        return screen[screen.rfind("Leader") :]

    eventually(lambda: "Recent failures" in last_frame(), "top's first frame")
    with SyncClient(address) as client:
        handle = client.submit("examples.sleep", examples_pb2.SleepRequest(duration={"seconds": 30}))
        # QUEUE, BACKLOG 0, RUNNING 1: the sleep has started (no refresh within 60 s: the stream said so).
        eventually(lambda: re.search(r"default\s+0\s+1\s", last_frame()), "a running task in the queue row")
        handle.cancel()
        eventually(lambda: re.search(r"default\s+0\s+0\s", last_frame()), "the task gone from the row")
