"""Herder's errors and their gRPC status codes, mapped in exactly one place.

The coordinator raises these and `to_status` turns them into a gRPC status
(with `google.rpc.BadRequest` details for invalid input); the SDK turns a
failed call back into the same class with `from_rpc_error`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

# Trailing metadata a follower sends with UNAVAILABLE: where the leader listens.
LEADER_METADATA_KEY = "herder-leader"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Request metadata naming the caller ("worker host pid 12"), recorded with the task type versions it registers.
CLIENT_METADATA_KEY = "x-herder-client"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: its path in the request (`spec.payload_json.text`) and why."""

    field: str
    description: str


class HerderError(Exception):
    """Base of every error the Herder SDK raises."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    def __str__(self) -> str:
        if not self.violations:
            return self.message
        fields = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        return f"{self.message} ({fields})"


class InvalidArgumentError(HerderError):
    """The request is malformed; `violations` names every bad field. Nothing was written."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(HerderError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(HerderError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(HerderError):
    """The request is valid but the target's state forbids it (cancelling a finished task)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StaleAttemptError(FailedPreconditionError):
    """A message about an attempt that has been superseded; it changed nothing."""


class ResourceExhaustedError(HerderError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OverloadedError(ResourceExhaustedError):
    """The coordinator is too busy to take new work now; nothing was written. Retry after `retry_after`
    seconds (sent as a `google.rpc.RetryInfo` detail); the SDK does so until the call's timeout."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(HerderError):
    """The coordinator or etcd cannot be reached; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class NotLeaderError(UnavailableError):
    """This coordinator is not the leader; `leader_address` says who is, when known."""

    def __init__(self, message: str, *, leader_address: str = "") -> None:
        super().__init__(message)
        self.leader_address = leader_address


class DeadlineExceededError(HerderError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(HerderError):
    code = grpc.StatusCode.CANCELLED


class UnimplementedError(HerderError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(HerderError):
    code = grpc.StatusCode.INTERNAL


class TaskFailedError(HerderError):
    """A task ended FAILED, CANCELED or EXPIRED while the caller waited for its result."""

    code = grpc.StatusCode.ABORTED

    def __init__(
        self,
        message: str,
        *,
        task_id: str,
        state: str,
        error_type: str = "",
        error_message: str = "",
        details: str = "",
        attempt_errors: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.state = state
        # The handler's error as stored (TaskError): its type, message and details (a Python
        # handler's traceback), and every attempt's error, oldest first.
        self.error_type = error_type
        self.error_message = error_message
        self.details = details
        self.attempt_errors = attempt_errors


class LockHeldError(HerderError):
    """Another holder kept the lock until the wait ran out (or at once, for a try with no wait).

    ABORTED, as gRPC advises for a concurrency conflict that the caller may retry at a higher level.
    Nothing is left behind: the waiter's key and lease are gone.
    """

    code = grpc.StatusCode.ABORTED


class LockLostError(HerderError):
    """A held lock ended before its holder released it: its lease expired or was revoked, or no refresh
    succeeded in time. Raised by the SDK only (never sent by the coordinator); whatever the lock
    guarded may already be done by another holder."""

    code = grpc.StatusCode.ABORTED


# The one table: gRPC status code <-> error class. ABORTED on the wire is a lock held by another;
# TaskFailedError and LockLostError share its code but are raised by the SDK only.
_BY_CODE: dict[grpc.StatusCode, type[HerderError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnimplementedError,
        InternalError,
        LockHeldError,
    )
}


def bad_request(message: str, violations: Iterable[tuple[str, str]]) -> InvalidArgumentError:
    """An InvalidArgumentError from (field, description) pairs."""
    return InvalidArgumentError(message, violations=[FieldViolation(f, d) for f, d in violations])


# A status travels in trailing metadata, which clients accept up to 16 KiB by default (base64 adds a
# third): past these bounds a client would see RESOURCE_EXHAUSTED instead of the violations.
MAX_VIOLATIONS = 16
_MAX_FIELD = 160
_MAX_DESCRIPTION = 240
_MAX_MESSAGE = 1024


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_status_proto(error: HerderError) -> status_pb2.Status:
    """The `google.rpc.Status` for an error, with BadRequest details when fields are named.

    At most MAX_VIOLATIONS are listed, each cut short, and the last says how many more there were,
    so the status always fits the trailing metadata a client accepts.
    """
    status = status_pb2.Status(code=error.code.value[0], message=_cut(error.message, _MAX_MESSAGE))
    if error.violations:
        shown = list(error.violations[:MAX_VIOLATIONS])
        if len(error.violations) > MAX_VIOLATIONS:
            more = len(error.violations) - MAX_VIOLATIONS + 1
            shown[-1] = FieldViolation(shown[-1].field, f"... and {more} more violations like the ones above")
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_cut(v.field, _MAX_FIELD), description=_cut(v.description, _MAX_DESCRIPTION)
                    )
                    for v in shown
                ]
            )
        )
        status.details.append(detail)
    if isinstance(error, OverloadedError):
        retry = any_pb2.Any()
        delay = error_details_pb2.RetryInfo()
        delay.retry_delay.FromMilliseconds(max(round(error.retry_after * 1000), 1))
        retry.Pack(delay)
        status.details.append(retry)
    return status


def to_status(error: HerderError) -> grpc.Status:
    """The gRPC status a server aborts with for this error."""
    status: grpc.Status = rpc_status.to_status(to_status_proto(error))
    if isinstance(error, NotLeaderError) and error.leader_address:
        metadata = (*status.trailing_metadata, (LEADER_METADATA_KEY, error.leader_address))
        return _Status(status.code, status.details, metadata)
    return status


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str | bytes], ...]):
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def violations_of(status: status_pb2.Status) -> list[FieldViolation]:
    """Field violations carried in a status's BadRequest details."""
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            found.extend(FieldViolation(v.field, v.description) for v in request.field_violations)
    return found


def retry_delay_of(status: status_pb2.Status) -> float | None:
    """Seconds a status's RetryInfo detail asks the caller to wait, or None without one."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToMilliseconds()) / 1000
    return None


def from_status_proto(status: status_pb2.Status) -> HerderError:
    """The error for a `google.rpc.Status` (as SubmitTasks reports a rejected item)."""
    code = _code_of(status.code)
    cls = _BY_CODE.get(code, HerderError)
    return cls(status.message, violations=violations_of(status))


def from_rpc_error(error: grpc.RpcError) -> HerderError:
    """The Herder error for a failed gRPC call (sync or asyncio)."""
    code_fn = getattr(error, "code", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(error, "details", None)
    details: str = (details_fn() if callable(details_fn) else None) or str(error)
    trailing_fn = getattr(error, "trailing_metadata", None)
    trailing = list(trailing_fn() or ()) if callable(trailing_fn) else []
    violations: list[FieldViolation] = []
    for key, value in trailing:
        if key == LEADER_METADATA_KEY and code is grpc.StatusCode.UNAVAILABLE:
            leader = value if isinstance(value, str) else value.decode()
            return NotLeaderError(details, leader_address=leader)
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            violations = violations_of(status)
            delay = retry_delay_of(status)
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
                return OverloadedError(details, retry_after=delay)
    cls = _BY_CODE.get(code, HerderError)
    if cls is HerderError:
        err = HerderError(f"{code.name}: {details}", violations=violations)
        err.code = code
        return err
    return cls(details, violations=violations)


def _code_of(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


__all__ = [
    "CLIENT_METADATA_KEY",
    "LEADER_METADATA_KEY",
    "AlreadyExistsError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "HerderError",
    "InternalError",
    "InvalidArgumentError",
    "LockHeldError",
    "LockLostError",
    "NotFoundError",
    "NotLeaderError",
    "OverloadedError",
    "ResourceExhaustedError",
    "StaleAttemptError",
    "TaskFailedError",
    "UnavailableError",
    "UnimplementedError",
    "bad_request",
    "from_rpc_error",
    "from_status_proto",
    "retry_delay_of",
    "to_status",
    "to_status_proto",
]
