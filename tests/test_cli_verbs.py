"""`herder tasks retry|cancel`, `herder queues pause|resume`, `herder tasks list` order and paging, and
`herder tasks get` showing a failure's details: the real `herder` binary against a real coordinator."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from _cli import HERDER
from _cluster import Coordinator
from _raw_worker import RawWorker

from herder.clients.client import Retry, SyncClient
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(90)

S = task_pb2


def herder(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`herder --coordinator ADDRESS ARGS` as a process; its exit code, stdout and stderr."""
    return subprocess.run(
        [HERDER, "--coordinator", address, *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def client(coordinator: Coordinator) -> SyncClient:
    with SyncClient(coordinator.address) as value:
        value.register_task_type("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
        yield value


def submit(client: SyncClient, queue: str, **options: object) -> str:
    return client.submit("examples.echo", examples_pb2.EchoRequest(text="x"), queue=queue, **options).id  # type: ignore[arg-type]


def test_tasks_retry_requeues_a_canceled_task_and_refuses_a_queued_one(coordinator, client) -> None:
    task_id = submit(client, "idle", retry=Retry(max_attempts=1))
    refused = herder(coordinator.address, "tasks", "retry", task_id)
    assert refused.returncode == 4 and "QUEUED" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    client.cancel(task_id, "oops")
    done = herder(coordinator.address, "tasks", "retry", task_id, "--reason", "it was fine")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"task {task_id} retried: attempt 1 QUEUED"
    shown = herder(coordinator.address, "tasks", "get", task_id)
    assert "retried" in shown.stdout and "it was fine" in shown.stdout and "herder.canceled: oops" in shown.stdout
    copied = herder(coordinator.address, "--output", "json", "tasks", "cancel", task_id)
    assert copied.returncode == 0, copied.stderr
    copy = json.loads(herder(coordinator.address, "--output", "json", "tasks", "retry", task_id, "--copy").stdout)
    assert copy["retry_of"] == task_id and copy["id"] != task_id


async def test_tasks_get_shows_a_failures_type_message_and_details(coordinator, client) -> None:
    task_id = submit(client, "work", retry=Retry(max_attempts=1))
    # A failure as a handler in any language reports it: type, message and details (a traceback).
    trace = 'Traceback (most recent call last):\n  File "billing.py", line 7, in charge\nValueError: card declined'
    async with RawWorker(coordinator.address, "w", ["examples.echo"], slots=1) as worker:
        task = await worker.next_assignment()
        await worker.ack(task)
        error = task_pb2.TaskError(type="ValueError", message="card declined", details=trace)
        assert (await worker.fail(task.id, task.attempt, error)).accepted
    shown = await asyncio.to_thread(herder, coordinator.address, "tasks", "get", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "ValueError: card declined" in shown.stdout
    assert 'File "billing.py", line 7, in charge' in shown.stdout and "attempt error 1" in shown.stdout


def test_queues_pause_and_resume_show_in_the_queue_list(coordinator, client) -> None:
    paused = herder(coordinator.address, "queues", "pause", "reports")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "queue reports paused: it accepts tasks and starts none"
    submit(client, "reports")
    listing = herder(coordinator.address, "queues")
    assert "reports (paused)" in listing.stdout
    stats = json.loads(herder(coordinator.address, "--output", "json", "queues").stdout)
    assert [(q["name"], q["paused"], q["limit"]) for q in stats] == [("reports", True, "0")]
    assert herder(coordinator.address, "queues", "resume", "reports").returncode == 0
    stats = json.loads(herder(coordinator.address, "--output", "json", "queues").stdout)
    assert [q["paused"] for q in stats] == [False]
    bad = herder(coordinator.address, "queues", "pause", "no such queue")
    assert bad.returncode == 4 and "queue" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bulk_cancel_and_retry_by_filter_print_counts(coordinator, client) -> None:
    ids = [submit(client, "bulk") for _ in range(3)]
    dry = herder(coordinator.address, "tasks", "cancel", "--queue", "bulk", "--dry-run")
    assert dry.stdout.strip() == "3 tasks match (dry run: none canceled)", dry.stderr
    assert {client.get(i).state for i in ids} == {S.TASK_STATE_QUEUED}
    done = herder(coordinator.address, "tasks", "cancel", "--queue", "bulk", "--created-after", "1h", "--limit", "2")
    assert done.stdout.splitlines() == ["2 tasks matched, 2 canceled", "more tasks match: run the command again for"
                                        " the next ones"], done.stderr  # fmt: skip
    assert herder(coordinator.address, "tasks", "cancel", "--queue", "bulk").stdout.strip() == (
        "1 tasks matched, 1 canceled"
    )
    retried = herder(coordinator.address, "--output", "json", "tasks", "retry", "--queue", "bulk")
    assert json.loads(retried.stdout) == {"matched": "3", "changed": "3", "more": False}
    assert {client.get(i).state for i in ids} == {S.TASK_STATE_QUEUED}
    nothing = herder(coordinator.address, "tasks", "cancel")
    assert nothing.returncode == 2 and "name a task ID" in nothing.stderr
    wrong = herder(coordinator.address, "tasks", "retry", "--state", "queued")
    assert wrong.returncode == 4 and "filter.states[0]" in wrong.stderr and "Traceback" not in wrong.stderr


def test_tasks_list_is_newest_first_and_says_how_to_page(coordinator, client) -> None:
    ids = [submit(client, "listed") for _ in range(3)]
    first = herder(coordinator.address, "tasks", "list", "--queue", "listed", "--limit", "2")
    assert first.returncode == 0, first.stderr
    rows = [line.split()[0] for line in first.stdout.splitlines()[1:]]
    assert rows == ids[::-1][:2]
    hint = first.stderr.strip()
    assert hint.startswith("more tasks match: the next page is --page-token "), hint
    token = hint.split("--page-token ")[1].split()[0]
    rest = herder(coordinator.address, "tasks", "list", "--queue", "listed", "--limit", "2", "--page-token", token)
    assert [line.split()[0] for line in rest.stdout.splitlines()[1:]] == [ids[0]] and not rest.stderr
    oldest = herder(coordinator.address, "--output", "json", "tasks", "list", "--queue", "listed", "--oldest-first")
    assert [t["id"] for t in json.loads(oldest.stdout)] == ids
    future = herder(coordinator.address, "tasks", "list", "--created-after", "2999-01-01T00:00Z")
    assert "no tasks" in future.stdout
    bad = herder(coordinator.address, "tasks", "list", "--created-after", "yesterday")
    assert bad.returncode == 2 and "not a time: 'yesterday'" in bad.stderr and "Traceback" not in bad.stderr
