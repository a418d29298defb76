"""Live terminal views of tasks: `herder tasks watch` as a table updated in place, and the progress
bar of `herder submit --wait`. Both are fed by the WatchTasks stream alone, never by polling.

They are for people at a terminal: `live_console` says whether to use them (a TTY, or --live to
force one) and otherwise the commands keep their line-per-event or plain output, which scripts
read. The table holds at most `rows` tasks (the most recently changed), so memory stays bounded
however long it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from herder.clients.cli_output import PIPE_WIDTH, error_text, new_table, span, styled_state
from herder.clients.client import TaskHandle, is_terminal, timestamp_to_datetime
from herder.clients.proto.v1 import task_pb2

# The live table's default size: enough for a screen, bounded however many tasks go by.
DEFAULT_ROWS = 50
# How often ages are redrawn when no event arrives.
TICK_SECONDS = 1.0


def live_console(*, json_output: bool, force: bool, lines: bool = False) -> Console | None:
    """The console to draw a live view on, or None for the plain output: JSON, --lines, or a stdout
    that is not a terminal (unless --live forces one, as the tests do)."""
    if json_output or lines:
        return None
    if force:
        return Console(force_terminal=True, width=None if sys.stdout.isatty() else PIPE_WIDTH)
    return Console() if sys.stdout.isatty() else None


class TaskTable:
    """The latest state of up to `rows` tasks, most recently changed last; older ones drop out."""

    def __init__(self, rows: int = DEFAULT_ROWS) -> None:
        self.rows = rows
        self._tasks: OrderedDict[str, task_pb2.Task] = OrderedDict()

    def update(self, task: task_pb2.Task) -> None:
        self._tasks[task.id] = task
        self._tasks.move_to_end(task.id)
        while len(self._tasks) > self.rows:
            self._tasks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tasks)

    def render(self) -> Table:
        table = new_table("ID", "TYPE", "QUEUE", "STATE", "ATTEMPT", "PROGRESS", "MESSAGE", "AGE")
        # One line per task: on a narrow terminal the message is cut short, never the id one copies.
        for column in table.columns:
            column.no_wrap = column.header != "MESSAGE"
        now = time.time()
        for task in self._tasks.values():
            created = timestamp_to_datetime(task.create_time)
            age = span(max(now - created.timestamp(), 0.0)) if created else ""
            has_fraction = task.HasField("progress") and task.progress.fraction >= 0
            # The error says more than a stale progress message once an attempt has failed.
            message = error_text(task.error) or (task.progress.message if task.HasField("progress") else "")
            table.add_row(
                task.id,
                escape(task.spec.type),
                escape(task.spec.queue),
                styled_state(task.state),
                str(task.attempt) if task.attempt else "",
                f"{task.progress.fraction:.0%}" if has_fraction else "",
                Text(message, no_wrap=True, overflow="ellipsis"),
                age,
            )
        return table


async def watch_table(
    events: AsyncIterator[task_pb2.TaskEvent], console: Console, rows: int, until_done: set[str] | None
) -> None:
    """Draw `events` as a live table until the stream ends or, given `until_done`, until the tasks
    named there have finished (as `tasks watch ID...` does). Cancellation (Ctrl-C) leaves the last
    table drawn on the screen."""
    table = TaskTable(rows)
    with Live(table.render(), console=console, auto_refresh=False) as live:
        # Redraws happen on this loop only (no refresh thread), so the table never changes mid-draw.
        ticker = asyncio.create_task(_tick(lambda: live.update(table.render(), refresh=True)))
        try:
            async for event in events:
                table.update(event.task)
                live.update(table.render(), refresh=True)
                if until_done is not None and is_terminal(event.task.state):
                    until_done.discard(event.task.id)
                    if not until_done:
                        return
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker


async def follow_progress(handle: TaskHandle, console: Console, timeout: float | None) -> task_pb2.Task:
    """Wait for the task like `TaskHandle.wait`, drawing a progress bar fed by its progress reports
    (fraction and message). TimeoutError after `timeout` seconds; cancelling stops only the wait."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[message]}"),
    )
    with Progress(*columns, console=console, auto_refresh=False) as bar:
        # total=None (an indeterminate bar) until a report carries a fraction.
        bar_id = bar.add_task(_bar_label(handle.task), total=None, message="")
        async with asyncio.timeout(timeout):
            async with contextlib.aclosing(handle.watch()) as events:
                async for event in events:
                    task = event.task
                    bar.update(bar_id, description=_bar_label(task))
                    if task.HasField("progress"):
                        bar.update(bar_id, message=escape(task.progress.message))
                        if task.progress.fraction >= 0:
                            bar.update(bar_id, total=1.0, completed=task.progress.fraction)
                    if task.state == task_pb2.TASK_STATE_SUCCEEDED:
                        bar.update(bar_id, total=1.0, completed=1.0)
                    bar.refresh()
    return handle.task


def _bar_label(task: task_pb2.Task) -> str:
    return f"{task.id} {styled_state(task.state)}"


async def _tick(redraw: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(TICK_SECONDS)
        redraw()


__all__ = ["DEFAULT_ROWS", "TaskTable", "follow_progress", "live_console", "watch_table"]
