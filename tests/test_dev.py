"""`herder dev` as a user runs it: a real subprocess starting a real etcd, coordinator and worker,
driven with grpcurl, stopped with signals. Every process it starts is killed at teardown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from _timing import eventually_sync

from herder.clients.embedded_etcd import free_port, port_in_use
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc

pytestmark = pytest.mark.timeout(150)

BIN = Path(sys.executable).parent
READY_LINE = "herder dev is running"
START_TIMEOUT = 60.0


class Dev:
    """One `herder dev` subprocess in its own process group, on free ports, with `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        *,
        listen_port: int = 0,
        etcd_port: int = 0,
        invoice_port: int = 0,
        supervisor_port: int = 0,
        flags: tuple[str, ...] = (),
        program: tuple[str, ...] = (str(BIN / "herder"), "dev"),
    ) -> None:
        self.data_dir = data_dir
        self.listen_port = listen_port or free_port()
        self.etcd_port = etcd_port or free_port()
        self.invoice_port = invoice_port or free_port()
        self.supervisor_port = supervisor_port or free_port()
        self.flags = flags
        self.program = program
        self.out_path = data_dir.parent / f"{data_dir.name}-{self.listen_port}.out"
        self.err_path = data_dir.parent / f"{data_dir.name}-{self.listen_port}.err"
        self.process: subprocess.Popen[bytes] | None = None
        self.known_children: dict[int, psutil.Process] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    def start(self, stdout: int | None = None) -> Dev:
        """Start it; its output goes to files, or stdout to the file descriptor `stdout`."""
        command = [
            *self.program,
            "--data-dir",
            str(self.data_dir),
            "--listen",
            self.address,
            "--etcd-port",
            str(self.etcd_port),
            "--worker-slots",
            "2",
            "--invoice-port",
            str(self.invoice_port),
            "--supervisor-port",
            str(self.supervisor_port),
            *self.flags,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                command,
                stdout=out if stdout is None else stdout,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        return self

    @property
    def out(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace") if self.err_path.exists() else ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait for the ready banner (printed once the worker is connected) and note the children."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.out:
            if self.process.poll() is not None:
                pytest.fail(f"herder dev exited with {self.process.returncode}\n{self.out}\n{self.err}")
            if time.monotonic() > deadline:
                pytest.fail(f"herder dev not ready within {timeout:g}s\n{self.out}\n{self.err}")
            time.sleep(0.05)
        self.children()

    def children(self) -> list[psutil.Process]:
        """The dev process's children now (also remembered for cleanup)."""
        assert self.process is not None
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.known_children.update((child.pid, child) for child in found)
        return found

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"herder dev did not exit within {timeout:g}s\n{self.out}\n{self.err}")

    def kill_all(self) -> None:
        """SIGKILL the dev process group and every child it had, whatever state they are in."""
        if self.process is None:
            return
        self.children()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for child in self.known_children.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.is_running():  # false for a recycled pid: psutil compares creation times
                    child.kill()
        self.process.wait(10)
        psutil.wait_procs(list(self.known_children.values()), timeout=10)


@contextlib.contextmanager
def running_dev(data_dir: Path, **options: Any) -> Iterator[Dev]:
    dev = Dev(data_dir, **options)
    try:
        dev.start().wait_ready()
        yield dev
    finally:
        dev.kill_all()


@pytest.fixture(scope="module")
def shared_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dev]:
    """One `herder dev` for the tests that only talk to it."""
    with running_dev(tmp_path_factory.mktemp("dev") / "data") as dev:
        yield dev


def grpcurl(address: str, *args: str, data: dict[str, Any] | None = None) -> str:
    command = [str(BIN / "grpcurl"), "-plaintext", "-max-time", "10"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, address, *args], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, f"grpcurl {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def submit_echo(address: str, text: str) -> str:
    spec = {"type": "examples.echo", "payload_json": json.dumps({"text": text})}
    response = json.loads(grpcurl(address, "herder.v1.CoordinatorService/SubmitTask", data={"spec": spec}))
    task_id: str = response["task"]["id"]
    return task_id


def get_task(address: str, task_id: str) -> dict[str, Any]:
    request = {"id": task_id, "include_result_json": True}
    task: dict[str, Any] = json.loads(grpcurl(address, "herder.v1.CoordinatorService/GetTask", data=request))["task"]
    return task


def wait_finished(address: str, task_id: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        task = get_task(address, task_id)
        if task["state"] in {"TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED"}:
            return task
        assert time.monotonic() < deadline, f"task {task_id} still {task['state']} after {timeout:g}s"
        time.sleep(0.1)


def wait_connected(dev: Dev, timeout: float = START_TIMEOUT) -> None:
    """Wait until the coordinator lists the example worker and the invoice supervisor (for a dev whose
    output cannot be read)."""
    assert dev.process is not None
    deadline = time.monotonic() + timeout
    while True:
        assert dev.process.poll() is None, f"herder dev exited with {dev.process.returncode}\n{dev.err}"
        # A fresh channel each time: no reconnect backoff left from before the port was open.
        with grpc.insecure_channel(dev.address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            with contextlib.suppress(grpc.RpcError):
                nodes = stub.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=1.0).nodes
                served = {task_type for node in nodes for task_type in node.task_types}
                if {"examples.echo", "invoices.create"} <= served:
                    return
        assert time.monotonic() < deadline, f"no worker and supervisor connected within {timeout:g}s\n{dev.err}"
        time.sleep(0.1)


def processes_mentioning(*needles: str) -> list[psutil.Process]:
    """Live processes whose command line contains any of `needles`."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if any(needle in cmdline for needle in needles) and process.pid != os.getpid():
            found.append(process)
    return found


def test_echo_submitted_with_grpcurl_succeeds_with_json_result(shared_dev: Dev) -> None:
    task_id = submit_echo(shared_dev.address, "hi")
    task = wait_finished(shared_dev.address, task_id)
    assert task["state"] == "TASK_STATE_SUCCEEDED", task
    assert json.loads(task["result_json"]) == {"text": "hi"}
    assert task["worker_id"].startswith("herder-dev-")


def _printed(dev: Dev, needle: str) -> list[str]:
    """The banner's command to try that contains `needle`, split as a shell would."""
    (line,) = [line.strip() for line in dev.out.splitlines() if needle in line]
    return shlex.split(line)


def test_printed_invoice_command_runs_the_invoice_through_the_supervisor(shared_dev: Dev) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    command = _printed(shared_dev, "submit invoices.create")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # Rich wraps long values onto indented lines: joined again, the JSON result reads whole.
    joined = "".join(line.strip() for line in done.stdout.splitlines())
    assert "SUCCEEDED" in joined and "herder-dev-supervisor-" in joined, done.stdout
    assert '"subtotal_minor":"2500","tax_minor":"500","total_minor":"3000"' in joined, done.stdout


def test_printed_supervisor_status_command_shows_its_session(shared_dev: Dev) -> None:
    command = _printed(shared_dev, "SupervisorService/GetStatus")
    done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["connected"] and status["task_types"] == ["invoices.create"]
    assert status["worker_id"].startswith("herder-dev-supervisor-")


def test_grpcurl_lists_the_coordinator_health_and_reflection(shared_dev: Dev) -> None:
    services = grpcurl(shared_dev.address, "list").split()
    for name in ("herder.v1.CoordinatorService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        assert name in services


def test_banner_shows_addresses_and_commands_to_try(shared_dev: Dev) -> None:
    out = shared_dev.out
    assert f"127.0.0.1:{shared_dev.etcd_port}" in out
    assert shared_dev.address in out
    assert str(shared_dev.data_dir) in out
    assert "examples.echo, examples.sleep, examples.flaky" in out
    assert f"-plaintext {shared_dev.address} list" in out
    request = '{"spec":{"type":"examples.echo","payload_json":"{\\"text\\":\\"hi\\"}"}}'
    assert f"-d '{request}' {shared_dev.address} herder.v1.CoordinatorService/SubmitTask" in out
    assert 'submit examples.echo --json \'{"text":"hi"}\' --wait' in out
    assert f"127.0.0.1:{shared_dev.invoice_port}  (examples/invoice/service.py, serving invoices.create)" in out
    assert f"admin API on 127.0.0.1:{shared_dev.supervisor_port}" in out


# `herder dev` where the example is not beside the package, as in a wheel install.
WITHOUT_EXAMPLE = (
    sys.executable,
    "-c",
    "import pathlib, sys; from herder.clients import dev; "
    "dev.INVOICE_SERVICE = pathlib.Path('/nonexistent/service.py'); sys.exit(dev.main())",
)


@pytest.mark.parametrize(
    ("options", "started", "note"),
    [
        ({"flags": ("--no-invoice",)}, 3, "invoices    not started (--no-invoice)"),
        ({"flags": ("--no-worker",)}, 4, "worker      not started (--no-worker)"),
        ({"program": WITHOUT_EXAMPLE}, 3, "not starting the invoice example: /nonexistent/service.py is missing"),
    ],
    ids=["no-invoice", "no-worker", "example-missing"],
)
def test_optional_children(tmp_path: Path, options: dict[str, Any], started: int, note: str) -> None:
    with running_dev(tmp_path / "data", **options) as dev:
        commands = [" ".join(child.cmdline()) for child in dev.children()]
        assert len(commands) == started, commands
        assert note in dev.out
        invoice_started = any("herder.supervisor" in c for c in commands)
        assert invoice_started == ("submit invoices.create" in dev.out)
        assert dev.process is not None
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait_exit() == 0, dev.err


def test_second_dev_on_the_same_data_dir_is_refused(shared_dev: Dev) -> None:
    second = Dev(shared_dev.data_dir).start()
    try:
        assert second.wait_exit() == 1
        assert second.err.strip() == (
            f"herder dev: the data dir {shared_dev.data_dir} is in use by another herder dev "
            f"(pid {shared_dev.process.pid if shared_dev.process else ''})"
        )
        assert not processes_mentioning(f"--listen {second.address}", f"127.0.0.1:{second.etcd_port}")
    finally:
        second.kill_all()


def test_sigterm_stops_every_child_and_exits_zero(tmp_path: Path) -> None:
    with running_dev(tmp_path / "data") as dev:
        children = dev.children()
        commands = [" ".join(child.cmdline()) for child in children]
        assert len(children) == 5, commands
        assert any("etcd" in c and f"127.0.0.1:{dev.etcd_port}" in c for c in commands), commands
        assert any("herder.server" in c for c in commands), commands
        assert any("herder.clients.examples" in c for c in commands), commands
        assert any(f"invoice/service.py --listen 127.0.0.1:{dev.invoice_port}" in c for c in commands), commands
        assert any("herder.supervisor" in c for c in commands), commands
        assert dev.process is not None
        dev.process.send_signal(signal.SIGTERM)
        assert dev.wait_exit() == 0, dev.err
        # Last started first: the supervisor drains before the service behind it goes.
        assert "stopping supervisor, invoice-service, worker, coordinator, etcd" in dev.out
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert "herder dev: stopped" in dev.out
        assert "Traceback" not in dev.err


def test_tasks_survive_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    with running_dev(tmp_path / "data") as dev:
        task_id = submit_echo(dev.address, "kept")
        assert wait_finished(dev.address, task_id)["state"] == "TASK_STATE_SUCCEEDED"
        assert dev.process is not None
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait_exit() == 0, dev.err
    with running_dev(tmp_path / "data", etcd_port=dev.etcd_port) as again:
        task = get_task(again.address, task_id)
        assert task["state"] == "TASK_STATE_SUCCEEDED"
        assert json.loads(task["result_json"]) == {"text": "kept"}


def test_a_child_that_dies_is_named_and_the_rest_are_stopped(tmp_path: Path) -> None:
    with running_dev(tmp_path / "data") as dev:
        children = dev.children()
        worker = next(c for c in children if "herder.clients.examples" in " ".join(c.cmdline()))
        worker.kill()
        assert dev.wait_exit() == 1
        assert f"herder dev: the worker (pid {worker.pid}) exited unexpectedly on signal SIGKILL" in dev.err
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]


def test_output_closed_by_its_reader_still_stops_every_child(tmp_path: Path) -> None:
    # Like `herder dev | head -1` followed by Ctrl-C: every print after the first line hits a closed pipe.
    read_end, write_end = os.pipe()
    dev = Dev(tmp_path / "data")
    try:
        dev.start(stdout=write_end)
        os.close(write_end)
        os.close(read_end)
        wait_connected(dev)
        children = dev.children()
        assert len(children) == 5
        assert dev.process is not None
        dev.process.send_signal(signal.SIGINT)
        assert dev.wait_exit() == 0, dev.err
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
        assert "Traceback" not in dev.err
    finally:
        dev.kill_all()


@pytest.mark.parametrize("taken", ["coordinator", "etcd", "invoice"])
def test_a_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path, taken: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        data_dir = tmp_path / "data"
        option = {"coordinator": "listen_port", "etcd": "etcd_port", "invoice": "invoice_port"}[taken]
        dev = Dev(data_dir, **{option: port}).start()
        try:
            assert dev.wait_exit() == 1
            assert dev.err.strip() == f"herder dev: port 127.0.0.1:{port} is already in use (another herder dev?)"
            assert "Traceback" not in dev.out + dev.err
            assert not processes_mentioning(str(data_dir), f"--listen {dev.address}", f"127.0.0.1:{dev.etcd_port}")
        finally:
            dev.kill_all()


def test_the_same_port_twice_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    dev = Dev(tmp_path / "data", invoice_port=port, supervisor_port=port).start()
    try:
        assert dev.wait_exit() == 1
        assert dev.err.strip() == (
            f"herder dev: the ports must differ, got {dev.listen_port}, {dev.etcd_port}, {port}, {port}"
        )
        assert not processes_mentioning(f"--listen {dev.address}", f"127.0.0.1:{dev.etcd_port}")
    finally:
        dev.kill_all()


def test_traces_console_prints_every_processs_spans_to_its_log(tmp_path: Path) -> None:
    with running_dev(tmp_path / "data", flags=("--no-invoice", "--traces", "console")) as dev:
        task_id = submit_echo(dev.address, "traced")
        assert wait_finished(dev.address, task_id)["state"] == "TASK_STATE_SUCCEEDED"
        logs = tmp_path / "data" / "logs"

        def printed(name: str, kind: str) -> bool:
            text = (logs / f"{name}.log").read_text()
            return task_id in text and f'"kind": "SpanKind.{kind}"' in text

        deadline = time.monotonic() + 15
        while not (printed("coordinator", "PRODUCER") and printed("worker", "CONSUMER")):
            assert time.monotonic() < deadline, "no spans of the task in the coordinator's and worker's logs"
            time.sleep(0.1)


def test_metrics_port_serves_the_coordinators_and_the_supervisors_metrics(tmp_path: Path) -> None:
    port = free_port()
    while port_in_use("127.0.0.1", port + 1):
        port = free_port()
    with running_dev(tmp_path / "data", flags=("--metrics-port", str(port))) as dev:
        assert f"http://127.0.0.1:{port}/metrics (coordinator)" in dev.out
        assert f"http://127.0.0.1:{port + 1}/metrics (supervisor)" in dev.out
        task_id = submit_echo(dev.address, "measured")
        assert wait_finished(dev.address, task_id)["state"] == "TASK_STATE_SUCCEEDED"

        def scraped(at: int) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{at}/metrics", timeout=5) as reply:
                text: str = reply.read().decode()
            return text

        finished = re.compile(r'^herder_task_finished_total\{[^}]*outcome="succeeded"[^}]*type="examples.echo"', re.M)
        eventually_sync(lambda: finished.search(scraped(port)), "the finished task in the coordinator's metrics")
        assert "herder_supervisor_slots_limit" in scraped(port + 1)
