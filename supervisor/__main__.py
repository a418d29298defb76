"""`herder supervisor` (python -m herder.supervisor): run a handler service's tasks for a coordinator.

Settings come from flags, HERDER_* variables (HERDER_COORDINATOR, HERDER_HANDLER, HERDER_SLOTS, ...)
and the [supervisor] table of the config file, in that order (see herder.clients.settings). The
admin address reads HERDER_SUPERVISOR_LISTEN, so it cannot be confused with a coordinator's, and
--grace is the setting shutdown_grace. Exit codes: 0 after a drain, 1 when the supervisor cannot
run, 2 for a bad setting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from herder.clients import errors, logs, metrics_setup, quantities, tracing
from herder.clients.alerts import parse_alert_overrides
from herder.clients.endpoints import DEFAULT_ADDRESS, address_setting
from herder.clients.metrics_setup import MetricsError
from herder.clients.resources import MAX_INTERVAL, MIN_INTERVAL
from herder.clients.runner import run as run_loop
from herder.clients.runner import tune_gc
from herder.clients.settings import Setting, Settings, integer, load, log_settings, metrics_setting, seconds, text
from herder.supervisor.app import Supervisor, SupervisorConfig
from herder.supervisor.metrics import SupervisorMetrics

PROG = "herder supervisor"


def _node_id(value: str) -> str:
    if value != value.strip():
        raise ValueError("must not start or end with spaces")
    return value


def _directory(value: str) -> str:
    path = value or "."
    if not os.path.isdir(path):
        raise ValueError(f"not a directory: {value!r}")
    return path


def _cpu(value: str) -> int:
    return quantities.parse_cpu(value) if value.strip() else 0


def _memory(value: str) -> int:
    return quantities.parse_memory(value) if value.strip() else 0


def _alert(value: str) -> str:
    parse_alert_overrides([value])  # checked alone: a bad one is named before anything starts
    return value


def _handler_pid(value: str) -> int | None:
    return integer(1)(value) if value.strip() else None


SETTINGS: list[Setting] = [
    Setting(
        "coordinator",
        address_setting,
        DEFAULT_ADDRESS,
        "coordinator replicas, HOST:PORT[,...]",
        metavar="ADDR[,...]",
    ),
    Setting("handler", text, "", "the TaskHandlerService: HOST:PORT or unix:PATH (required)", metavar="ADDR"),
    Setting("slots", integer(1), 4, "attempts run at once", metavar="N"),
    Setting("node_id", _node_id, "", "worker id (default host-pid-random)", metavar="ID"),
    Setting(
        "listen",
        text,
        "",
        "admin API address (SupervisorService, health, reflection), e.g. 127.0.0.1:9090; off when empty",
        env="HERDER_SUPERVISOR_LISTEN",
        metavar="ADDR",
    ),
    Setting(
        "shutdown_grace",
        seconds(0),
        30.0,
        "seconds running attempts may finish after SIGTERM or Drain",
        flag="--grace",
        metavar="S",
    ),
    Setting(
        "handler_pid",
        _handler_pid,
        None,
        "the handler's process: its CPU and memory are sampled with the node's (default: not sampled)",
        metavar="PID",
    ),
    Setting(
        "resource_interval",
        seconds(MIN_INTERVAL, MAX_INTERVAL),
        1.0,
        f"seconds between resource samples, {MIN_INTERVAL:g} to {MAX_INTERVAL:g}",
        metavar="S",
    ),
    Setting(
        "disk_path",
        _directory,
        ".",
        "report the disk use of the filesystem holding PATH (default: the working directory's)",
        metavar="PATH",
    ),
    # Placement capacity (a container's limits); 0: the node's own.
    Setting(
        "cpu",
        _cpu,
        0,
        "CPU offered to tasks' requests, in millicores once read: cores (2, 0.5) or millicores (500m)"
        " (default 0: the node's cores)",
        metavar="CPU",
    ),
    Setting(
        "memory",
        _memory,
        0,
        "memory offered to tasks' requests, in bytes once read: 4GiB, 512Mi, bytes, ... (default 0: the node's memory)",
        metavar="SIZE",
    ),
    Setting(
        "alerts",
        _alert,
        [],
        "change an alert rule, repeatable (e.g. memory_pressure.threshold=80%%, cpu_saturation.for=2m,"
        " disk_almost_full.enabled=false); see README 'Alerts'",
        flag="--alert",
        repeated=True,
        metavar="NAME.FIELD=VALUE",
    ),
    metrics_setting(),
    *log_settings(),
]


def _check(settings: Settings) -> list[str]:
    if not settings["handler"]:
        return [f"{settings.where('handler')}: required (--handler or HERDER_HANDLER)"]
    return []


def _load(argv: Sequence[str] | None) -> Settings:
    return load(
        PROG,
        "supervisor",
        SETTINGS,
        argv,
        description="Run the tasks of a TaskHandlerService (in any language) for a Herder coordinator.",
        check=_check,
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[SupervisorConfig, str]:
    """The config and the log level; exits 2 with one line for a bad setting."""
    settings = _load(argv)
    return config_of(settings), settings["log_level"]


def config_of(settings: Settings) -> SupervisorConfig:
    return SupervisorConfig(
        coordinator=settings["coordinator"],
        handler=settings["handler"],
        slots=settings["slots"],
        node_id=settings["node_id"] or None,
        listen=settings["listen"],
        shutdown_grace=settings["shutdown_grace"],
        handler_pid=settings["handler_pid"],
        resource_interval=settings["resource_interval"],
        disk_path=settings["disk_path"],
        capacity_cpu_millis=settings["cpu"],
        capacity_memory_bytes=settings["memory"],
        alert_rules=parse_alert_overrides(settings["alerts"]),
        metrics=settings["metrics"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = _load(argv)
    config = config_of(settings)
    logs.configure(settings["log_level"], settings["log_format"])
    tracing.configure_from_env("herder-supervisor")
    tune_gc()
    try:
        run_loop(_serve(config))
    except errors.HerderError as exc:
        print(f"{PROG}: the coordinator refused: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError, MetricsError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        tracing.shutdown()
    return 0


async def _serve(config: SupervisorConfig) -> None:
    endpoint = metrics_setup.serve(config.metrics, "herder-supervisor") if config.metrics else None
    try:
        # Built inside the loop: its gRPC channel belongs to the loop that creates it.
        supervisor = Supervisor(config)
        if endpoint is not None:
            SupervisorMetrics(supervisor)
        await supervisor.run()
    finally:
        if endpoint is not None:
            endpoint.close()


if __name__ == "__main__":
    sys.exit(main())
