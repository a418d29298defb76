"""A real coordinator subprocess for tests: `python -m herder.server` in its own process group.

    with Coordinator(etcd.endpoint, namespace) as coordinator:   # started, leader of its namespace
        # (or Coordinator(cluster.endpoints, namespace) on several etcd members)
        ... coordinator.address ...
        coordinator.kill()       # SIGKILL the whole group (a crash)
        coordinator.restart()    # same port, waits until it leads again

The fixture `coordinator` (in conftest.py)
gives one started coordinator per test on the session's etcd and the test's namespace.
Every process started here is killed at teardown, on failure too, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herder.clients.embedded_etcd import free_port
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc
from herder.server.forwarding import FORWARDED_METADATA_KEY

_LIVE: set[Coordinator] = set()


class CoordinatorStartError(RuntimeError):
    """The coordinator exited or did not become ready in time; the message ends with its log."""


class Coordinator:
    """One coordinator process on 127.0.0.1:`port` (a free port unless given), with short heartbeat,
    ack and lease timings so failures are detected quickly in tests.

    `start()` waits until it serves and (with `wait_leader=True`) leads its namespace.
    `stop()` sends SIGTERM and waits (SIGKILL after `timeout`); `kill()` sends SIGKILL to the group.
    Both are safe to call twice. The log (stdout and stderr) is kept in `log_path`.
    `launcher` is the command before the flags (`[herder, "coordinator"]` tests the CLI's exec).
    """

    def __init__(
        self,
        etcd_endpoint: str | Sequence[str],
        namespace: str,
        *,
        port: int = 0,
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 2.0,
        ack_timeout: float = 2.0,
        accept_unregistered_types: bool = False,
        lease_ttl: int = 3,
        extra_args: Sequence[str] = (),
        launcher: Sequence[str] = (sys.executable, "-m", "herder.server"),
    ) -> None:
        # One endpoint or several (an etcd cluster): `--etcd` takes them as a comma list.
        self.etcd_endpoint = etcd_endpoint if isinstance(etcd_endpoint, str) else ",".join(etcd_endpoint)
        self.namespace = namespace
        self.port = port or free_port()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.ack_timeout = ack_timeout
        self.accept_unregistered_types = accept_unregistered_types
        self.lease_ttl = lease_ttl
        self.extra_args = tuple(extra_args)
        # The command before the flags: `herder coordinator` execs the same module.
        self.launcher = tuple(launcher)
        fd, log_path = tempfile.mkstemp(prefix="herder-coordinator-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_path)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        args = [
            *self.launcher,
            "--etcd",
            self.etcd_endpoint,
            "--listen",
            self.address,
            "--namespace",
            self.namespace,
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--heartbeat-timeout",
            str(self.heartbeat_timeout),
            "--ack-timeout",
            str(self.ack_timeout),
            "--lease-ttl",
            str(self.lease_ttl),
        ]
        if self.accept_unregistered_types:
            args.append("--accept-unregistered-types")
        return [*args, *self.extra_args]

    def start(self, *, wait_leader: bool = True, timeout: float = 20.0) -> Self:
        if self.running:
            raise RuntimeError(f"coordinator {self.address} is already running")
        # Settings come from the arguments only, not from the developer's HERDER_* environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {' '.join(self.command())}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        _LIVE.add(self)
        try:
            if wait_leader:
                self.wait_leader(timeout)
            else:
                self.wait_serving(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def status(self, timeout: float = 1.0) -> coordinator_pb2.GetClusterStatusResponse:
        """GetClusterStatus from this coordinator; raises grpc.RpcError when it does not answer."""
        with grpc.insecure_channel(self.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            response: coordinator_pb2.GetClusterStatusResponse = stub.GetClusterStatus(
                coordinator_pb2.GetClusterStatusRequest(), timeout=timeout
            )
            return response

    def health(self, service: str, timeout: float = 1.0) -> str:
        """grpc.health.v1 Check for `service` on this coordinator: "SERVING", "NOT_SERVING", ..."""
        with grpc.insecure_channel(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def is_leader(self) -> bool:
        """True when this process leads: only the leader answers a ListNodes marked as forwarded (a
        follower says UNAVAILABLE rather than forward it again), which, unlike the status's leader
        address, cannot be fooled by a killed predecessor on the same port whose lease has not expired yet."""
        try:
            with grpc.insecure_channel(self.address) as channel:
                coordinator_pb2_grpc.CoordinatorServiceStub(channel).ListNodes(
                    coordinator_pb2.ListNodesRequest(), timeout=1.0, metadata=((FORWARDED_METADATA_KEY, "1"),)
                )
        except grpc.RpcError:
            return False
        return True

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Wait until it answers GetClusterStatus."""
        self._wait(timeout, "serve", self._answers)

    def wait_leader(self, timeout: float = 20.0) -> None:
        """Wait until this process leads its namespace."""
        self._wait(timeout, "lead", self.is_leader)

    def wait_has_leader(self, timeout: float = 20.0) -> None:
        """Wait until this coordinator knows a leader (itself or another replica)."""
        self._wait(timeout, "know a leader", lambda: self._answers() and bool(self.status().leader_id))

    def _answers(self) -> bool:
        try:
            self.status()
        except grpc.RpcError:
            return False
        return True

    def _wait(self, timeout: float, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = self._process.returncode if self._process else None
                raise CoordinatorStartError(f"coordinator {self.address} exited with {code}\n{self.log_tail()}")
            with contextlib.suppress(grpc.RpcError):
                if done():
                    return
            if time.monotonic() > deadline:
                raise CoordinatorStartError(
                    f"coordinator {self.address} did not {what} within {timeout:.0f}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group and wait for it (SIGKILL after `timeout`); its exit code."""
        self.resume()  # a frozen process would handle SIGTERM only once continued
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL the process group at once (a crash); its exit code."""
        return self._end(signal.SIGKILL, 10.0)

    def freeze(self) -> None:
        """SIGSTOP the process group: it keeps its sockets and state but runs nothing (a long GC pause)."""
        if self.running and self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `freeze()`; harmless on a running process."""
        if self.running and self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGCONT)

    def restart(self, *, wait_leader: bool = True, timeout: float = 20.0) -> Self:
        """Stop gracefully and start again on the same port."""
        self.stop()
        return self.start(wait_leader=wait_leader, timeout=timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> int | None:
        process = self._process
        _LIVE.discard(self)
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        return process.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        """Kill the process if it still runs and remove the log."""
        self.kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            # Keep the log of a failed test for the report.
            sys.stderr.write(f"--- coordinator {self.address} log ---\n{self.log_tail()}\n")
        self.kill()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def start_replicas(
    etcd_endpoint: str, namespace: str, count: int, stack: contextlib.ExitStack, *, lease_ttl: int = 2
) -> list[Coordinator]:
    """`count` replicas of one namespace, the first one leading; each is killed when `stack` closes."""
    nodes = []
    for i in range(count):
        node = Coordinator(etcd_endpoint, namespace, lease_ttl=lease_ttl).start(wait_leader=i == 0)
        nodes.append(stack.enter_context(node))
    for node in nodes[1:]:
        node.wait_has_leader()
    return nodes


@atexit.register
def _kill_leftovers() -> None:
    for coordinator in list(_LIVE):
        coordinator.kill()


__all__ = ["Coordinator", "CoordinatorStartError", "start_replicas"]
