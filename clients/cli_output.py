"""What the `herder` command prints: tables for people, and for `--output json` the proto JSON mapping
with the .proto's field names, payloads and results decoded with their task types' descriptors.

Every JSON document any command prints comes from `Output.to_dict`, so the conventions hold
everywhere; long payloads, results and error details are cut for people (`shorten`) unless --full.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pool, duration_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from herder.clients.client import Client, State, state_name, timestamp_to_datetime
from herder.clients.descriptors import add_files
from herder.clients.proto.v1 import task_pb2

# Piped output is as wide as this: programs and people with wide windows read it.
PIPE_WIDTH = 250


def new_table(*columns: str, title: str | None = None) -> Table:
    """A borderless table whose cells wrap rather than lose characters (ids must stay whole)."""
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def new_console() -> Console:
    # Piped output is read by programs and people with wide windows: do not squeeze it into 80 columns.
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


@dataclass
class Output:
    """Prints tables or JSON; renders `Any` fields with the registered task types' descriptors."""

    format: str
    client: Client
    console: Console = field(default_factory=new_console)
    _pool: descriptor_pool.DescriptorPool | None = None

    @property
    def json(self) -> bool:
        return self.format == "json"

    async def print_json(self, message: Message, *, defaults: bool = False, created: bool | None = None) -> None:
        document = await self.to_dict(message, defaults=defaults)
        if created is not None:
            document["created"] = created  # submit: False when an idempotency key matched an existing task
        print(json.dumps(document, indent=2))

    async def print_json_list(self, messages: Iterable[Message], *, defaults: bool = False) -> None:
        print(json.dumps([await self.to_dict(m, defaults=defaults) for m in messages], indent=2))

    async def to_dict(self, message: Message, *, defaults: bool = False) -> dict[str, Any]:
        """The message in the proto JSON mapping with the .proto's field names (snake_case), as every
        `--output json` prints it. Payloads and results are JSON objects ("@type" and the message's
        fields), decoded with the descriptors registered with their task types; one of a type not
        even those know is left out. A task's `result_json` (the coordinator's rendering) becomes its
        `result` then, and is not repeated. With `defaults`, zero fields are printed too (counters
        and limits that scripts read)."""
        try:
            document = _message_to_dict(message, defaults)
        except TypeError:  # an Any whose type this process has no generated code for
            pool = await self._registered_pool()
            try:
                document = _message_to_dict(message, defaults, pool)
            except TypeError:
                stripped = type(message)()
                stripped.CopyFrom(message)
                _clear_unknown_anys(stripped, pool)
                document = _message_to_dict(stripped, defaults, pool)
        for task in (document, document.get("task")):
            if isinstance(task, dict):
                _fold_result_json(task)
        return document

    async def print_task(self, task: task_pb2.Task, *, full: bool = False, created: bool | None = None) -> None:
        """A task for people: its spec, state, times, payload, result and errors. Payload, result and
        error details longer than SHOWN_BYTES or SHOWN_LINES are cut, unless `full`."""
        if self.json:
            await self.print_json(task, created=created)
            return
        spec = task.spec
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        rows: list[tuple[str, str]] = [
            ("id", task.id),
            ("type", spec.type + (f" (version {task.type_version})" if task.type_version else "")),
            ("queue", spec.queue),
            ("state", styled_state(task.state) + (" (cancel requested)" if task.cancel_requested else "")),
            ("priority", str(spec.priority)),
            ("attempt", f"{task.attempt}" + (f" of {spec.retry.max_attempts}" if spec.retry.max_attempts else "")),
            ("worker", escape(task.worker_id)),
            ("waiting", escape(task.waiting_reason)),
            ("progress", escape(progress_text(task))),
            ("idempotency key", escape(spec.idempotency_key)),
            ("concurrency key", escape(spec.concurrency_key)),
            ("tags", escape(", ".join(spec.tags))),
            ("metadata", escape(", ".join(f"{k}={v}" for k, v in sorted(spec.metadata.items())))),
            ("resources", resources_text(spec.resources)),
            ("not before", time_text(spec.not_before)),
            ("ttl", span_of(spec.ttl) if nonzero(spec.ttl) else ""),
            ("timeout", span_of(spec.timeout) if nonzero(spec.timeout) else ""),
            ("retry", escape(retry_text(spec.retry))),
            ("created", time_text(task.create_time)),
            ("started", time_text(task.start_time)),
            ("finished", time_text(task.finish_time)),
            ("next run", time_text(task.next_run_time)),
        ]
        if spec.HasField("payload"):
            rows.append(("payload", escape(shorten(await self._any_json(spec.payload), full))))
        if task.result_json:
            rows.append(("result", escape(shorten(task.result_json, full))))
        elif task.HasField("result"):
            rows.append(("result", escape(shorten(await self._any_json(task.result), full))))
        rows.append(("error", escape(error_text(task.error))))
        rows.append(("error details", escape(shorten(task.error.details, full))))
        rows.append(("retry of", task.retry_of))
        if task.retries:
            reason = f" ({task.retry_reason})" if task.retry_reason else ""
            rows.append(("retried", escape(f"{task.retries} times{reason}")))
        rows.extend((f"attempt error {n}", escape(error_text(e))) for n, e in enumerate(task.attempt_errors, 1))
        for name, value in rows:
            if value:
                grid.add_row(name, value)
        self.console.print(grid, highlight=False)

    async def _any_json(self, value: Any) -> str:
        holder = task_pb2.TaskSpec(payload=value)
        rendered = (await self.to_dict(holder)).get("payload")
        if rendered is None:
            return f"<{value.TypeName()}, {len(value.value)} bytes>"
        rendered.pop("@type", None)
        return json.dumps(rendered)

    async def _registered_pool(self) -> descriptor_pool.DescriptorPool:
        if self._pool is None:
            self._pool = pool_of(await self.client.task_types())
        return self._pool


def pool_of(task_types: Iterable[task_pb2.TaskType]) -> descriptor_pool.DescriptorPool:
    """A pool holding every registered type's files; another registration's copy of a shared file is skipped."""
    pool = descriptor_pool.DescriptorPool()
    for task_type in task_types:
        add_files(pool, task_type.descriptors.file)
    return pool


def _message_to_dict(
    message: Message, defaults: bool, pool: descriptor_pool.DescriptorPool | None = None
) -> dict[str, Any]:
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=defaults,
        descriptor_pool=pool,
    )


def _fold_result_json(task: dict[str, Any]) -> None:
    """A task's result once, as an object: `result_json` stands in for a result this process could not decode."""
    text = task.pop("result_json", None)
    if text is None or "result" in task:
        return
    with contextlib.suppress(ValueError):
        task["result"] = json.loads(text)


def _clear_unknown_anys(message: Message, pool: descriptor_pool.DescriptorPool) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        if descriptor.message_type.GetOptions().map_entry:
            children = list(value.values()) if descriptor.message_type.fields_by_name["value"].message_type else []
        elif descriptor.is_repeated:
            children = list(value)
        else:
            children = [value]
        for child in children:
            if child.DESCRIPTOR.full_name == "google.protobuf.Any":
                try:
                    pool.FindMessageTypeByName(child.TypeName())
                except KeyError:
                    child.Clear()
            else:
                _clear_unknown_anys(child, pool)


_STATE_STYLES = {
    task_pb2.TASK_STATE_PENDING: "dim",
    task_pb2.TASK_STATE_QUEUED: "cyan",
    task_pb2.TASK_STATE_ASSIGNED: "blue",
    task_pb2.TASK_STATE_RUNNING: "yellow",
    task_pb2.TASK_STATE_SUCCEEDED: "green",
    task_pb2.TASK_STATE_FAILED: "red",
    task_pb2.TASK_STATE_CANCELED: "magenta",
    task_pb2.TASK_STATE_EXPIRED: "red",
}


def styled_state(state: State) -> str:
    style = _STATE_STYLES.get(state)
    return f"[{style}]{state_name(state)}[/]" if style else state_name(state)


def time_text(value: timestamp_pb2.Timestamp) -> str:
    moment = timestamp_to_datetime(value)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def span(seconds: float) -> str:
    """A duration as people read it: 4.2ms, 850ms, 12.5s, 4m05s, 2h03m, 3d04h."""
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def nonzero(value: duration_pb2.Duration) -> bool:
    return bool(value.seconds or value.nanos)


def span_of(value: duration_pb2.Duration) -> str:
    """A Duration as `span` writes it; "-" when unset."""
    return span(value.ToTimedelta().total_seconds()) if nonzero(value) else "-"


def resources_text(resources: task_pb2.Resources) -> str:
    parts = []
    if resources.cpu_millis:
        parts.append(f"cpu {resources.cpu_millis}m")
    if resources.memory_bytes:
        parts.append(f"memory {size_text(resources.memory_bytes)}")
    return ", ".join(parts)


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that keeps a readable number: 512 B, 1.5 KiB, 256 MiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


# How much of a payload, result or error details `tasks get` and `submit --wait` show without --full.
SHOWN_BYTES = 2048
SHOWN_LINES = 40


def shorten(text: str, full: bool = False) -> str:
    """The first SHOWN_BYTES bytes or SHOWN_LINES lines of text, saying how much was left out."""
    size = len(text.encode())
    lines = text.splitlines()
    if full or (size <= SHOWN_BYTES and len(lines) <= SHOWN_LINES):
        return text
    head = "\n".join(lines[:SHOWN_LINES]).encode()[:SHOWN_BYTES].decode(errors="ignore")
    return f"{head}\n(… {size - len(head.encode())} more bytes; --full shows all)"


def progress_text(task: task_pb2.Task) -> str:
    """Progress as people read it, "42% resizing"; the message alone when the fraction is unknown."""
    if not task.HasField("progress"):
        return ""
    progress = task.progress
    fraction = f"{progress.fraction:.0%}" if progress.fraction >= 0 else ""
    return " ".join(part for part in (fraction, progress.message) if part)


def retry_text(retry: task_pb2.RetryPolicy) -> str:
    """The retry policy as given; the coordinator's defaults apply to what is left out."""
    parts = []
    if retry.max_attempts:
        parts.append(f"at most {retry.max_attempts} attempts")
    if nonzero(retry.initial_backoff):
        parts.append(f"backoff {span_of(retry.initial_backoff)}")
    if retry.backoff_multiplier:
        parts.append(f"x{retry.backoff_multiplier:g}")
    if nonzero(retry.max_backoff):
        parts.append(f"up to {span_of(retry.max_backoff)}")
    if retry.jitter:
        parts.append(f"jitter {retry.jitter:g}")
    if retry.non_retryable_error_types:
        parts.append(f"not retried: {', '.join(retry.non_retryable_error_types)}")
    return ", ".join(parts)


def error_text(error: task_pb2.TaskError) -> str:
    text = ": ".join(part for part in (error.type, error.message) if part)
    return f"{text} (retryable)" if text and error.retryable else text


def failure_line(task: task_pb2.Task) -> str:
    detail = error_text(task.error)
    return f"task {task.id} ended {state_name(task.state)}" + (f": {detail}" if detail else "")


__all__ = [
    "PIPE_WIDTH",
    "SHOWN_BYTES",
    "SHOWN_LINES",
    "Output",
    "error_text",
    "failure_line",
    "new_console",
    "new_table",
    "nonzero",
    "pool_of",
    "progress_text",
    "resources_text",
    "retry_text",
    "shorten",
    "size_text",
    "span",
    "span_of",
    "styled_state",
    "time_text",
]
