"""`python -m herder.server` (what `herder coordinator` runs): settings from flags, HERDER_* variables
and the [coordinator] table of the config file (see herder.clients.settings), one-line errors.

The etcd password comes from a file (--etcd-password-file) or HERDER_ETCD_PASSWORD, never a flag
(flags show in `ps`), and is never logged or shown.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

from herder.clients import logs, tracing
from herder.clients.metrics_setup import MetricsError
from herder.clients.runner import run as run_loop
from herder.clients.runner import tune_gc
from herder.clients.settings import (
    Setting,
    Settings,
    boolean,
    integer,
    load,
    log_settings,
    metrics_setting,
    seconds,
    text,
)
from herder.server import election, validation
from herder.server._etcd import EtcdAuthError, EtcdCredentials, EtcdError
from herder.server.app import CoordinatorConfig, ListenError, serve
from herder.server.committer import CommitLimits
from herder.server.declared_types import parse_declarations
from herder.server.horizon import MAX_DELAY_SECONDS
from herder.server.leader import LeaderSettings
from herder.server.placement import PlacementSettings
from herder.server.sessions import SessionSettings
from herder.server.watchers import WatchSettings

PROG = "herder coordinator"


def _host_port(value: str) -> str:
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 0 <= int(port) < 65536):
        raise ValueError(f"{value!r} is not HOST:PORT")
    return value


def _endpoints(value: str) -> tuple[str, ...]:
    endpoints = tuple(_host_port(e) for e in value.split(",") if e.strip())
    if not endpoints:
        raise ValueError("give at least one HOST:PORT")
    return endpoints


def _namespace(value: str) -> str:
    value = value.strip()
    if validation.validate_name(value, "namespace", validation.Limits()):
        raise ValueError(f"{value!r} must be letters, digits and . _ : / -")
    return value


def _share(value: str) -> float:
    """A share of a whole, above 0 and at most 1."""
    try:
        share = float(value.strip())
    except ValueError:
        raise ValueError(f"not a number: {value!r}") from None
    if not 0 < share <= 1:
        raise ValueError(f"must be above 0 and at most 1 (a share of the node's memory), got {value.strip()}")
    return share


def _password(value: str) -> str:
    return value  # taken as it is: spaces may belong to it


_LIMITS = validation.Limits()
_WATCH = WatchSettings()
_SESSIONS = SessionSettings()
_LEASE = election.LeaseSettings()
_COMMIT = CommitLimits()
_DAY = 24 * 3600.0

SETTINGS: list[Setting] = [
    Setting("etcd", _endpoints, ("127.0.0.1:2379",), "etcd endpoints, HOST:PORT[,...]", metavar="ADDRS"),
    Setting("etcd_user", text, "", "etcd user name, when etcd has authentication on", metavar="NAME"),
    Setting(
        "etcd_password_file",
        text,
        "",
        "file holding the etcd user's password (or set HERDER_ETCD_PASSWORD)",
        metavar="PATH",
    ),
    Setting(
        "etcd_password",
        _password,
        "",
        "the etcd user's password (environment only)",
        flag=None,
        in_file=False,
        secret=True,
    ),
    Setting("etcd_timeout", seconds(0, 300, above=True), 5.0, "seconds an etcd request may take", metavar="S"),
    Setting("listen", _host_port, "127.0.0.1:50051", "gRPC address to serve on", metavar="ADDR"),
    Setting("namespace", _namespace, "default", "etcd key namespace", metavar="NAME"),
    Setting("advertise", text, "", "address clients are told to use (default: the listen address)", metavar="ADDR"),
    Setting("lease_ttl", integer(1), _LEASE.ttl, "leader lease seconds", metavar="S"),
    Setting(
        "leader_probe_interval",
        seconds(0, 60),
        _LEASE.probe_interval,
        "seconds between a follower's probes of the leader's address; when nothing listens there twice"
        " in a row its term is ended without waiting out the lease. 0 turns probing off (when the advertised"
        " address can refuse connections while the leader lives, e.g. behind a load balancer)",
        metavar="S",
    ),
    Setting(
        "heartbeat_interval",
        seconds(0, above=True),
        _SESSIONS.heartbeat_interval,
        "seconds between a worker's heartbeats",
        metavar="S",
    ),
    Setting(
        "heartbeat_timeout",
        seconds(0, above=True),
        _SESSIONS.heartbeat_timeout,
        "seconds without a heartbeat before a worker is gone",
        metavar="S",
    ),
    Setting(
        "ack_timeout",
        seconds(0, above=True),
        _SESSIONS.ack_timeout,
        "seconds a worker has to acknowledge an assignment",
        metavar="S",
    ),
    Setting(
        "accept_unregistered_types",
        boolean,
        False,
        "accept tasks whose type is not registered (their payload is not checked)",
        switch=True,
    ),
    Setting(
        "retention",
        seconds(0, MAX_DELAY_SECONDS),
        _DAY,
        "seconds finished tasks are kept unless their queue sets its own",
        metavar="S",
    ),
    Setting(
        "idempotency_window",
        seconds(0, MAX_DELAY_SECONDS),
        _DAY,
        "seconds an idempotency key returns its task",
        metavar="S",
    ),
    Setting("max_sessions", integer(1), _SESSIONS.max_sessions, "worker sessions served at once", metavar="N"),
    Setting(
        "quarantine",
        seconds(0, _DAY, above=True),
        60.0,
        "seconds a worker that leaves an assignment unacknowledged gets no assignments",
        metavar="S",
    ),
    Setting(
        "running_write_delay",
        seconds(0, 60),
        LeaderSettings().running_write_delay,
        "seconds an attempt runs before its RUNNING state is written; one that ends sooner is written once,"
        " with its outcome (0: at once, unless the outcome is already waiting to be written)",
        metavar="S",
    ),
    Setting(
        "memory_pressure",
        _share,
        PlacementSettings().memory_pressure,
        "a node whose memory use (used/total) is at or above this share gets no new tasks",
        metavar="SHARE",
    ),
    *(
        Setting(f"max_{name}_bytes", integer(1), getattr(_LIMITS, f"max_{name}_bytes"), what, metavar="N")
        for name, what in (
            ("result", "largest attempt output a worker may report"),
            ("error", "largest attempt error (serialized TaskError) a worker may report"),
            ("progress", "largest progress update stored; bigger ones are dropped"),
            ("record", "largest record stored in etcd, below etcd's request limit"),
        )
    ),
    Setting(
        "commit_max_ops",
        integer(16, 10_000),
        _COMMIT.max_ops,
        "most writes batched into one etcd transaction; at most etcd's --max-txn-ops (128 by default)",
        metavar="N",
    ),
    Setting(
        "commit_timeout",
        seconds(0, 60, above=True),
        _COMMIT.timeout,
        "seconds one etcd transaction may take before the leader steps down (its outcome unknown)",
        metavar="S",
    ),
    Setting(
        "max_waiting_calls",
        integer(0, 1_000_000),
        CoordinatorConfig.max_waiting_calls,
        "calls that may wait in gRPC to be picked up before SubmitTask(s) and RetryTask are refused with"
        " RESOURCE_EXHAUSTED and a retry delay (overload); 0 never refuses for this",
        metavar="N",
    ),
    Setting(
        "max_loop_lag",
        seconds(0, 60),
        CoordinatorConfig.max_loop_lag,
        "seconds the coordinator's event loop may run behind before SubmitTask(s) and RetryTask are refused"
        " with RESOURCE_EXHAUSTED and a retry delay (overload); 0 never refuses",
        metavar="S",
    ),
    Setting(
        "max_pending_calls",
        integer(100, 1_000_000),
        CoordinatorConfig.max_pending_calls,
        "calls gRPC holds before the coordinator picks them up; past it gRPC cancels new ones",
        metavar="N",
    ),
    Setting(
        "max_watchers",
        integer(1),
        _WATCH.max_watchers,
        "WatchTasks streams served at once; more are refused",
        metavar="N",
    ),
    Setting(
        "watch_backlog",
        integer(1),
        _WATCH.max_backlog,
        "changes a watcher may fall behind before it is ended",
        metavar="N",
    ),
    Setting(
        "task_types",
        parse_declarations,
        (),
        "task types registered when a leader takes office, before any worker: [[coordinator.task_types]]"
        " tables (name, input, output, protos + proto_path or descriptor_set; file only)",
        flag=None,
        env=None,
        structured=True,
    ),
    metrics_setting(),
    *log_settings(),
    Setting(
        "task_log",
        boolean,
        True,
        "log one info line per task state change (logger herder.tasks); off saves its CPU on busy coordinators",
        metavar="BOOL",
    ),
]


def _limits(settings: Settings) -> validation.Limits:
    return dataclasses.replace(
        _LIMITS,
        max_result_bytes=settings["max_result_bytes"],
        max_error_bytes=settings["max_error_bytes"],
        max_progress_bytes=settings["max_progress_bytes"],
        max_record_bytes=settings["max_record_bytes"],
    )


def _check(settings: Settings) -> list[str]:
    """Problems between settings (each value alone has been checked as it was read)."""
    problems = []
    if settings["heartbeat_interval"] >= settings["heartbeat_timeout"]:
        problems.append(f"{settings.where('heartbeat_interval')} must be below {settings.where('heartbeat_timeout')}")
    problems += _limits(settings).problems()
    user, password, password_file = settings["etcd_user"], settings["etcd_password"], settings["etcd_password_file"]
    if password and password_file:
        problems.append(
            f"give one of {settings.where('etcd_password')} and {settings.where('etcd_password_file')}, not both"
        )
    elif user and not (password or password_file):
        problems.append(f"{settings.where('etcd_user')} needs etcd_password_file or HERDER_ETCD_PASSWORD")
    elif (password or password_file) and not user:
        problems.append("an etcd password needs etcd_user (--etcd-user or HERDER_ETCD_USER)")
    elif password_file:
        try:
            _read_password(password_file)
        except ValueError as exc:
            problems.append(f"{settings.where('etcd_password_file')}: {exc}")
    return problems


def _read_password(path: str) -> str:
    """The first line of the password file (a trailing newline is not part of the password)."""
    try:
        with open(path, encoding="utf-8") as stream:
            password = stream.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it: {getattr(exc, 'strerror', None) or exc}") from None
    if not password:
        raise ValueError("it is empty")
    return password


def parse_args(argv: Sequence[str] | None = None) -> CoordinatorConfig:
    """The coordinator's config; exits 2 with one line for a bad setting, 0 after --show-config."""
    return config_of(_load(argv))


def _load(argv: Sequence[str] | None) -> Settings:
    return load(
        PROG,
        "coordinator",
        SETTINGS,
        argv,
        description="Run a Herder coordinator replica. Every flag also reads HERDER_<FLAG> (e.g. HERDER_ETCD)"
        " and the [coordinator] table of the --config file, in that order.",
        check=_check,
    )


def config_of(settings: Settings) -> CoordinatorConfig:
    password = settings["etcd_password"]
    if settings["etcd_password_file"]:
        password = _read_password(settings["etcd_password_file"])
    return CoordinatorConfig(
        etcd=settings["etcd"],
        credentials=EtcdCredentials(settings["etcd_user"], password) if settings["etcd_user"] else None,
        etcd_timeout=settings["etcd_timeout"],
        listen=settings["listen"],
        namespace=settings["namespace"],
        advertise=settings["advertise"],
        lease=election.LeaseSettings(ttl=settings["lease_ttl"], probe_interval=settings["leader_probe_interval"]),
        leader=LeaderSettings(
            sessions=SessionSettings(
                heartbeat_interval=settings["heartbeat_interval"],
                heartbeat_timeout=settings["heartbeat_timeout"],
                ack_timeout=settings["ack_timeout"],
                max_sessions=settings["max_sessions"],
            ),
            accept_unregistered_types=settings["accept_unregistered_types"],
            retention=settings["retention"],
            idempotency_window=settings["idempotency_window"],
            quarantine=settings["quarantine"],
            running_write_delay=settings["running_write_delay"],
            placement=PlacementSettings(memory_pressure=settings["memory_pressure"]),
            # A second transaction goes out beside one in flight once a full one's worth waits.
            commit=dataclasses.replace(
                _COMMIT,
                max_ops=settings["commit_max_ops"],
                parallel_ops=settings["commit_max_ops"],
                timeout=settings["commit_timeout"],
            ),
        ),
        limits=_limits(settings),
        watch=WatchSettings(max_watchers=settings["max_watchers"], max_backlog=settings["watch_backlog"]),
        task_types=tuple(declared.task_type for declared in settings["task_types"]),
        metrics=settings["metrics"],
        max_waiting_calls=settings["max_waiting_calls"],
        max_loop_lag=settings["max_loop_lag"],
        max_pending_calls=settings["max_pending_calls"],
    )


def main(argv: Sequence[str] | None = None) -> int:
    settings = _load(argv)
    config = config_of(settings)
    logs.configure(settings["log_level"], settings["log_format"])
    if not settings["task_log"]:
        logging.getLogger("herder.tasks").setLevel(logging.WARNING)
    tracing.configure_from_env("herder-coordinator")
    tune_gc()
    try:
        run_loop(serve(config))
    except (EtcdAuthError, ListenError, MetricsError) as exc:  # each says what is wrong itself
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except EtcdError as exc:
        print(f"{PROG}: cannot reach etcd at {','.join(config.etcd)}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
