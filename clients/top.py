"""`herder top`: a live terminal view of the cluster: leader, queues, nodes and recent failures.

The WatchTasks stream drives the live parts: every state change moves a task between its queue's
counts, transitions into RUNNING give each queue's dispatch rate, and FAILED tasks enter the recent
failures. What no stream carries (wait p99, held tasks, node resources and alerts, the leader) comes
from one ListQueues, one ListNodes and one GetClusterStatus call every `interval` seconds (2 by
default), which also re-bases the counts, so a count the stream got wrong lasts one interval at most.
Nothing is fetched per row. Memory is bounded: RECENT_FAILURES failures, RATE_WINDOW of start times.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from herder.clients import errors
from herder.clients.cli_output import Output, new_table, size_text, span_of, time_text
from herder.clients.client import Client
from herder.clients.proto.v1 import coordinator_pb2, task_pb2

# Seconds between the calls for the figures only tables hold.
DEFAULT_INTERVAL = 2.0
# Failures shown, newest first.
RECENT_FAILURES = 10
# The stream's dispatch rate counts starts over this many seconds; until `top` has watched that long,
# the coordinator's figure is shown.
RATE_WINDOW = 10.0
# Section titles, in order; the README's capture is checked against them.
SECTIONS = ("Leader", "Queues", "Nodes", "Recent failures")

_COUNTED = {
    task_pb2.TASK_STATE_PENDING: "pending",
    task_pb2.TASK_STATE_QUEUED: "queued",
    task_pb2.TASK_STATE_ASSIGNED: "assigned",
    task_pb2.TASK_STATE_RUNNING: "running",
    task_pb2.TASK_STATE_SUCCEEDED: "succeeded",
    task_pb2.TASK_STATE_FAILED: "failed",
}


@dataclass
class TopView:
    """What `herder top` shows: the last table figures, moved on by the task events since."""

    status: coordinator_pb2.GetClusterStatusResponse = field(default_factory=coordinator_pb2.GetClusterStatusResponse)
    queues: dict[str, coordinator_pb2.QueueStats] = field(default_factory=dict)
    nodes: list[coordinator_pb2.Node] = field(default_factory=list)
    failures: deque[task_pb2.Task] = field(default_factory=lambda: deque(maxlen=RECENT_FAILURES))
    started: float = field(default_factory=time.monotonic)
    _starts: dict[str, deque[float]] = field(default_factory=dict)

    def refresh(
        self,
        status: coordinator_pb2.GetClusterStatusResponse,
        queues: list[coordinator_pb2.QueueStats],
        nodes: list[coordinator_pb2.Node],
    ) -> None:
        self.status, self.nodes = status, nodes
        self.queues = {queue.name: queue for queue in queues}

    def seed_failures(self, tasks: list[task_pb2.Task]) -> None:
        """The failures from before `top` started, newest first."""
        self.failures.extend(tasks[: RECENT_FAILURES - len(self.failures)])

    def apply(self, event: task_pb2.TaskEvent) -> None:
        task = event.task
        if event.initial or event.previous_state == task.state:
            return  # a snapshot or a progress report: no count moves
        queue = self.queues.setdefault(task.spec.queue, coordinator_pb2.QueueStats(name=task.spec.queue))
        before, after = _COUNTED.get(event.previous_state), _COUNTED.get(task.state)
        if before:
            setattr(queue, before, max(getattr(queue, before) - 1, 0))
        if after:
            setattr(queue, after, getattr(queue, after) + 1)
        if task.state == task_pb2.TASK_STATE_RUNNING:
            self._starts.setdefault(task.spec.queue, deque()).append(time.monotonic())
        if task.state == task_pb2.TASK_STATE_FAILED:
            self.failures.appendleft(task)

    def rate(self, queue: coordinator_pb2.QueueStats) -> float:
        """Starts per second: the stream's, over RATE_WINDOW, once watched that long."""
        now = time.monotonic()
        if now - self.started < RATE_WINDOW:
            return queue.dispatch_rate
        starts = self._starts.get(queue.name, deque())
        while starts and starts[0] < now - RATE_WINDOW:
            starts.popleft()
        return len(starts) / RATE_WINDOW

    def render(self) -> RenderableType:
        return Group(self._leader(), "", self._queues(), "", self._nodes(), "", self._failures())

    def _leader(self) -> Table:
        status = self.status
        grid = Table(box=None, show_header=False, title="Leader", title_justify="left", padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        leader = (
            f"{escape(status.leader_id)} at {escape(status.leader_address)}" if status.leader_id else "[red]none[/]"
        )
        grid.add_row("leader", leader)
        grid.add_row("replicas", f"{len(status.replicas)}: " + ", ".join(escape(r.address) for r in status.replicas))
        etcd = f"{escape(', '.join(status.etcd_endpoints))} v{escape(status.etcd_version)} rev {status.etcd_revision}"
        grid.add_row("etcd", etcd)
        grid.add_row("namespace", escape(status.namespace))
        return grid

    def _queues(self) -> Table:
        table = new_table("QUEUE", "BACKLOG", "RUNNING", "HELD", "WAIT P99", "RATE/S", title="Queues")
        for name in sorted(self.queues):
            queue = self.queues[name]
            table.add_row(
                escape(name) + (" (paused)" if queue.paused else ""),
                str(queue.queued),
                str(queue.assigned + queue.running),
                str(queue.held),
                span_of(queue.wait_p99),
                f"{self.rate(queue):.1f}",
            )
        return table

    def _nodes(self) -> Table:
        table = new_table("WORKER", "SLOTS", "CPU", "MEMORY", "ALERTS", title="Nodes")
        for node in self.nodes:
            sample = node.resources
            has_sample = node.HasField("resources")
            table.add_row(
                escape(node.worker_id),
                f"{node.running}/{node.slots}",
                f"{sample.cpu_percent:.0f}% of {sample.cpu_count}" if has_sample else "",
                f"{size_text(sample.memory_used_bytes)} / {size_text(sample.memory_total_bytes)}" if has_sample else "",
                ", ".join(f"[red]{escape(alert.name)}[/]" for alert in node.alerts),
            )
        return table

    def _failures(self) -> Table:
        table = new_table("TASK", "TYPE", "ERROR", "MESSAGE", "WHEN", title="Recent failures")
        for task in self.failures:
            table.add_row(
                task.id,
                escape(task.spec.type),
                escape(task.error.type),
                escape(task.error.message),
                time_text(task.finish_time),
            )
        return table


async def refresh(client: Client, view: TopView) -> None:
    """One call each for the figures only tables hold."""
    status, queues, nodes = await asyncio.gather(client.cluster_status(), client.queues(), client.nodes())
    view.refresh(status, queues, nodes)


async def start_top(client: Client) -> TopView:
    """A view with the tables' figures and the failures from before now (one ListTasks call)."""
    view = TopView()
    failed, _ = await client.list(states=[task_pb2.TASK_STATE_FAILED], page_size=RECENT_FAILURES, newest_first=True)
    view.seed_failures(failed)
    await refresh(client, view)
    return view


async def print_snapshot(view: TopView, out: Output) -> None:
    """One snapshot: the sections as a live `top` draws them, or one JSON document."""
    if not out.json:
        out.console.print(view.render(), highlight=False)
        return
    document = {
        "cluster": await out.to_dict(view.status),
        "queues": [await out.to_dict(view.queues[name], defaults=True) for name in sorted(view.queues)],
        "nodes": [await out.to_dict(node) for node in view.nodes],
        "recent_failures": [await out.to_dict(task) for task in view.failures],
    }
    print(json.dumps(document, indent=2))


async def run_top(client: Client, view: TopView, console: Console, interval: float) -> None:
    """Draw the view until cancelled (Ctrl-C): redrawn on every task event and every refresh. A broken
    task stream is re-opened; a refresh call that fails (after the client's own retries) ends it with
    that error, the last frame left on the screen."""
    with Live(view.render(), console=console, auto_refresh=False) as live:

        def redraw() -> None:
            live.update(view.render(), refresh=True)

        # Both run on this loop, so the view never changes while it is drawn.
        async with asyncio.TaskGroup() as group:
            group.create_task(_follow(client, view, redraw))
            group.create_task(_refresh_every(client, view, interval, redraw))


async def _refresh_every(client: Client, view: TopView, interval: float, redraw: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        await refresh(client, view)
        redraw()


async def _follow(client: Client, view: TopView, redraw: Callable[[], None]) -> None:
    """Apply every task event; a broken stream is re-opened after the last revision seen (any replica)."""
    last_revision = 0
    while True:
        try:
            events = client.watch(skip_initial=True, after_revision=last_revision)
            async with contextlib.aclosing(events):
                async for event in events:
                    last_revision = max(last_revision, event.revision)
                    view.apply(event)
                    redraw()
        # Transient, as for TaskHandle.watch: a leader change, a shutdown, a watcher dropped for lagging.
        except (errors.UnavailableError, errors.CancelledError, errors.ResourceExhaustedError):
            await asyncio.sleep(1.0)


__all__ = ["DEFAULT_INTERVAL", "RECENT_FAILURES", "SECTIONS", "TopView", "print_snapshot", "run_top", "start_top"]
