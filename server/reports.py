"""What a worker reports about an attempt it holds: its acknowledgement, progress and result.

A report counts only from the session that holds that very attempt; anything
else is stale and ignored (a stale result is answered with a refusing
ResultAck, so the worker stops re-sending it). A result is acknowledged to
the worker only once the outcome it led to is committed. An oversized report
is never stored: progress over its limit is dropped, a result over its limit
(or too large for the task's record) fails the task.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, message

from herder.clients.outcomes import BAD_OUTPUT, CANCELED, COORDINATOR_ERROR_TYPES, INVALID_RESULT, RESULT_TOO_LARGE
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server.committer import after_commit
from herder.server.entries import ACTIVE, Entry, S
from herder.server.horizon import clamp_delay, stamp_now
from herder.server.sessions import Session

if TYPE_CHECKING:
    from herder.server.leader import NamespaceLeader


class Reports:
    """Applies the reports a NamespaceLeader's sessions receive."""

    def __init__(self, leader: NamespaceLeader) -> None:
        self._leader = leader

    def _held_by(self, session: Session, ref: coordinator_pb2.AttemptRef) -> Entry | None:
        entry = self._leader.entries.get(ref.task_id)
        if (
            entry is None
            or entry.task.attempt != ref.attempt
            or entry.task.state not in ACTIVE
            or entry.session is not session
        ):
            return None
        return entry

    def acknowledge(self, session: Session, ref: coordinator_pb2.AttemptRef) -> None:
        entry = self._held_by(session, ref)
        if entry is None or entry.task.state != S.TASK_STATE_ASSIGNED:
            return
        self._leader.timers.acknowledged(entry)
        self._leader.attempt_started(entry)

    def progress(self, session: Session, update: coordinator_pb2.ProgressUpdate) -> None:
        entry = self._held_by(session, update.ref)
        if entry is None:
            return
        size = update.progress.ByteSize()
        limit = self._leader.input_limits.max_progress_bytes
        if size > limit:
            # Dropped, not stored: the attempt goes on, and the worker hears why.
            session.warn("progress", f"a progress update of {size} bytes was dropped: at most {limit} bytes")
            return
        entry.task.progress.CopyFrom(update.progress)
        stamp_now(entry.task.progress.update_time)
        if entry.progress_writing:
            entry.progress_dirty = True  # written with the next one: progress only needs its latest value
            return
        self._write_progress(entry)

    def _write_progress(self, entry: Entry) -> None:
        entry.progress_writing = True

        def written(f: asyncio.Future[int]) -> None:
            entry.progress_writing = False
            if entry.progress_dirty and not f.cancelled() and f.exception() is None and entry.task.state in ACTIVE:
                entry.progress_dirty = False
                self._write_progress(entry)

        self._leader.write(entry, entry.task.state).add_done_callback(written)

    def result(self, session: Session, result: coordinator_pb2.AttemptResult) -> None:
        """Apply an attempt's outcome; the worker gets its ResultAck once the outcome is committed."""
        leader = self._leader
        ref = result.ref
        entry = self._held_by(session, ref)
        if entry is None:
            session.send_result_ack(ref, False, "stale attempt: superseded, finished or not this worker's")
            return
        task = entry.task
        outcome = result.WhichOneof("outcome")
        too_large = self._oversized(entry, result, outcome)
        if too_large:
            # Not retryable: the same handler would return the same thing. Acknowledged, so the worker
            # stops re-sending it.
            future = leader.finish(
                entry, S.TASK_STATE_FAILED, error=task_pb2.TaskError(type=RESULT_TOO_LARGE, message=too_large)
            )
        elif outcome is None:
            self._invalid(entry, session, ref, "no outcome set (output, error or canceled)")
            return
        elif outcome == "error" and result.error.type in COORDINATOR_ERROR_TYPES:
            # Those types change how a failure counts; only the coordinator may set them.
            self._invalid(entry, session, ref, f"error type {result.error.type} is the coordinator's own")
            return
        elif outcome == "output":
            problem = self._bad_output(task.spec.type, result.output)
            if problem:
                error = task_pb2.TaskError(type=BAD_OUTPUT, message=problem)
                future = leader.finish(entry, S.TASK_STATE_FAILED, error=error)
            else:
                future = leader.finish(entry, S.TASK_STATE_SUCCEEDED, result=result.output)
        elif outcome == "error":
            retry_after = None
            if result.HasField("retry_after"):
                retry_after = clamp_delay(result.retry_after.seconds + result.retry_after.nanos / 1e9)
            error = task_pb2.TaskError()
            error.CopyFrom(result.error)
            future = leader.attempt_failed(entry, error, retry_after)
        elif task.cancel_requested:
            future = leader.finish(
                entry,
                S.TASK_STATE_CANCELED,
                error=task_pb2.TaskError(type=CANCELED, message=result.canceled or "canceled"),
            )
        else:
            # Stopped by the worker itself (shutdown): run it again elsewhere, not counted as a failure.
            future = leader.requeue(entry)
        after_commit(future, lambda: session.send_result_ack(ref, True))

    def _invalid(self, entry: Entry, session: Session, ref: coordinator_pb2.AttemptRef, reason: str) -> None:
        """A worker bug: the attempt fails (counted), so a broken worker cannot re-queue a task forever
        at no cost; once that is committed, the ResultAck refuses the result, saying why."""
        message = f"worker {session.worker_id} sent an invalid result: {reason}"
        error = task_pb2.TaskError(type=INVALID_RESULT, message=message, retryable=True)
        failed = self._leader.attempt_failed(entry, error)
        after_commit(failed, lambda: session.send_result_ack(ref, False, f"invalid result: {reason}"))

    def _bad_output(self, task_type: str, output: any_pb2.Any) -> str:
        """Why an output is not the task type's output message (its type or its bytes), or ""."""
        output_class = self._leader.registry.output_class(task_type)
        if output_class is None:
            return ""
        expected = output_class.DESCRIPTOR.full_name
        got = output.type_url.rpartition("/")[2]
        if got != expected:
            return f"handler returned {got or 'nothing'}, expected {expected}"
        try:
            output_class.FromString(output.value)
        except message.DecodeError as exc:
            return f"handler returned bytes that do not decode as {expected}: {exc}"
        return ""

    def _oversized(self, entry: Entry, result: coordinator_pb2.AttemptResult, outcome: str | None) -> str:
        """Why this result cannot be stored (too big for its limit or for the task's record), or ""."""
        limits = self._leader.input_limits
        if outcome == "output":
            size, limit, what = result.output.ByteSize(), limits.max_result_bytes, "output"
        elif outcome == "error":
            size, limit, what = result.error.ByteSize(), limits.max_error_bytes, "error"
        elif outcome == "canceled":
            size, limit, what = len(result.canceled.encode()), limits.max_error_bytes, "cancel reason"
        else:
            return ""
        if size > limit:
            return f"the attempt's {what} is {size} bytes, at most {limit} allowed"
        # The record holds the result beside everything else (the error once more in the history). The
        # last committed record stands for the rest (measuring the task would serialize it once more);
        # what changed since (state, times, progress) fits in the margin.
        record = len(entry.committed) + 2 * size + self._leader.input_limits.max_progress_bytes + 1024
        if record > limits.max_record_bytes:
            return f"the task with this {what} would be {record} bytes, at most {limits.max_record_bytes} allowed"
        return ""
