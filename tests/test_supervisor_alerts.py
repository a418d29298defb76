"""Alerts end to end: a real coordinator, `herder supervisor` and a plain handler process, each alert
raised once and resolved once, seen through WatchAlerts, GetStatus, ListNodes and `herder alerts`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from _cli import HERDER
from _cluster import Coordinator
from _helpers import process_group
from _raw_worker import RawWorker
from _scheduling import Api
from _timing import eventually

from herder.clients import Client, Retry
from herder.clients.alerts import ATTEMPT_PAST_TIMEOUT, parse_alert_overrides
from herder.clients.context import TaskContext
from herder.clients.embedded_etcd import free_port
from herder.clients.endpoints import Endpoints
from herder.clients.engine import SessionEngine
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    handler_pb2,
    handler_pb2_grpc,
    supervisor_pb2,
    supervisor_pb2_grpc,
)
from herder.supervisor.alerting import Alerter

pytestmark = pytest.mark.timeout(90)

HANDLER = str(Path(__file__).with_name("_plain_handler.py"))
ECHO = "examples.echo"
# The resource rules would fire on a busy test machine; each test enables only the rule it tests.
QUIET = ("memory_pressure", "cpu_saturation", "disk_almost_full", "handler_unreachable", "heartbeat_lag")


def _alert_flags(*overrides: str) -> list[str]:
    tested = {o.split(".", 1)[0] for o in overrides}
    disabled = [f"{name}.enabled=false" for name in QUIET if name not in tested]
    return [arg for o in (*disabled, *overrides) for arg in ("--alert", o)]


@contextlib.contextmanager
def handler(port: int) -> Iterator[subprocess.Popen[bytes]]:
    with process_group([sys.executable, HANDLER, "--port", str(port), "--mode", "echo"]) as process:
        yield process


async def _answers(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await handler_pb2_grpc.TaskHandlerServiceStub(channel).Describe(handler_pb2.DescribeRequest(), timeout=1)
            return True
        except grpc.aio.AioRpcError:
            return False


@contextlib.contextmanager
def supervisor(coordinator: Coordinator, handler_port: int, admin: str, *extra: str) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    args = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address, "--node-id", "node-a"]
    args += ["--handler", f"127.0.0.1:{handler_port}", "--listen", admin, "--resource-interval", "0.2", *extra]
    with process_group(args, env=env):
        yield


@contextlib.asynccontextmanager
async def watching(admin: str) -> AsyncIterator[list[supervisor_pb2.Alert]]:
    """Everything WatchAlerts streams while the block runs, in order."""
    seen: list[supervisor_pb2.Alert] = []
    async with grpc.aio.insecure_channel(admin) as channel:
        stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
        await eventually(lambda: _status_or_none(stub), "the admin API answering")
        call = stub.WatchAlerts(supervisor_pb2.WatchAlertsRequest())

        async def read() -> None:
            async for response in call:
                seen.append(response.alert)

        reader = asyncio.create_task(read())
        try:
            yield seen
        finally:
            call.cancel()
            reader.cancel()
            await asyncio.wait({reader})


async def _status_or_none(stub: supervisor_pb2_grpc.SupervisorServiceStub) -> supervisor_pb2.GetStatusResponse | None:
    try:
        return await stub.GetStatus(supervisor_pb2.GetStatusRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None


async def _status(admin: str) -> supervisor_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(admin) as channel:
        status = await _status_or_none(supervisor_pb2_grpc.SupervisorServiceStub(channel))
    assert status is not None
    return status


def _changes(seen: list[supervisor_pb2.Alert], name: str) -> list[tuple[str, str]]:
    """("raise" | "resolve", id) for each streamed change of alert `name`."""
    return [("resolve" if a.HasField("resolve_time") else "raise", a.id) for a in seen if a.name == name]


async def _connected(c: Client) -> bool:
    return any(node.worker_id == "node-a" for node in await c.nodes())


async def _node_alerts(c: Client) -> list[str] | None:
    """The alert names ListNodes shows on node-a (None while it is not connected)."""
    for node in await c.nodes():
        if node.worker_id == "node-a":
            return [a.name for a in node.alerts]
    return None


async def _herder(coordinator: Coordinator, *args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [HERDER, "--coordinator", coordinator.address, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def _settled(seen: list[supervisor_pb2.Alert], name: str, count: int) -> None:
    """Wait for `count` changes of `name`, then a little more: a second raise would show up meanwhile."""
    await eventually(lambda: _async(len(_changes(seen, name)) >= count), f"{count} changes of {name}", timeout=30)
    await asyncio.sleep(1.5)


async def _async(value: bool) -> bool:
    return value


async def test_handler_unreachable_raised_once_and_cleared_once(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    flags = _alert_flags("handler_unreachable.threshold=1.5s", "handler_unreachable.clear_for=0.5s")
    with handler(port) as first:
        await eventually(lambda: _answers(port), "the handler answering")
        with supervisor(coordinator, port, admin, *flags):
            async with Client(coordinator.address) as c, watching(admin) as seen:
                await eventually(lambda: _connected(c), "node-a connected")
                os.killpg(first.pid, signal.SIGKILL)
                await eventually(lambda: _async(bool(_changes(seen, "handler_unreachable"))), "the alert raised")
                # Paused, the supervisor keeps its session: the coordinator shows the alert with the node.
                await eventually(lambda: _has(c, "handler_unreachable"), "the alert in ListNodes", timeout=10)
                listed = json.loads(await _herder(coordinator, "--output", "json", "alerts"))
                assert [(a["worker_id"], a["name"], a["severity"]) for a in listed] == [
                    ("node-a", "handler_unreachable", "ALERT_SEVERITY_CRITICAL")
                ]
                assert "handler_unreachable" in await _herder(coordinator, "alerts")
                with handler(port):
                    await _settled(seen, "handler_unreachable", 2)

                    async def cleared() -> bool:
                        return await _node_alerts(c) == []

                    await eventually(cleared, "the alert gone from ListNodes", timeout=10)
                status = await _status(admin)
    (raised, first_id), (resolved, second_id) = _changes(seen, "handler_unreachable")
    assert (raised, resolved) == ("raise", "resolve") and first_id == second_id
    assert dict(status.alerts_raised) == {"handler_unreachable": 1} and not status.alerts


async def _has(c: Client, name: str) -> bool:
    """Whether ListNodes shows alert `name` on node-a."""
    return name in (await _node_alerts(c) or [])


async def test_heartbeat_lag_while_the_coordinator_is_frozen(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    flags = _alert_flags("heartbeat_lag.threshold=2s", "heartbeat_lag.clear_for=0.5s")
    with handler(port), supervisor(coordinator, port, admin, *flags):
        async with Client(coordinator.address) as c:
            await eventually(lambda: _connected(c), "node-a connected")
        async with watching(admin) as seen:
            coordinator.freeze()
            try:
                await eventually(lambda: _async(bool(_changes(seen, "heartbeat_lag"))), "the alert raised")
            finally:
                coordinator.resume()
            await _settled(seen, "heartbeat_lag", 2)
        status = await _status(admin)
    (raised, first_id), (resolved, second_id) = _changes(seen, "heartbeat_lag")
    assert (raised, resolved) == ("raise", "resolve") and first_id == second_id
    assert dict(status.alerts_raised) == {"heartbeat_lag": 1}


async def test_disk_alert_forwarded_to_the_coordinator(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    flags = _alert_flags("disk_almost_full.threshold=0", "disk_almost_full.for=0")  # fires on any disk
    with handler(port), supervisor(coordinator, port, admin, *flags):
        async with Client(coordinator.address) as c:
            await eventually(lambda: _has(c, "disk_almost_full"), "the disk alert in ListNodes")
            (node,) = [n for n in await c.nodes() if n.worker_id == "node-a"]
        # A watcher that starts late gets the active alert first.
        async with watching(admin) as seen:
            await eventually(lambda: _async(bool(seen)), "the active alert streamed")
        status = await _status(admin)
        table = await _herder(coordinator, "alerts")
        nodes = await _herder(coordinator, "nodes")
    (alert,) = node.alerts
    assert alert.severity == supervisor_pb2.ALERT_SEVERITY_CRITICAL and "at or above 0%" in alert.message
    assert [(a.name, a.id) for a in seen] == [("disk_almost_full", alert.id)]
    assert [a.id for a in status.alerts] == [alert.id] and dict(status.alerts_raised) == {"disk_almost_full": 1}
    assert "node-a" in table and "disk_almost_full" in table and "critical" in table
    assert "disk_almost_full" in nodes


async def test_bad_alert_flag_is_one_line() -> None:
    args = [sys.executable, "-m", "herder.supervisor", "--handler", "127.0.0.1:1"]
    args += ["--alert", "disk_almost_full.for=x", "--alert", "nope.threshold=1"]
    done = await asyncio.to_thread(subprocess.run, args, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "alerts (flag --alert): disk_almost_full.for: must be seconds" in done.stderr
    assert "unknown alert 'nope'" in done.stderr


class _Stubborn:
    """An AttemptRunner whose handler ignores cancellation: it runs `seconds` whatever it is told."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = asyncio.Event()

    def task_types(self) -> list[str]:
        return [ECHO]

    async def prepare(self, stub: coordinator_pb2_grpc.CoordinatorServiceAsyncStub, timeout: float) -> None:
        pass  # the `api` fixture registered examples.echo

    async def run(self, context: TaskContext) -> coordinator_pb2.AttemptResult:
        self.started.set()
        await asyncio.sleep(self.seconds)  # context.cancelled is set at the timeout: not looked at
        return coordinator_pb2.AttemptResult(canceled=context.cancelled.reason or "done")


async def test_attempt_past_timeout_raised_once_and_cleared_once(coordinator: Coordinator, api: Api) -> None:
    rules = parse_alert_overrides(
        [f"{name}.enabled=false" for name in QUIET] + [f"{ATTEMPT_PAST_TIMEOUT}.threshold=1s"]
    )
    runner = _Stubborn(seconds=4.0)
    engine = SessionEngine(Endpoints(coordinator.address), runner, slots=1)

    def measure() -> tuple[dict[str, float | None], dict[str, str]]:
        overdue = engine.overdue()
        return {ATTEMPT_PAST_TIMEOUT: overdue[0][1] if overdue else 0.0}, {}

    alerter = Alerter(rules, measure, interval=0.1)
    serving = asyncio.create_task(engine.run())
    ticking = asyncio.create_task(alerter.run())
    try:
        await engine.wait_connected(10)
        async with contextlib.aclosing(alerter.watch()) as changes:
            await api.client.submit(ECHO, examples_pb2.EchoRequest(text="late"), timeout=1, retry=Retry(max_attempts=1))
            async with asyncio.timeout(20):
                raised = await anext(changes)
                resolved = await anext(changes)
        await asyncio.sleep(0.5)
    finally:
        await engine.shutdown(grace=0)
        ticking.cancel()
        await asyncio.wait({serving, ticking})
    assert raised.name == ATTEMPT_PAST_TIMEOUT and raised.resolve_time is None
    assert resolved.id == raised.id and resolved.resolve_time is not None
    assert alerter.raised == {ATTEMPT_PAST_TIMEOUT: 1} and not alerter.active


async def test_bad_alerts_in_heartbeats_are_dropped_once_logged(coordinator: Coordinator) -> None:
    good = supervisor_pb2.Alert(id="cpu_saturation-1", name="cpu_saturation", severity=2, message="hot")
    good.raise_time.GetCurrentTime()
    bad = supervisor_pb2.Alert(id="x" * 200, name="cpu_saturation", severity=2)  # too long an id, no raise_time
    async with RawWorker(coordinator.address, "raw-alerts", [ECHO]) as raw, Client(coordinator.address) as c:
        for _ in range(3):
            await raw.send(heartbeat=coordinator_pb2.Heartbeat(alerts=[bad, good]))
        warned = "alert dropped"

        async def logged() -> bool:
            return warned in coordinator.log_tail(20_000)

        await eventually(logged, "the warning")

        async def kept() -> list[str]:
            # RawWorker's own heartbeats carry no alerts (none active): send ours just before reading.
            await raw.send(heartbeat=coordinator_pb2.Heartbeat(alerts=[bad, good]))
            (node,) = await c.nodes()
            return [a.id for a in node.alerts]

        assert await eventually(kept, "the good alert kept") == [good.id]
        assert raw.error is None and not raw.closed.is_set()
    assert coordinator.log_tail(20_000).count(warned) == 1
