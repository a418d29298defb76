"""`herder queues`, `herder limits` and `herder tasks priority` against a real etcd and coordinator."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
from _cli import herder_worker, register_examples, run
from _cluster import Coordinator
from _timing import eventually_sync as eventually

pytestmark = pytest.mark.timeout(90)


T = TypeVar("T")


def run_json(capsys: pytest.CaptureFixture[str], address: str, *args: str) -> Any:
    code, out, err = run(capsys, "--coordinator", address, "--output", "json", *args)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def address(coordinator: Coordinator) -> str:
    """The coordinator's address, with the example task types registered."""
    return register_examples(coordinator.address)


@pytest.fixture
def worker(address: str) -> Iterator[subprocess.Popen[str]]:
    """`herder worker` serving the example types with 4 slots, connected before the test starts."""
    with herder_worker(address) as process:
        yield process


def limits_by_target(capsys: pytest.CaptureFixture[str], address: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(limit["scope"], limit["name"]): limit for limit in run_json(capsys, address, "limits")}


def test_limits_set_and_list(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, out, err = run(capsys, "--coordinator", address, "limits", "set", "global", "20")
    assert (code, out.strip()) == (0, "limit set: global: max running 20"), err
    code, out, _ = run(capsys, "--coordinator", address, "limits", "set", "queue", "reports", "--max-running", "3",
                       "--retention", "600")  # fmt: skip
    assert (code, out.strip()) == (0, "limit set: queue reports: max running 3, retention 10m00s")
    code, out, _ = run(capsys, "limits", "set", "key", "tenant-a", "--weight", "4", "--coordinator", address)
    assert (code, out.strip()) == (0, "limit set: key tenant-a: no limit, weight 4")
    code, out, err = run(capsys, "--coordinator", address, "limits")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["SCOPE", "NAME", "MAX", "RUNNING", "WEIGHT", "RETENTION"]
    assert rows[1:] == [
        ["global", "-", "20", "-", "-"],
        ["queue", "reports", "3", "-", "10m00s"],
        ["key", "tenant-a", "no", "limit", "4", "-"],
    ]
    limits = limits_by_target(capsys, address)
    assert limits[("LIMIT_SCOPE_GLOBAL", "")]["max_running"] == "20"
    assert limits[("LIMIT_SCOPE_QUEUE", "reports")]["retention"] == "600s"
    assert limits[("LIMIT_SCOPE_CONCURRENCY_KEY", "tenant-a")]["weight"] == 4


def test_queues_set_limit_keeps_the_retention(capsys: pytest.CaptureFixture[str], address: str) -> None:
    code, out, _ = run(capsys, "--coordinator", address, "queues", "set-limit", "reports", "4", "--retention", "300")
    assert (code, out.strip()) == (0, "limit set: queue reports: max running 4, retention 5m00s")
    limit = run_json(capsys, address, "queues", "set-limit", "reports", "6")
    assert (limit["max_running"], limit["retention"]) == ("6", "300s")
    code, out, _ = run(capsys, "--coordinator", address, "queues", "set-limit", "reports", "0")
    assert (code, out.strip()) == (0, "limit set: queue reports: no limit, retention 5m00s")


def test_limits_survive_a_coordinator_restart(
    capsys: pytest.CaptureFixture[str], address: str, coordinator: Coordinator
) -> None:
    for args in (("global", "7"), ("queue", "reports", "--max-running", "2", "--retention", "60"),
                 ("key", "tenant-a", "--max-running", "1", "--weight", "2")):  # fmt: skip
        assert run(capsys, "--coordinator", address, "limits", "set", *args)[0] == 0
    before = limits_by_target(capsys, address)
    assert len(before) == 3
    coordinator.restart()
    assert limits_by_target(capsys, address) == before


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("limits", "set", "queue", "reports", "--max-running", "-1"), "limit.max_running"),
        (("limits", "set", "global", "-2"), "limit.max_running"),
        (("queues", "set-limit", "reports", "-1"), "limit.max_running"),
        (("limits", "set", "queue", "reports", "--weight", "2"), "limit.weight"),
        (("limits", "set", "key", "tenant-a", "--retention", "60"), "limit.retention"),
        (("limits", "set", "queue", "no spaces", "--max-running", "1"), "limit.name"),
        (("limits", "set", "planet", "mars", "3"), "limit.scope"),
    ],
)
def test_invalid_limits_are_one_line_naming_the_field(
    capsys: pytest.CaptureFixture[str], address: str, args: tuple[str, ...], field: str
) -> None:
    code, out, err = run(capsys, "--coordinator", address, *args)
    assert (code, out) == (4, "") and err.startswith("herder: ") and err.count("\n") == 1, err
    assert field in err
    assert run_json(capsys, address, "limits") == []


@pytest.mark.parametrize(
    "args",
    [
        ("limits", "set", "queue"),
        ("limits", "set", "queue", "reports"),
        ("limits", "set", "global", "3", "--max-running", "4"),
        ("limits", "set", "global", "three"),
        ("limits", "set", "key", "tenant-a", "1", "2"),
        # Beyond what the field holds (weight is a uint32): the option is named before anything is sent.
        ("limits", "set", "key", "tenant-a", "--weight", "-1"),
        ("limits", "set", "key", "tenant-a", "--max-running", str(2**63)),
    ],
)
def test_limit_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], args: tuple[str, ...]) -> None:
    code, _, err = run(capsys, "--coordinator", "127.0.0.1:1", *args)
    assert code == 2 and err.startswith("herder: ") and err.count("\n") == 1, err


def test_queues_show_a_queue_after_submit(capsys: pytest.CaptureFixture[str], address: str) -> None:
    for args in (("--json", '{"text": "a"}'), ("--json", '{"text": "b"}'), ("--json", "{}", "--delay", "600")):
        assert run(capsys, "--coordinator", address, "submit", "examples.echo", "--queue", "cli-reports", *args)[0] == 0
    assert run(capsys, "--coordinator", address, "queues", "set-limit", "cli-reports", "5")[0] == 0
    code, out, err = run(capsys, "--coordinator", address, "queues")
    assert code == 0, err
    header, *rows = [line.split() for line in out.splitlines()]
    assert header == ["QUEUE", "PENDING", "QUEUED", "HELD", "NO", "ROOM", "RUNNING", "LIMIT", "OLDEST", "WAIT",
                      "P50", "WAIT", "P99", "RATE/S", "RETENTION", "SUCCEEDED", "FAILED"]  # fmt: skip
    row = next(r for r in rows if r[0] == "cli-reports")
    assert row[1:7] == ["1", "2", "0", "0", "0", "5"] and row[-2:] == ["0", "0"]
    queue = next(q for q in run_json(capsys, address, "queues") if q["name"] == "cli-reports")
    assert (queue["pending"], queue["queued"], queue["held"], queue["limit"]) == ("1", "2", "0", "5")


def test_tasks_priority(capsys: pytest.CaptureFixture[str], address: str) -> None:
    task = run_json(capsys, address, "submit", "examples.echo", "--json", "{}", "--priority", "1")
    code, out, _ = run(capsys, "--coordinator", address, "tasks", "priority", task["id"], "8")
    assert (code, out.strip()) == (0, f"task {task['id']} priority 8")
    assert run_json(capsys, address, "tasks", "get", task["id"])["spec"]["priority"] == 8
    assert run_json(capsys, address, "tasks", "priority", task["id"], "-2")["spec"]["priority"] == -2
    assert run(capsys, "--coordinator", address, "tasks", "cancel", task["id"])[0] == 0
    code, _, err = run(capsys, "--coordinator", address, "tasks", "priority", task["id"], "3")
    assert code == 4 and err.startswith("herder: ") and err.count("\n") == 1


def test_tasks_get_shows_resources_and_why_a_task_waits(
    capsys: pytest.CaptureFixture[str], address: str, worker: object
) -> None:
    assert run(capsys, "--coordinator", address, "queues", "set-limit", "narrow", "1")[0] == 0
    submit = ("submit", "examples.sleep", "--json", '{"duration": "60s"}', "--queue", "narrow", "--cpu", "500m",
              "--memory", "256Mi")  # fmt: skip
    first, second = run_json(capsys, address, *submit), run_json(capsys, address, *submit)
    assert first["spec"]["resources"] == {"cpu_millis": 500, "memory_bytes": "268435456"}
    eventually(
        lambda: run_json(capsys, address, "tasks", "get", first["id"])["state"] == "TASK_STATE_RUNNING",
        "the first task running",
    )
    code, out, _ = run(capsys, "--coordinator", address, "tasks", "get", second["id"])
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines() if " " in line.strip()}
    assert code == 0 and "QUEUED" in lines["state"] and lines["waiting"].strip(), out
    assert lines["resources"].strip() == "cpu 500m, memory 256 MiB"
    queue = next(q for q in run_json(capsys, address, "queues") if q["name"] == "narrow")
    assert (queue["held"], queue["running"], queue["limit"]) == ("1", "1", "1"), queue
    for task in (first, second):
        assert run(capsys, "--coordinator", address, "tasks", "cancel", task["id"])[0] == 0
