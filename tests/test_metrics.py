"""Metrics and logs: the Prometheus endpoint of a real coordinator and supervisor (`--metrics`), and
the coordinator's one JSON log line per task state change."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cluster import Coordinator, CoordinatorStartError
from _raw_worker import RawWorker
from _scheduling import ECHO, S, complete, connect, fail_attempt, get
from _timing import eventually, eventually_sync
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from test_supervisor import handler, supervisor

from herder.clients import Retry
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.metrics_setup import Histogram
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(60)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
# What a task id looks like (leader.new_task_id): 12 hex digits of milliseconds, then 12 random ones.
TASK_ID = re.compile(r"^[0-9a-f]{24}$")


def scrape(address: str) -> dict[str, list[Sample]]:
    """Samples by name from one GET of the Prometheus text format."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


@pytest.fixture
def metered(etcd: EmbeddedEtcd, namespace: str, tmp_path: Path) -> Iterator[tuple[Coordinator, str]]:
    """A coordinator serving --metrics on a free port and logging JSON; with its metrics address."""
    address = f"127.0.0.1:{free_port()}"
    node = Coordinator(etcd.endpoint, namespace, extra_args=["--metrics", address, "--log-format", "json"])
    try:
        node.start()
        yield node, address
    finally:
        node.kill()


async def test_coordinator_serves_task_queue_etcd_and_leader_metrics(metered: tuple[Coordinator, str]) -> None:
    node, address = metered
    async with connect(node) as api, RawWorker(node.address, "w", [ECHO], slots=1) as worker:
        ok = (await api.client.submit(ECHO, json={"text": "ok"}, queue="mq")).task
        await complete(worker, await worker.next_assignment())
        retried = (await api.client.submit(ECHO, json={"text": "retry"}, queue="mq", retry=Retry(2, 0.1))).task
        await fail_attempt(worker, await worker.start_next())
        await complete(worker, await worker.next_assignment())
        slow = (await api.client.submit(ECHO, json={"text": "slow"}, queue="mq", timeout=0.3, retry=Retry(1))).task
        await worker.start_next()
        for task_id in (ok.id, retried.id):
            await eventually(lambda i=task_id: _in(api, i, S.TASK_STATE_SUCCEEDED), f"{task_id} succeeded")
        await eventually(lambda: _in(api, slow.id, S.TASK_STATE_FAILED), "the slow task timed out")
        # One waits in the backlog: no worker serves its queue's tasks while this one is full.
        await api.client.submit(ECHO, json={"text": "waits"}, queue="backlog", delay=3600)

        samples = eventually_sync(
            lambda: (s := scrape(address)) and value(s, "herder_task_timeouts_total") >= 1 and s,
            "the timeout in a scrape",
        )
    echo = {"queue": "mq", "type": ECHO}
    assert value(samples, "herder_task_finished_total", outcome="succeeded", **echo) == 2
    assert value(samples, "herder_task_finished_total", outcome="failed", **echo) == 1
    assert value(samples, "herder_task_retries_total", **echo) == 1
    assert value(samples, "herder_task_timeouts_total", **echo) == 1
    assert value(samples, "herder_task_duration_seconds_count", outcome="succeeded", **echo) == 2
    assert value(samples, "herder_task_queue_wait_seconds_count", queue="mq") == 4  # attempts assigned
    assert value(samples, "herder_task_start_latency_seconds_count", **echo) == 4
    assert value(samples, "herder_queue_backlog", queue="backlog") == 1
    assert value(samples, "herder_queue_running", queue="mq") == 0
    assert value(samples, "herder_worker_sessions") == 1
    assert value(samples, "herder_leader_status", namespace=node.namespace) == 1
    assert value(samples, "herder_leader_changes_total", namespace=node.namespace) == 1
    assert value(samples, "herder_watch_subscribers") == 0
    for name in ("herder_overload_refused_total", "herder_grpc_waiting_calls", "herder_event_loop_lag_seconds"):
        assert len(samples.get(name, [])) == 1, name
    assert value(samples, "herder_overload_refused_total") == 0
    assert 0 <= value(samples, "herder_grpc_waiting_calls") < 1000
    assert 0 <= value(samples, "herder_event_loop_lag_seconds") < 30
    assert value(samples, "herder_etcd_commit_duration_seconds_count") >= 5
    assert value(samples, "herder_etcd_commit_ops_count") == value(samples, "herder_etcd_commit_duration_seconds_count")
    assert value(samples, "herder_etcd_commit_ops_sum") >= value(samples, "herder_etcd_commit_ops_count")
    seconds = value(samples, "herder_task_duration_seconds_sum", **echo)
    assert 0 <= seconds < 30, seconds
    # No series carries a task id, under any label.
    for name, found in samples.items():
        for sample in found:
            ids = [v for v in sample.labels.values() if TASK_ID.match(v)]
            assert not ids, f"{name} has a task id label: {sample.labels}"


async def test_one_json_line_per_state_change_with_task_id_attempt_and_trace_id(
    metered: tuple[Coordinator, str],
) -> None:
    node, _ = metered
    async with connect(node) as api, RawWorker(node.address, "w", [ECHO], slots=1) as worker:
        spec = task_pb2.TaskSpec(type=ECHO, payload_json='{"text": "x"}', retry=task_pb2.RetryPolicy(max_attempts=2))
        reply = await api.stub.SubmitTask(pb.SubmitTaskRequest(spec=spec), metadata=(("traceparent", TRACEPARENT),))
        task_id = reply.task.id
        await fail_attempt(worker, await worker.start_next())
        await complete(worker, await worker.start_next())
        await eventually(lambda: _in(api, task_id, S.TASK_STATE_SUCCEEDED), "the task succeeded")

    def lines() -> list[dict[str, object]]:
        found = []
        for line in node.log_path.read_text().splitlines():
            if line.startswith("{"):
                document = json.loads(line)
                if document.get("logger") == "herder.tasks" and document.get("task_id") == task_id:
                    found.append(document)
        return found

    events = eventually_sync(lambda: (f := lines()) and f[-1]["event"] == "succeeded" and f, "the succeeded line")
    assert [(e["event"], e["attempt"]) for e in events] == [
        ("created", 0),
        ("assigned", 1),
        ("running", 1),
        ("retry_scheduled", 1),
        ("queued", 1),
        ("assigned", 2),
        ("running", 2),
        ("succeeded", 2),
    ]
    assert {e["trace_id"] for e in events} == {TRACE_ID}
    assert {(e["level"], e["type"], e["queue"]) for e in events} == {("info", ECHO, "default")}


async def test_task_log_off_leaves_out_the_state_change_lines_only(etcd: EmbeddedEtcd, namespace: str) -> None:
    node = Coordinator(etcd.endpoint, namespace, extra_args=["--task-log", "off", "--log-format", "json"])
    try:
        node.start()
        async with connect(node) as api, RawWorker(node.address, "w", [ECHO], slots=1) as worker:
            task_id = (await api.client.submit(ECHO, json={"text": "quiet"})).task.id
            await complete(worker, await worker.next_assignment())
            await eventually(lambda: _in(api, task_id, S.TASK_STATE_SUCCEEDED), "the task succeeded")
        documents = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.startswith("{")]
        assert documents, "the coordinator logs its other info lines"
        assert not [d for d in documents if d.get("logger") == "herder.tasks"]
    finally:
        node.kill()


async def test_supervisor_serves_resource_slot_and_alert_gauges(coordinator: Coordinator) -> None:
    address, port = f"127.0.0.1:{free_port()}", free_port()
    with handler(port), supervisor(coordinator, port, "--metrics", address, "--resource-interval", "0.2"):
        samples = eventually_sync(
            lambda: (s := _scrape_quietly(address)) and value(s, "herder_node_memory_limit_bytes") > 0 and s,
            "a resource sample in a scrape",
            timeout=20,
        )
    assert 0 < value(samples, "herder_node_memory_usage_bytes") <= value(samples, "herder_node_memory_limit_bytes")
    assert 0 <= value(samples, "herder_node_cpu_utilization_ratio") <= 1
    assert value(samples, "herder_node_disk_limit_bytes") > 0
    assert value(samples, "herder_supervisor_slots_limit") == 2
    assert value(samples, "herder_supervisor_slots_busy") == 0
    alerts = {s.labels["alert"]: s.value for s in samples["herder_supervisor_alerts_active"]}
    assert {"memory_pressure", "cpu_saturation", "disk_almost_full"} <= set(alerts)
    assert all(v in (0, 1) for v in alerts.values())


def _scrape_quietly(address: str) -> dict[str, list[Sample]] | None:
    try:
        return scrape(address)
    except OSError:
        return None


async def _in(api, task_id: str, state: int) -> bool:  # type: ignore[no-untyped-def]
    return (await get(api, task_id)).state == state


def test_a_taken_metrics_address_is_one_error_before_start(etcd: EmbeddedEtcd, namespace: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        node = Coordinator(etcd.endpoint, namespace, extra_args=["--metrics", address])
        try:
            with pytest.raises(CoordinatorStartError):
                node.start(timeout=15)
            log = node.log_tail()
        finally:
            node.kill()
    assert f"herder coordinator: cannot serve metrics on {address}" in log, log
    assert "Traceback" not in log, log


# The supervisor as `pip install herder` (no extras) runs it: the metrics packages unimportable.
_SUPERVISOR_WITHOUT_METRICS = """
import sys
for name in ("opentelemetry.sdk", "opentelemetry.exporter.prometheus", "prometheus_client"):
    sys.modules[name] = None
from herder.supervisor.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_supervisor_metrics_without_the_packages_names_the_install() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SUPERVISOR_WITHOUT_METRICS, "--coordinator", "127.0.0.1:1",
         "--handler", "127.0.0.1:1", "--metrics", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "pip install 'herder[metrics]'" in done.stderr, done.stderr


def test_histogram_buckets_are_cumulative_with_le_bounds_and_inf() -> None:
    made = Histogram("h_seconds", "h", (0.1, 1.0), ("queue",))
    for seconds in (0.05, 0.1, 0.5, 1.0, 7.0):
        made.record(seconds, "q")
    made.record(0.2, "other")
    taken = dict(made.snapshot())
    # A value equal to a bound is in that bound's bucket (Prometheus's le); 7.0 only in +Inf.
    assert taken[("q",)] == [2, 4, 5, 0.05 + 0.1 + 0.5 + 1.0 + 7.0]
    assert taken[("other",)] == [0, 1, 1, 0.2]
