"""`herder dev`: etcd, a coordinator, the example worker and the invoice example behind a supervisor
on this machine, in one command.

    herder dev [--data-dir ./.herder] [--listen 127.0.0.1:50051] [--etcd-port 2379]
               [--namespace default] [--worker-slots 8] [--no-worker]
               [--invoice-port 50061] [--supervisor-port 50062] [--no-invoice]

It starts an embedded etcd (data kept under DATA_DIR/etcd across runs, fsync on), one coordinator
(`python -m herder.server`) once etcd listens, and once the coordinator leads: the example worker
(`python -m herder.clients.examples`), then the invoice example service (examples/invoice/service.py
of the repository herder is installed from, on 127.0.0.1:INVOICE_PORT) and `herder supervisor` in
front of it (admin API on 127.0.0.1:SUPERVISOR_PORT). It then prints their addresses and commands
to try, and waits. Each child runs in a process group of its own, owned by this process. Without
the example (herder installed from a wheel), the invoice service and supervisor are skipped.

Ctrl-C, SIGTERM or SIGHUP stops everything in reverse order (the supervisor gracefully, the invoice
service, the worker gracefully, the coordinator, etcd) and exits 0; a second signal kills what is
still running at once. A child that exits on its own is named, the others are stopped and the exit
code is 1. A port in use (or given twice), or a data dir held by another `herder dev`, is one line
on stderr and exit code 1, with nothing started.
Logs of the current run are in DATA_DIR/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

import grpc
import psutil
from rich.console import Console
from rich.markup import escape

from herder.clients.client import DEFAULT_ADDRESS
from herder.clients.embedded_etcd import EmbeddedEtcd, EtcdStartError, port_in_use
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc

PROG = "herder dev"
EXAMPLE_TYPES = ("examples.echo", "examples.sleep", "examples.flaky")
INVOICE_TYPE = "invoices.create"
SUPERVISOR_SLOTS = 4
# What the printed `herder submit` sends: a valid invoice whose total is easy to check (2500 + 20% tax).
INVOICE_EXAMPLE = {
    "customer": "acme",
    "currency": "EUR",
    "items": [{"description": "widget", "quantity": 2, "unit_price_minor": 1250}],
    "tax_rate_bps": 2000,
}
# The repository root when herder is installed editable from it (dev.py is clients/dev.py there).
_REPO_ROOT = Path(__file__).resolve().parent.parent
INVOICE_SERVICE = _REPO_ROOT / "examples" / "invoice" / "service.py"
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None
# How often startup waits and the watch loop look at the children.
_POLL_INTERVAL = 0.1


@dataclass(frozen=True)
class DevConfig:
    """What `herder dev` runs.

    - `data_dir`: etcd's data (kept across runs), the logs of the current run and the lock that
      keeps two `herder dev` off one data dir (`.herder`).
    - `listen`: the coordinator's gRPC address, HOST:PORT (`127.0.0.1:50051`).
    - `etcd_port`: etcd's client port on 127.0.0.1 (2379); its peer port is any free one.
    - `namespace`: the coordinator's etcd key namespace (`default`).
    - `worker_slots`: tasks the example worker runs at once (8).
    - `worker`: start the example worker at all (True).
    - `invoice_port`: the invoice example service's port on 127.0.0.1 (50061).
    - `supervisor_port`: the admin API port of its supervisor on 127.0.0.1 (50062).
    - `invoice`: start the invoice example service and its supervisor at all (True).
    - `start_timeout`: seconds each child may take to become ready (30).
    - `worker_grace`: seconds running tasks may finish when the worker or the supervisor stops (5).
    - `traces`: the span exporter every child is given (OTEL_TRACES_EXPORTER: `console` prints spans
      to each child's log, `otlp` sends them where the OTEL_EXPORTER_OTLP_* variables say); "" leaves
      the environment as it is.
    - `metrics_port`: when not 0, the coordinator serves Prometheus metrics on 127.0.0.1:PORT and the
      supervisor on the next port (`--metrics`); 0 serves none.
    - `stop_timeout`: seconds a child may take to exit after SIGTERM, beyond the worker's
      grace, before its process group is killed (10).
    """

    data_dir: Path = Path(".herder")
    listen: str = DEFAULT_ADDRESS
    etcd_port: int = 2379
    namespace: str = "default"
    worker_slots: int = 8
    worker: bool = True
    invoice_port: int = 50061
    supervisor_port: int = 50062
    invoice: bool = True
    start_timeout: float = 30.0
    worker_grace: float = 5.0
    stop_timeout: float = 10.0
    traces: str = ""
    metrics_port: int = 0

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def invoice_address(self) -> str:
        return f"127.0.0.1:{self.invoice_port}"

    @property
    def supervisor_address(self) -> str:
        return f"127.0.0.1:{self.supervisor_port}"

    @property
    def metrics_addresses(self) -> tuple[str, str]:
        """The coordinator's and the supervisor's metrics addresses ("" each when off)."""
        if not self.metrics_port:
            return "", ""
        return f"127.0.0.1:{self.metrics_port}", f"127.0.0.1:{self.metrics_port + 1}"


class DevError(Exception):
    """A failure to report as one line (exit code 1): a port in use, a locked data dir, a child that
    did not start."""


class _ChildExited(Exception):
    def __init__(self, child: _Child) -> None:
        super().__init__(child.name)
        self.child = child


# --- entry point ---


def main(argv: Sequence[str] | None = None) -> int:
    """Run `herder dev` with `argv` (the arguments after `dev`) until stopped; returns the exit code.

    0 after Ctrl-C, SIGTERM or SIGHUP stopped everything; 1 when it could not start or a child
    exited on its own (every other child is stopped first); 2 for bad arguments.
    """
    config = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        # soft_wrap: long lines (paths, commands to paste) stay whole, also when output is not a terminal.
        return run(config, _Console(highlight=False, soft_wrap=True))
    except DevError as exc:
        _say_error(str(exc))
        return 1


def parse_args(argv: Sequence[str]) -> DevConfig:
    """The DevConfig for `argv`; bad input exits with a usage message and code 2 (argparse)."""
    defaults = DevConfig()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Run etcd, a coordinator, the example worker and the invoice example behind a supervisor "
            "locally; Ctrl-C stops all of them."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.data_dir,
        metavar="DIR",
        help=f"etcd data (kept across runs) and logs (default ./{defaults.data_dir})",
    )
    parser.add_argument(
        "--listen",
        type=_host_port,
        default=defaults.listen,
        metavar="HOST:PORT",
        help=f"coordinator address (default {defaults.listen})",
    )
    parser.add_argument(
        "--etcd-port",
        type=_port,
        default=defaults.etcd_port,
        metavar="PORT",
        help=f"etcd client port on 127.0.0.1 (default {defaults.etcd_port})",
    )
    parser.add_argument(
        "--namespace",
        type=_namespace,
        default=defaults.namespace,
        help=f"etcd key namespace (default {defaults.namespace})",
    )
    parser.add_argument(
        "--worker-slots",
        type=_positive_int,
        default=defaults.worker_slots,
        metavar="N",
        help=f"tasks the example worker runs at once (default {defaults.worker_slots})",
    )
    parser.add_argument("--no-worker", action="store_true", help="do not start the example worker")
    parser.add_argument(
        "--invoice-port",
        type=_port,
        default=defaults.invoice_port,
        metavar="PORT",
        help=f"invoice example service port on 127.0.0.1 (default {defaults.invoice_port})",
    )
    parser.add_argument(
        "--supervisor-port",
        type=_port,
        default=defaults.supervisor_port,
        metavar="PORT",
        help=f"admin API port of the invoice service's supervisor on 127.0.0.1 (default {defaults.supervisor_port})",
    )
    parser.add_argument(
        "--no-invoice", action="store_true", help="do not start the invoice example service and its supervisor"
    )
    parser.add_argument(
        "--traces",
        choices=("console", "otlp", "none"),
        default=None,
        help="export every process's spans: console prints them to its log in DIR/logs (default: OTEL_* as set)",
    )
    parser.add_argument(
        "--metrics-port",
        type=_metrics_port,
        default=0,
        metavar="PORT",
        help="serve Prometheus metrics: the coordinator's on 127.0.0.1:PORT, the supervisor's on PORT+1 (default: off)",
    )
    args = parser.parse_args(list(argv))
    return DevConfig(
        data_dir=args.data_dir,
        listen=args.listen,
        etcd_port=args.etcd_port,
        namespace=args.namespace,
        worker_slots=args.worker_slots,
        worker=not args.no_worker,
        invoice_port=args.invoice_port,
        supervisor_port=args.supervisor_port,
        invoice=not args.no_invoice,
        traces=args.traces or "",
        metrics_port=args.metrics_port,
    )


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return int(text)


def _metrics_port(text: str) -> int:
    port = _port(text)
    if port == 65535:
        raise argparse.ArgumentTypeError("65535 leaves no next port for the supervisor's metrics")
    return port


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    _port(port)
    return text


def _namespace(text: str) -> str:
    if not _NAMESPACE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: at most 128 letters, digits and . _ : / -, starting with a letter or digit"
        )
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


# --- the run ---


def run(config: DevConfig, console: Console) -> int:
    """Start everything, print where it is, and wait until a signal or a child's exit.

    Raises DevError, with nothing left running, when the data dir is held by another `herder dev`,
    a port is in use or a child does not become ready. Every child started is stopped before this
    returns or raises, whatever happens.
    """
    data_dir = config.data_dir.absolute()
    logs = data_dir / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DevError(f"cannot create the data dir {data_dir}: {exc.strerror}") from None
    with _lock_data_dir(data_dir), _StopSignals() as signals:
        # Checked before anything starts, so a second `herder dev` leaves the first alone.
        ports = [(config.listen_host, config.listen_port), ("127.0.0.1", config.etcd_port)]
        invoice = config.invoice and INVOICE_SERVICE.is_file()
        if invoice:
            ports += [("127.0.0.1", config.invoice_port), ("127.0.0.1", config.supervisor_port)]
        coordinator_metrics, supervisor_metrics = config.metrics_addresses
        if coordinator_metrics:
            ports.append(("127.0.0.1", config.metrics_port))
        if supervisor_metrics and invoice:
            ports.append(("127.0.0.1", config.metrics_port + 1))
        numbers = [port for _, port in ports]
        if len(set(numbers)) < len(numbers):
            raise DevError(f"the ports must differ, got {', '.join(map(str, numbers))}")
        for host, port in ports:
            if port_in_use(host, port):
                raise DevError(f"port {host}:{port} is already in use (another herder dev?)")
        for name in ("etcd", "coordinator", "worker", "invoice-service", "supervisor"):
            with contextlib.suppress(FileNotFoundError):
                (logs / f"{name}.log").unlink()  # each run's logs start empty
        children: list[_Child] = []
        try:
            return _start_and_watch(config, data_dir, children, signals, console)
        except _ChildExited as exc:
            _report_exit(exc.child)
            return 1
        except DevError as exc:  # said before the stopping lines, not after them
            _say_error(str(exc))
            return 1
        finally:
            _stop_all(children, signals, console, config)


def _start_and_watch(
    config: DevConfig, data_dir: Path, children: list[_Child], signals: _StopSignals, console: Console
) -> int:
    logs = data_dir / "logs"
    console.print(f"[dim]starting etcd on 127.0.0.1:{config.etcd_port} (data in {escape(str(data_dir / 'etcd'))})[/]")
    etcd_log = logs / "etcd.log"
    etcd = _Etcd(EmbeddedEtcd(data_dir=data_dir, client_port=config.etcd_port, log_path=etcd_log), etcd_log)
    etcd.start(config.start_timeout)
    children.append(etcd)
    if signals.received:
        return 0

    console.print(f"[dim]starting the coordinator on {config.listen} (namespace {config.namespace})[/]")
    coordinator_command = [sys.executable, "-m", "herder.server", "--etcd", etcd.endpoint, "--listen", config.listen]
    coordinator_command += ["--namespace", config.namespace]
    if config.metrics_port:
        coordinator_command += ["--metrics", config.metrics_addresses[0]]
    coordinator = _Spawned.start("coordinator", coordinator_command, logs, _trace_env(config))
    children.append(coordinator)
    if not _wait_until(lambda: _leads(config.listen), "lead", coordinator, children, signals, config):
        return 0

    worker_id = ""
    if config.worker:
        worker_id = f"herder-dev-{socket.gethostname()}-{os.getpid()}"
        console.print(f"[dim]starting the example worker {worker_id}[/]")
        worker_command = [sys.executable, "-m", "herder.clients.examples", "--coordinator", config.listen]
        worker_options = ["--slots", str(config.worker_slots), "--worker-id", worker_id]
        worker_options += ["--shutdown-grace", f"{config.worker_grace:g}"]
        worker = _Spawned.start("worker", [*worker_command, *worker_options], logs, _trace_env(config))
        children.append(worker)
        if not _wait_until(lambda: _connected(config.listen, worker_id), "connect", worker, children, signals, config):
            return 0

    supervisor_id = ""
    if config.invoice:
        if not INVOICE_SERVICE.is_file():
            console.print(f"[yellow]not starting the invoice example: {escape(str(INVOICE_SERVICE))} is missing[/]")
        else:
            supervisor_id = _start_invoice(config, logs, children, signals, console)
            if not supervisor_id:
                return 0

    _print_ready(console, config, etcd, data_dir, worker_id, supervisor_id)
    while not signals.wait(_POLL_INTERVAL):
        _check_alive(children)
    return 0


def _trace_env(config: DevConfig) -> dict[str, str]:
    """The OTEL_* variables `--traces` gives every child (the coordinator, workers, supervisor, service)."""
    if not config.traces:
        return {}
    # Every trace (local use, not Herder's sampled default), and a short batch delay: spans show in
    # the logs about when they happen.
    return {
        "OTEL_TRACES_EXPORTER": config.traces,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "500",
    }


def _start_invoice(
    config: DevConfig, logs: Path, children: list[_Child], signals: _StopSignals, console: Console
) -> str:
    """Start the invoice service, then its supervisor; the supervisor's worker id once its session is
    open, "" when a stop signal came first."""
    console.print(f"[dim]starting the invoice example service on {config.invoice_address}[/]")
    grace = f"{config.worker_grace:g}"
    service_command = [sys.executable, str(INVOICE_SERVICE), "--listen", config.invoice_address, "--grace", grace]
    service = _Spawned.start("invoice-service", service_command, logs, _trace_env(config))
    children.append(service)
    if not _wait_until(
        functools.partial(_accepts, "127.0.0.1", config.invoice_port), "listen", service, children, signals, config
    ):
        return ""

    supervisor_id = f"herder-dev-supervisor-{socket.gethostname()}-{os.getpid()}"
    console.print(f"[dim]starting the supervisor {supervisor_id} (admin API on {config.supervisor_address})[/]")
    supervisor_command = [sys.executable, "-m", "herder.supervisor", *_supervisor_args(config, supervisor_id)]
    supervisor = _Spawned.start("supervisor", supervisor_command, logs, _trace_env(config))
    children.append(supervisor)
    if not _wait_until(
        functools.partial(_connected, config.listen, supervisor_id), "connect", supervisor, children, signals, config
    ):
        return ""
    return supervisor_id


def _supervisor_args(config: DevConfig, node_id: str) -> list[str]:
    return [
        "--coordinator",
        config.listen,
        "--handler",
        config.invoice_address,
        "--slots",
        str(SUPERVISOR_SLOTS),
        "--listen",
        config.supervisor_address,
        "--grace",
        f"{config.worker_grace:g}",
        "--node-id",
        node_id,
        *(["--metrics", config.metrics_addresses[1]] if config.metrics_port else []),
    ]


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _wait_until(
    ready: Callable[[], bool],
    what: str,
    child: _Child,
    children: Sequence[_Child],
    signals: _StopSignals,
    config: DevConfig,
) -> bool:
    """Wait until `ready()`: True once it is, False when a stop signal came first.

    Raises _ChildExited when any child exits, DevError after config.start_timeout.
    """
    deadline = time.monotonic() + config.start_timeout
    while not signals.received:
        _check_alive(children)
        if ready():
            return True
        if time.monotonic() > deadline:
            raise DevError(
                f"the {child.name} did not {what} within {config.start_timeout:g}s; its log: {child.log_path}"
            )
        signals.wait(_POLL_INTERVAL)
    return False


def _check_alive(children: Sequence[_Child]) -> None:
    for child in children:
        if not child.running():
            raise _ChildExited(child)


def _list_nodes(address: str) -> coordinator_pb2.ListNodesResponse | None:
    """ListNodes from the coordinator at `address`, None while it does not answer (no replica leads yet)."""
    host, _, port = address.rpartition(":")
    try:
        # A plain connect first: no gRPC channel (and its reconnect backoff) for a port not yet open.
        socket.create_connection((host.strip("[]"), int(port)), timeout=0.5).close()
    except OSError:
        return None
    # A fresh channel each time, not sharing subchannels: no backoff left over from earlier failures.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        try:
            response: coordinator_pb2.ListNodesResponse = stub.ListNodes(
                coordinator_pb2.ListNodesRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return None
        return response


def _leads(address: str) -> bool:
    return _list_nodes(address) is not None


def _connected(address: str, worker_id: str) -> bool:
    response = _list_nodes(address)
    return response is not None and any(node.worker_id == worker_id for node in response.nodes)


def _stop_all(children: list[_Child], signals: _StopSignals, console: Console, config: DevConfig) -> None:
    """Stop the children, last started first; a second signal kills the rest at once.

    Nothing stops this short of stopping every child: a failed stop is noted and the next child
    is stopped anyway, and output that cannot be written (the terminal or pipe went away) is dropped.
    """
    running = [child for child in reversed(children) if child.running()]
    if running:
        _print_quietly(console, f"[dim]stopping {', '.join(child.name for child in running)}[/]")
    for child in reversed(children):
        grace = config.worker_grace if child.name in ("worker", "supervisor") else 0.0
        try:
            note = child.stop(grace + config.stop_timeout, signals.hurried)
        except Exception as exc:
            note = f"could not be stopped: {type(exc).__name__}: {exc}"
        if note:
            _print_quietly(console, f"[yellow]{PROG}: the {child.name} {escape(note)}[/]")
    children.clear()
    if running:
        _print_quietly(console, f"{PROG}: stopped")


def _print_quietly(console: Console, text: str) -> None:
    with contextlib.suppress(OSError):  # such as EIO once the terminal is gone
        console.print(text)


class _Console(Console):
    """A rich Console that goes quiet when its reader goes away (`herder dev | head`), where rich's
    own exits with SystemExit(1): herder dev must go on to stop its children."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        # Also for Python's final flush of the stream, which would complain about the pipe.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self.file.fileno())
            finally:
                os.close(devnull)


def _say_error(message: str) -> None:
    _Console(stderr=True, highlight=False).print(f"{PROG}: {message}", markup=False, soft_wrap=True)


def _report_exit(child: _Child) -> None:
    _say_error(
        f"the {child.name} (pid {child.pid}) exited unexpectedly{child.exit_note()}; stopping the rest. "
        f"Its log: {child.log_path}"
    )
    tail = _log_tail(child.log_path)
    if tail:
        _Console(stderr=True, highlight=False).print(tail, style="dim", markup=False, soft_wrap=True)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _print_ready(
    console: Console, config: DevConfig, etcd: _Etcd, data_dir: Path, worker_id: str, supervisor_id: str
) -> None:
    if supervisor_id:
        invoice = f"{config.invoice_address}  (examples/invoice/service.py, serving {INVOICE_TYPE})"
        supervisor = (
            f"{supervisor_id}  for {config.invoice_address} with {SUPERVISOR_SLOTS} slots, "
            f"admin API on {config.supervisor_address}"
        )
    else:
        why = "--no-invoice" if not config.invoice else f"{INVOICE_SERVICE} is missing"
        invoice = supervisor = f"not started ({why})"
    rows = [
        ("etcd", f"{etcd.endpoint}  (pid {etcd.pid}, fsync on)"),
        ("coordinator", f"{config.listen}  (namespace {config.namespace}, leader)"),
        (
            "worker",
            f"{worker_id}  serving {', '.join(EXAMPLE_TYPES)} with {config.worker_slots} slots"
            if worker_id
            else "not started (--no-worker)",
        ),
        ("invoices", invoice),
        ("supervisor", supervisor),
        *_metrics_rows(config, supervisor=bool(supervisor_id)),
        ("data dir", str(data_dir)),
        ("logs", str(data_dir / "logs")),
    ]
    console.print()
    console.print("[bold green]herder dev is running[/] (Ctrl-C stops it)")
    # Plain rows rather than a table: a table wraps long paths, which breaks copying them.
    for name, value in rows:
        console.print(f"  [bold]{name:<12}[/]{escape(value)}")
    console.print()
    console.print("[bold]Try:[/]")
    for line in _try_lines(config, invoice=bool(supervisor_id)):
        console.print(f"  {line}", markup=False)
    console.print()


def _metrics_rows(config: DevConfig, *, supervisor: bool) -> list[tuple[str, str]]:
    coordinator, supervisor_address = config.metrics_addresses
    if not coordinator:
        return []
    scraped = [f"http://{coordinator}/metrics (coordinator)"]
    if supervisor:
        scraped.append(f"http://{supervisor_address}/metrics (supervisor)")
    return [("metrics", ", ".join(scraped))]


def _try_lines(config: DevConfig, *, invoice: bool) -> list[str]:
    """Commands to paste into a shell, with the programs' full paths when they are not on PATH."""
    grpcurl = _program("grpcurl")
    herder = _program("herder")
    if config.listen != DEFAULT_ADDRESS:
        herder += f" --coordinator {shlex.quote(config.listen)}"
    payload = json.dumps({"text": "hi"}, separators=(",", ":"))
    body = shlex.quote(json.dumps({"spec": {"type": "examples.echo", "payload_json": payload}}, separators=(",", ":")))
    address = shlex.quote(config.listen)
    lines = [
        f"{grpcurl} -plaintext {address} list",
        f"{grpcurl} -plaintext -d {body} {address} herder.v1.CoordinatorService/SubmitTask",
        f"{herder} submit examples.echo --json {shlex.quote(payload)} --wait",
    ]
    if invoice:
        invoice_json = shlex.quote(json.dumps(INVOICE_EXAMPLE, separators=(",", ":")))
        lines += [
            f"{herder} submit {INVOICE_TYPE} --json {invoice_json} --wait",
            f"{grpcurl} -plaintext {config.supervisor_address} herder.v1.SupervisorService/GetStatus",
        ]
    return [*lines, f"{herder} status", f"{herder} tasks watch"]


def _program(name: str) -> str:
    if shutil.which(name):
        return name
    beside = Path(sys.executable).parent / name  # the venv's bin dir, not necessarily on PATH
    return shlex.quote(str(beside)) if beside.exists() else name


# --- children ---


class _Child(Protocol):
    """A process `herder dev` started in a process group of its own."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def log_path(self) -> Path: ...

    def running(self) -> bool: ...

    def exit_note(self) -> str:
        """How it exited, such as " with code 1", or ""."""
        ...

    def stop(self, timeout: float, hurried: Callable[[], bool]) -> str:
        """Stop it (and its process group), killing it after `timeout` seconds or as soon as
        `hurried()`; safe to call twice. Returns a note for people when it did not stop cleanly."""
        ...


@dataclass
class _Spawned:
    """A Python child (coordinator or worker) whose output goes to its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, command: list[str], logs: Path, extra_env: Mapping[str, str] | None = None) -> _Spawned:
        log_path = logs / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        return cls(name, process, log_path)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def exit_note(self) -> str:
        code = self.process.poll()
        if code is None:
            return ""
        if code < 0:
            with contextlib.suppress(ValueError):
                return f" on signal {signal.Signals(-code).name}"
        return f" with code {code}"

    def stop(self, timeout: float, hurried: Callable[[], bool]) -> str:
        note = ""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.process.poll() is None and time.monotonic() < deadline and not hurried():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(_POLL_INTERVAL)
            if self.process.poll() is None:
                note = "was killed" if hurried() else f"did not stop within {timeout:g}s and was killed"
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
            elif self.process.returncode not in (0, -signal.SIGTERM):
                note = f"exited{self.exit_note()} while stopping; its log: {self.log_path}"
        # Anything the child left in its group goes too.
        _signal_group(self.process.pid, signal.SIGKILL)
        return note


@dataclass
class _Etcd:
    """The embedded etcd, watched through psutil (EmbeddedEtcd keeps its Popen to itself)."""

    server: EmbeddedEtcd
    log_path: Path
    name: str = "etcd"
    _stopped: bool = field(default=False, init=False)

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def start(self, timeout: float) -> None:
        try:
            self.server.start(timeout)
        except EtcdStartError as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "etcd did not start"
            raise DevError(f"{first_line}; its log: {self.log_path}") from None

    def running(self) -> bool:
        if self._stopped or self.server.pid is None:
            return False
        try:
            # Until EmbeddedEtcd reaps it, a dead etcd is a zombie.
            return psutil.Process(self.server.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def exit_note(self) -> str:
        return ""

    def stop(self, timeout: float, hurried: Callable[[], bool]) -> str:
        pid = self.server.pid
        if pid is not None and hurried() and self.running():
            _signal_group(pid, signal.SIGKILL)
        self.server.stop(timeout)
        self._stopped = True
        return ""


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- signals and the data dir lock ---


class _StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask to stop (a second one to hurry) instead of raising; the
    previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._count = 0
        self._event = threading.Event()
        self._previous: dict[signal.Signals, _Handler] = {}

    def hurried(self) -> bool:
        return self._count > 1

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a stop signal; True once one came."""
        return self._event.wait(timeout)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        self._count += 1
        self._event.set()

    def __enter__(self) -> _StopSignals:
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            # None: a handler not installed from Python, which cannot be put back; the default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _lock_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold DATA_DIR/dev.lock; DevError when another `herder dev` holds it (two etcds must not share
    one data dir)."""
    path = data_dir / "dev.lock"
    try:
        handle: IO[str] = open(path, "a+")  # noqa: SIM115  # held open for the whole run
    except OSError as exc:
        raise DevError(f"cannot open {path}: {exc.strerror}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            by = f" (pid {holder})" if holder.isdigit() else ""
            raise DevError(f"the data dir {data_dir} is in use by another herder dev{by}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DevConfig", "DevError", "main", "parse_args", "run"]
