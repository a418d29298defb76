"""Every fenced block of README.md is accounted for, and the runnable ones run against one `herder dev`.

A block's info string says what it is. `python`, `sh` and `console` blocks run, in README order,
against one dev stack on free ports (the README's default addresses replaced by the stack's);
`toml` and `yaml` parse; `text` is prose in a box (synopses, layouts, log lines) and `output` is
what the block before it prints. A runnable block that cannot run says why in an HTML comment on
the line before its fence, `<!-- not run: REASON -->`. The "Your own task type" guide is run by
tests/test_readme_task_type_guide.py. A new block without an info string, an unknown one, or a
marker on a block that is not runnable fails here: the README cannot drift from what runs.

Output is compared where the README shows it (`$ command` lines followed by output in a `console`
block, an `output` block after a `python` block): after task ids, session ids, times and ports are
normalised, every line shown must appear in the real output, in order; lines not shown are allowed
(`...` marks them for readers, and `...` inside a line matches anything).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from google.protobuf import empty_pb2
from test_dev import Dev

from herder.clients import Retry, SyncClient
from herder.clients.errors import TaskFailedError
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto_sources import compile_protos

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
RUNNABLE = {"python", "sh", "console"}
CHECKED = {"toml", "yaml", "proto"}
NOT_CODE = {"text", "output"}
# Blocks in these sections are run as written by their own test, which runs this many (python, sh).
RUN_ELSEWHERE = {"Your own task type": (REPO / "tests" / "test_readme_task_type_guide.py", 3, 2)}
# The task id the README's examples use; replaced by a real one.
README_TASK_ID = "01a21bddb635ace78b44b313"
BLOCK_TIMEOUT = 30.0
# A watch streams until Ctrl-C: it passes when it is still streaming after this long, or ended well.
STREAM_SECONDS = 2.0


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    info: str
    body: str
    marker: str | None  # the reason of a `<!-- not run: ... -->` right before the fence
    section: str  # the nearest `##` or `###` heading
    output: str | None  # the `output` block right after it, if any

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.info}-{re.sub(r'[^a-z]+', '-', self.section.lower()).strip('-')}"


def _blocks(text: str) -> list[Block]:
    lines = text.split("\n")
    found: list[tuple[int, str, str, str | None, str]] = []
    section = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith(("## ", "### ")):
            section = line.lstrip("#").strip()
        opening = re.match(r"^( *)```(.*)$", line)
        if opening:
            indent, info = opening.groups()
            end = index + 1
            while not re.match(rf"^{indent}```\s*$", lines[end]):
                end += 1
                assert end < len(lines), f"README.md:{index + 1}: the block is never closed"
            body = "\n".join(row[len(indent) :] for row in lines[index + 1 : end]) + "\n"
            previous = lines[index - 1].strip() if index else ""
            marked = re.fullmatch(r"<!-- not run: (.+?) -->", previous)
            found.append((index + 1, info.strip(), body, marked.group(1) if marked else None, section))
            index = end
        index += 1
    blocks = []
    for position, (line_no, info, body, marker, block_section) in enumerate(found):
        following = found[position + 1] if position + 1 < len(found) else None
        output = following[2] if following and following[1] == "output" else None
        blocks.append(Block(line_no, info, body, marker, block_section, output))
    return blocks


BLOCKS = _blocks(README.read_text())
TO_RUN = [b for b in BLOCKS if b.info in RUNNABLE and b.marker is None and b.section not in RUN_ELSEWHERE]


def test_every_block_is_run_checked_or_marked() -> None:
    problems = []
    for block, before in zip(BLOCKS, [None, *BLOCKS[:-1]], strict=True):
        where = f"README.md:{block.line}"
        if block.info not in RUNNABLE | CHECKED | NOT_CODE:
            problems.append(
                f"{where}: say what the block is: ```{' | ```'.join(sorted(RUNNABLE | CHECKED | NOT_CODE))}"
            )
        if block.marker is not None and block.info not in RUNNABLE:
            problems.append(f"{where}: marked not run, but a {block.info or 'bare'} block never runs")
        if block.info == "output" and not (before in TO_RUN and before is not None and before.info == "python"):
            problems.append(f"{where}: an output block must follow the python block (run here) that prints it")
    for needle in [*GIVEN, *PYTHON_GIVEN]:
        if not any(needle in b.body for b in TO_RUN):
            problems.append(f"what the test sets up for blocks containing {needle!r} is for no block any more")
    assert not problems, "\n".join(problems)
    for section, (test, python, sh) in RUN_ELSEWHERE.items():
        assert test.exists(), f"{test} should run the blocks of {section!r}"
        there = [b.info for b in BLOCKS if b.section == section and b.marker is None]
        # A block added there is run by nothing until that test runs it too.
        assert (there.count("python"), there.count("sh"), there.count("console")) == (python, sh, 0), (
            f"{section!r} has {there}; {test.name} runs {python} python and {sh} sh blocks"
        )
    # Markers stay few: most examples run.
    marked = [b for b in BLOCKS if b.marker]
    assert len(marked) <= len(TO_RUN) // 3, [f"README.md:{b.line}: {b.marker}" for b in marked]


def test_toml_yaml_and_proto_blocks_parse(tmp_path: Path) -> None:
    for block in BLOCKS:
        if block.info == "toml":
            tomllib.loads(block.body)
        elif block.info == "yaml":
            list(yaml.safe_load_all(block.body))
        elif block.info == "proto":
            # Compiled the way the README compiles a contract (the protoc extra).
            (tmp_path / "block.proto").write_text(block.body)
            assert compile_protos(["block.proto"], [str(tmp_path)]).file


# -- running against one dev stack ----------------------------------------------------------------


@dataclass
class Stack:
    dev: Dev
    workdir: Path
    env: dict[str, str]
    last_task_id: str | None = None

    def substitute(self, text: str) -> str:
        for readme, real in (
            ("127.0.0.1:50051", self.dev.address),
            ("127.0.0.1:50061", f"127.0.0.1:{self.dev.invoice_port}"),
            ("127.0.0.1:50062", f"127.0.0.1:{self.dev.supervisor_port}"),
            ("127.0.0.1:7070", f"127.0.0.1:{self.dev.supervisor_port}"),  # a supervisor's admin API
        ):
            text = text.replace(readme, real)
        return text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("readme")
    dev = Dev(root / "dev").start()
    try:
        dev.wait_ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        env |= {"PATH": f"{BIN}:{env.get('PATH', '')}", "HERDER_COORDINATOR": dev.address}
        workdir = root / "work"
        workdir.mkdir()
        yield Stack(dev, workdir, env)
    finally:
        dev.kill_all()


def _finished_task(stack: Stack) -> str:
    """A CANCELED task, for the examples that retry one."""
    with SyncClient(stack.dev.address) as client:
        handle = client.submit("examples.sleep", json={"duration": "1s"}, delay=600)
        handle.cancel("for the README")
        return handle.id


def _failed(stack: Stack, count: int) -> None:
    with SyncClient(stack.dev.address) as client:
        for _ in range(count):
            handle = client.submit(
                "examples.flaky", examples_pb2.FlakyRequest(fail_attempts=5), retry=Retry(max_attempts=1)
            )
            with pytest.raises(TaskFailedError):
                handle.result(timeout=BLOCK_TIMEOUT)


def _nightly_reports(stack: Stack) -> None:
    """What the bulk cancel and retry examples find: 3 nightly reports waiting, 2 failed flaky tasks."""
    with SyncClient(stack.dev.address) as client:
        for _ in range(3):
            client.submit("examples.sleep", json={"duration": "1s"}, queue="reports", tags=["nightly"], delay=600)
    _failed(stack, 2)


def _video_encode(stack: Stack) -> None:
    """The placement examples' task type (no worker serves it: its tasks wait)."""
    with SyncClient(stack.dev.address) as client:
        client.register_task_type("video.encode", empty_pb2.Empty, empty_pb2.Empty)


# What a block takes for granted, set up before it runs (keyed by text in the block).
GIVEN: dict[str, Callable[[Stack], None]] = {
    "--tag nightly --dry-run": _nightly_reports,
    "video.encode": _video_encode,
}
# Python source run before a fragment that uses names the README defines elsewhere.
PYTHON_GIVEN = {
    "client.lock(": lambda: (
        next(b.body for b in BLOCKS if b.body.startswith("class Store")) + "store = Store()\nreport = b'nightly'\n"
    ),
    "resources=Resources(": lambda: "from google.protobuf import empty_pb2\npayload = empty_pb2.Empty()\n",
}
# A fragment with top-level `await` runs inside `async with Client() as client` (the stack's address).
RUNNER = """
import ast, asyncio, inspect, os, sys
source = open(sys.argv[1]).read()
code = compile(source, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
scope = {"__name__": "__main__", "task_id": os.environ.get("README_TASK_ID", "")}
if code.co_flags & inspect.CO_COROUTINE:
    from herder.clients import Client

    async def main():
        async with Client() as client:
            scope["client"] = client
            await eval(code, scope)

    asyncio.run(main())
else:
    exec(code, scope)
"""


def _normalise(text: str) -> list[str]:
    text = re.sub(r"\b[0-9a-f]{24}\b", "<id>", text)
    text = re.sub(r"\b[0-9a-f]{32}\b", "<session>", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "<address>", text)
    text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "<time> ", text, flags=re.M)  # a log line's
    text = re.sub(r"\bworker [\w.-]+-\d+-[0-9a-f]{6}\b", "worker <worker id>", text)  # host-pid-random
    return [line.rstrip() for line in text.split("\n")]


def _assert_shows(expected: str, actual: str, what: str) -> None:
    """Every line of `expected` (normalised; `...` lines skipped, `...` in a line matching anything)
    is in `actual`, in order."""
    lines = _normalise(actual)
    at = 0
    for wanted in _normalise(expected):
        if wanted.strip() in ("", "..."):
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in wanted.split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"{what}: the README shows {wanted!r}, which is not in the output:\n{actual}"
        at += 1


def _run(stack: Stack, command: list[str], *, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """Run it in its own process group; (exit code, stdout and stderr), exit code None for a watch
    still streaming after STREAM_SECONDS (then it is stopped)."""
    streaming = bool(re.search(r"Watch|\btasks watch\b", command[-1]))
    process = subprocess.Popen(
        command,
        cwd=stack.workdir,
        env=env or stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=STREAM_SECONDS if streaming else BLOCK_TIMEOUT)
        return process.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        if streaming:
            return None, out.decode(errors="replace")
        pytest.fail(f"{shlex.join(command)} did not finish within {BLOCK_TIMEOUT:g}s:\n{out.decode(errors='replace')}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _transcript(body: str) -> list[tuple[str, str]]:
    """A console block's `$ ` commands (continuation lines joined), each with the output shown after it."""
    commands: list[tuple[str, str]] = []
    lines = body.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.startswith("$ "):
            assert commands, f"output before any command: {line!r}"
            command, shown = commands[-1]
            commands[-1] = (command, shown + line + "\n")
            continue
        command = line.removeprefix("$ ")
        while command.endswith("\\"):
            command = command[:-1] + lines[index].strip()
            index += 1
        commands.append((command, ""))
    return commands


def _prepare(stack: Stack, block: Block, command: str) -> str:
    if README_TASK_ID in command:
        # The grpcurl session names the task it submitted; elsewhere any finished task will do.
        if block.section == "A grpcurl session":
            assert stack.last_task_id, "no task submitted before this command"
            command = command.replace(README_TASK_ID, stack.last_task_id)
        else:
            command = command.replace(README_TASK_ID, _finished_task(stack))
    # '{...}' stands for a payload; the placement examples' type takes an empty one.
    return stack.substitute(command.replace("'{...}'", "'{}'"))


def _run_shell(stack: Stack, block: Block) -> None:
    where = f"README.md:{block.line}"
    if block.info == "sh":
        # A script: every command must succeed.
        code, out = _run(stack, ["bash", "-e", "-c", _prepare(stack, block, block.body)])
        assert code in (0, None), f"{where}: exit {code}:\n{out}"
        return
    for written, shown in _transcript(block.body):
        command = _prepare(stack, block, written)
        # A transcript's exit code is what its output says (an error is shown as such).
        code, out = _run(stack, ["bash", "-c", command])
        _assert_shows(stack.substitute(shown), out, f"{where}: {command}")
        if code is None:
            assert "ERROR" not in out, f"{where}: {command}\n{out}"
        ids = re.findall(r'"id": "([0-9a-f]{24})"', out)
        if ids:
            stack.last_task_id = ids[0]


def _run_python(stack: Stack, block: Block) -> None:
    source = stack.substitute(block.body)
    for needle, given in PYTHON_GIVEN.items():
        if needle in source:
            source = given() + source
    script = stack.workdir / f"block_{block.line}.py"
    script.write_text(source)
    env = stack.env | {"README_TASK_ID": _finished_task(stack)}
    command = [sys.executable, "-c", RUNNER, str(script)]
    if "run_worker(" in source:
        _run_worker(stack, block, command, env)
        return
    code, out = _run(stack, command, env=env)
    assert code == 0, f"README.md:{block.line}: exit {code}:\n{out}"
    if block.output is not None:
        _assert_shows(block.output, out, f"README.md:{block.line}")


def _run_worker(stack: Stack, block: Block, command: list[str], env: dict[str, str]) -> None:
    """A worker serves until SIGINT: it must say it connected (with no logging set up), then stop cleanly."""
    log = stack.workdir / f"block_{block.line}.err"
    with open(log, "wb") as err:
        worker = subprocess.Popen(
            command,
            cwd=stack.workdir,
            env=env,
            stdout=err,
            stderr=err,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + BLOCK_TIMEOUT
        while " connected to " not in log.read_text():
            assert worker.poll() is None, f"README.md:{block.line}: the worker exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"README.md:{block.line}: never connected:\n{log.read_text()}"
            time.sleep(0.05)
        worker.send_signal(signal.SIGINT)
        assert worker.wait(BLOCK_TIMEOUT) == 0, log.read_text()
        assert block.output is not None, f"README.md:{block.line}: show what the worker logs in an output block"
        _assert_shows(stack.substitute(block.output), log.read_text(), f"README.md:{block.line}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.mark.parametrize("block", TO_RUN, ids=[b.id for b in TO_RUN])
def test_the_block_runs_and_prints_what_the_readme_shows(stack: Stack, block: Block) -> None:
    for needle, given in GIVEN.items():
        if needle in block.body:
            given(stack)
    if block.info == "python":
        _run_python(stack, block)
    else:
        _run_shell(stack, block)
