"""`herder supervisor` (python -m herder.supervisor): run a handler service's tasks for a coordinator.

Every flag also reads HERDER_<FLAG> (HERDER_COORDINATOR, HERDER_HANDLER, HERDER_SLOTS, ...); the
admin address reads HERDER_SUPERVISOR_LISTEN, so it cannot be confused with a coordinator's.
Exit codes: 0 after a drain, 1 when the supervisor cannot run, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from herder.clients import errors, quantities
from herder.clients.alerts import DEFAULT_RULES, parse_alert_overrides
from herder.clients.endpoints import DEFAULT_ADDRESS, Endpoints
from herder.clients.resources import MAX_INTERVAL, MIN_INTERVAL
from herder.clients.runner import run as run_loop
from herder.supervisor.app import Supervisor, SupervisorConfig

PROG = "herder supervisor"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr and exit 2 (not argparse's usage block)."""
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


def _env(name: str, default: str = "") -> str:
    return os.environ.get(f"HERDER_{name}", default)


def parse_args(argv: Sequence[str] | None = None) -> tuple[SupervisorConfig, str]:
    """The config and the log level; exits 2 with one line for bad flags."""
    parser = _Parser(
        prog=PROG,
        description="Run the tasks of a TaskHandlerService (in any language) for a Herder coordinator.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--coordinator",
        default=_env("COORDINATOR", DEFAULT_ADDRESS),
        metavar="ADDR[,...]",
        help=f"coordinator replicas, HOST:PORT (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--handler", default=_env("HANDLER"), metavar="ADDR", help="the TaskHandlerService: HOST:PORT or unix:PATH"
    )
    parser.add_argument("--slots", default=_env("SLOTS", "4"), metavar="N", help="attempts run at once (default 4)")
    parser.add_argument("--node-id", default=_env("NODE_ID"), metavar="ID", help="worker id (default host-pid-random)")
    parser.add_argument(
        "--listen",
        default=_env("SUPERVISOR_LISTEN"),
        metavar="ADDR",
        help="admin API address (SupervisorService, health, reflection), e.g. 127.0.0.1:9090; off when empty",
    )
    parser.add_argument(
        "--grace",
        default=_env("SHUTDOWN_GRACE", "30"),
        metavar="S",
        help="seconds running attempts may finish after SIGTERM or Drain (default 30)",
    )
    parser.add_argument(
        "--handler-pid",
        default=_env("HANDLER_PID"),
        metavar="PID",
        help="the handler's process: its CPU and memory are sampled with the node's (default: not sampled)",
    )
    parser.add_argument(
        "--resource-interval",
        default=_env("RESOURCE_INTERVAL", "1"),
        metavar="S",
        help=f"seconds between resource samples, {MIN_INTERVAL:g} to {MAX_INTERVAL:g} (default 1)",
    )
    parser.add_argument(
        "--disk-path",
        default=_env("DISK_PATH", "."),
        metavar="PATH",
        help="report the disk use of the filesystem holding PATH (default: the working directory's)",
    )
    # Placement capacity (a container's limits); parsed by quantities, so a bad value is one line.
    parser.add_argument(
        "--cpu",
        default=_env("CPU"),
        metavar="CPU",
        help="CPU offered to tasks' requests: cores (2, 0.5) or millicores (500m) (default: the node's cores)",
    )
    parser.add_argument(
        "--memory",
        default=_env("MEMORY"),
        metavar="SIZE",
        help="memory offered to tasks' requests: 4GiB, 512Mi, bytes, ... (default: the node's memory)",
    )
    parser.add_argument(
        "--alert",
        action="append",
        default=_env("ALERTS").split(),
        metavar="NAME.FIELD=VALUE",
        help="change an alert rule, repeatable (e.g. memory_pressure.threshold=80%%, cpu_saturation.for=2m,"
        " disk_almost_full.enabled=false; HERDER_ALERTS: space-separated); see README 'Alerts'",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    problems = []
    try:
        Endpoints(args.coordinator)
    except ValueError as exc:
        problems.append(f"--coordinator: {exc}")
    if not args.handler.strip():
        problems.append("--handler is required (or HERDER_HANDLER)")
    slots = _int(args.slots)
    if slots is None or slots < 1:
        problems.append(f"--slots: must be an integer >= 1, got {args.slots!r}")
    grace = _float(args.grace)
    if grace is None or grace < 0:
        problems.append(f"--grace: must be a number of seconds >= 0, got {args.grace!r}")
    handler_pid = None
    if args.handler_pid.strip():
        handler_pid = _int(args.handler_pid)
        if handler_pid is None or handler_pid < 1:
            problems.append(f"--handler-pid: must be a process id >= 1, got {args.handler_pid!r}")
    interval = _float(args.resource_interval)
    if interval is None or not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        problems.append(
            f"--resource-interval: must be {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds, got {args.resource_interval!r}"
        )
    if not os.path.isdir(args.disk_path or "."):
        problems.append(f"--disk-path: not a directory: {args.disk_path!r}")
    if args.node_id is not None and args.node_id != args.node_id.strip():
        problems.append("--node-id: must not start or end with spaces")
    capacity_cpu, capacity_memory = 0, 0
    if args.cpu.strip():
        try:
            capacity_cpu = quantities.parse_cpu(args.cpu)
        except ValueError as exc:
            problems.append(f"--cpu: {exc}")
    if args.memory.strip():
        try:
            capacity_memory = quantities.parse_memory(args.memory)
        except ValueError as exc:
            problems.append(f"--memory: {exc}")
    alert_rules = DEFAULT_RULES
    try:
        alert_rules = parse_alert_overrides(args.alert)
    except ValueError as exc:
        problems.append(f"--alert: {exc}")
    if problems:
        parser.error("; ".join(problems))
    assert slots is not None and grace is not None and interval is not None
    config = SupervisorConfig(
        coordinator=args.coordinator,
        handler=args.handler.strip(),
        slots=slots,
        node_id=args.node_id or None,
        listen=args.listen.strip(),
        shutdown_grace=grace,
        handler_pid=handler_pid,
        resource_interval=interval,
        disk_path=args.disk_path or ".",
        capacity_cpu_millis=capacity_cpu,
        capacity_memory_bytes=capacity_memory,
        alert_rules=alert_rules,
    )
    return config, args.log_level


def main(argv: Sequence[str] | None = None) -> int:
    config, level = parse_args(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        run_loop(_serve(config))
    except errors.HerderError as exc:
        print(f"{PROG}: the coordinator refused: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


async def _serve(config: SupervisorConfig) -> None:
    # Built inside the loop: its gRPC channel belongs to the loop that creates it.
    await Supervisor(config).run()


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main())
