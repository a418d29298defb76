"""`python -m herder.server` (what `herder coordinator` runs): flags, HERDER_* variables, one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from herder.clients.runner import run as run_loop
from herder.server import election, validation
from herder.server._etcd import EtcdError
from herder.server.app import CoordinatorConfig, ListenError, serve
from herder.server.horizon import MAX_DELAY_SECONDS
from herder.server.leader import LeaderSettings
from herder.server.placement import PlacementSettings
from herder.server.sessions import SessionSettings
from herder.server.watchers import WatchSettings


def _env(name: str, default: str) -> str:
    return os.environ.get(f"HERDER_{name}", default)


def _flag_bool(name: str) -> bool:
    return _env(name, "").lower() in {"1", "true", "yes", "on"}


def parse_args(argv: Sequence[str] | None = None) -> CoordinatorConfig:
    parser = argparse.ArgumentParser(
        prog="herder coordinator",
        description="Run a Herder coordinator replica. Every flag also reads HERDER_<FLAG> (e.g. HERDER_ETCD).",
    )
    parser.add_argument("--etcd", default=_env("ETCD", "127.0.0.1:2379"), help="etcd endpoints, HOST:PORT[,...]")
    parser.add_argument("--listen", default=_env("LISTEN", "127.0.0.1:50051"), help="gRPC address to serve on")
    parser.add_argument("--namespace", default=_env("NAMESPACE", "default"), help="etcd key namespace")
    parser.add_argument("--advertise", default=_env("ADVERTISE", ""), help="address clients are told to use")
    parser.add_argument("--lease-ttl", type=int, default=int(_env("LEASE_TTL", "5")), help="leader lease seconds")
    parser.add_argument(
        "--leader-probe-interval",
        type=float,
        default=float(_env("LEADER_PROBE_INTERVAL", str(election.LeaseSettings().probe_interval))),
        help="seconds between a follower's probes of the leader's address; when nothing listens there twice"
        " in a row its term is ended without waiting out the lease. 0 turns probing off (when the advertised"
        " address can refuse connections while the leader lives, e.g. behind a load balancer)",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=float(_env("HEARTBEAT_INTERVAL", "1.0")))
    parser.add_argument("--heartbeat-timeout", type=float, default=float(_env("HEARTBEAT_TIMEOUT", "5.0")))
    parser.add_argument("--ack-timeout", type=float, default=float(_env("ACK_TIMEOUT", "5.0")))
    parser.add_argument(
        "--accept-unregistered-types",
        action="store_true",
        default=_flag_bool("ACCEPT_UNREGISTERED_TYPES"),
        help="accept tasks whose type is not registered (their payload is not checked)",
    )
    parser.add_argument(
        "--retention",
        type=float,
        default=float(_env("RETENTION", str(24 * 3600))),
        help="seconds finished tasks are kept unless their queue sets its own (default one day)",
    )
    parser.add_argument(
        "--idempotency-window",
        type=float,
        default=float(_env("IDEMPOTENCY_WINDOW", str(24 * 3600))),
        help="seconds an idempotency key returns its task (default one day)",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=_env("MAX_SESSIONS", str(SessionSettings().max_sessions)),
        help=f"worker sessions served at once (default {SessionSettings().max_sessions})",
    )
    parser.add_argument(
        "--quarantine",
        type=float,
        default=_env("QUARANTINE", "60"),
        help="seconds a worker that leaves an assignment unacknowledged gets no assignments (default 60)",
    )
    parser.add_argument(
        "--memory-pressure",
        type=float,
        default=_env("MEMORY_PRESSURE", str(PlacementSettings().memory_pressure)),
        help="a node whose memory use (used/total) is at or above this share gets no new tasks"
        f" (default {PlacementSettings().memory_pressure})",
    )
    limits = validation.Limits()
    for name, what in (
        ("result", "largest attempt output a worker may report"),
        ("error", "largest attempt error (serialized TaskError) a worker may report"),
        ("progress", "largest progress update stored; bigger ones are dropped"),
        ("record", "largest record stored in etcd, below etcd's request limit"),
    ):
        default = getattr(limits, f"max_{name}_bytes")
        parser.add_argument(
            f"--max-{name}-bytes",
            type=int,
            default=_env(f"MAX_{name.upper()}_BYTES", str(default)),
            help=f"{what} (default {default})",
        )
    watch = WatchSettings()
    # String defaults go through `type`, so a bad HERDER_* value is reported like a bad flag.
    parser.add_argument(
        "--max-watchers",
        type=int,
        default=_env("MAX_WATCHERS", str(watch.max_watchers)),
        help=f"WatchTasks streams served at once; more are refused (default {watch.max_watchers})",
    )
    parser.add_argument(
        "--watch-backlog",
        type=int,
        default=_env("WATCH_BACKLOG", str(watch.max_backlog)),
        help=f"changes a watcher may fall behind before it is ended (default {watch.max_backlog})",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), help="debug, info, warning or error")
    args = parser.parse_args(argv)
    endpoints = tuple(e.strip() for e in args.etcd.split(",") if e.strip())
    problems = [f"--etcd: {e!r} is not HOST:PORT" for e in endpoints if not _is_host_port(e)]
    if not endpoints:
        problems.append("--etcd: give at least one HOST:PORT")
    if not _is_host_port(args.listen):
        problems.append(f"--listen: {args.listen!r} is not HOST:PORT")
    if validation.validate_name(args.namespace, "namespace", validation.Limits()):
        problems.append(f"--namespace: {args.namespace!r} must be letters, digits and . _ : / -")
    if args.lease_ttl < 1:
        problems.append("--lease-ttl: must be at least 1 second")
    if not 0 <= args.leader_probe_interval <= 60:
        problems.append("--leader-probe-interval: must be between 0 (off) and 60 seconds")
    if not 0 < args.heartbeat_interval < args.heartbeat_timeout:
        problems.append("--heartbeat-interval must be positive and below --heartbeat-timeout")
    if args.ack_timeout <= 0:
        problems.append("--ack-timeout: must be positive")
    if not 0 <= args.retention <= MAX_DELAY_SECONDS or not 0 <= args.idempotency_window <= MAX_DELAY_SECONDS:
        problems.append(f"--retention and --idempotency-window must be between 0 and {MAX_DELAY_SECONDS} (366 days)")
    if args.max_sessions < 1:
        problems.append("--max-sessions: must be at least 1")
    if not 0 < args.quarantine <= 24 * 3600:
        problems.append("--quarantine: must be between 0 and 86400 seconds")
    if not 0 < args.memory_pressure <= 1:
        problems.append("--memory-pressure: must be above 0 and at most 1 (a share of the node's memory)")
    limits = dataclasses.replace(
        limits,
        max_result_bytes=args.max_result_bytes,
        max_error_bytes=args.max_error_bytes,
        max_progress_bytes=args.max_progress_bytes,
        max_record_bytes=args.max_record_bytes,
    )
    problems += [problem.replace("max_", "--max-").replace("_bytes", "-bytes") for problem in limits.problems()]
    if args.max_watchers < 1:
        problems.append("--max-watchers: must be at least 1")
    if args.watch_backlog < 1:
        problems.append("--watch-backlog: must be at least 1")
    if problems:
        parser.error("; ".join(problems))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    return CoordinatorConfig(
        etcd=endpoints,
        listen=args.listen,
        namespace=args.namespace,
        advertise=args.advertise,
        lease=election.LeaseSettings(ttl=args.lease_ttl, probe_interval=args.leader_probe_interval),
        leader=LeaderSettings(
            sessions=SessionSettings(
                heartbeat_interval=args.heartbeat_interval,
                heartbeat_timeout=args.heartbeat_timeout,
                ack_timeout=args.ack_timeout,
                max_sessions=args.max_sessions,
            ),
            accept_unregistered_types=args.accept_unregistered_types,
            retention=args.retention,
            idempotency_window=args.idempotency_window,
            quarantine=args.quarantine,
            placement=PlacementSettings(memory_pressure=args.memory_pressure),
        ),
        limits=limits,
        watch=WatchSettings(max_watchers=args.max_watchers, max_backlog=args.watch_backlog),
    )


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 <= int(port) < 65536)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        run_loop(serve(config))
    except EtcdError as exc:
        print(f"herder coordinator: cannot reach etcd at {','.join(config.etcd)}: {exc}", file=sys.stderr)
        return 1
    except ListenError as exc:
        print(f"herder coordinator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
