"""Herder clients: the generated contracts, the async Client, the Worker and the herder CLI.

    from herder.clients import Client, Worker

Generated messages and stubs live in `herder.clients.proto` (`herder.clients.proto.v1.task_pb2`, ...).
"""

from herder.clients.backoff import Backoff
from herder.clients.client import (
    DEFAULT_ADDRESS,
    TERMINAL_STATES,
    Client,
    Retry,
    SyncClient,
    SyncTaskHandle,
    TaskHandle,
    WatchReconnect,
    is_terminal,
    parse_scope,
    parse_state,
    scope_name,
    state_name,
    task_spec,
    unpack,
)
from herder.clients.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    HerderError,
    InternalError,
    InvalidArgumentError,
    LockHeldError,
    LockLostError,
    NotFoundError,
    NotLeaderError,
    ResourceExhaustedError,
    StaleAttemptError,
    TaskFailedError,
    UnavailableError,
    UnimplementedError,
)
from herder.clients.locks import Lock
from herder.clients.worker import NonRetryableError, RetryAfter, TaskContext, Worker, WorkerSettings, run_worker

__all__ = [
    "DEFAULT_ADDRESS",
    "TERMINAL_STATES",
    "AlreadyExistsError",
    "Backoff",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "HerderError",
    "InternalError",
    "InvalidArgumentError",
    "Lock",
    "LockHeldError",
    "LockLostError",
    "NonRetryableError",
    "NotFoundError",
    "NotLeaderError",
    "ResourceExhaustedError",
    "Retry",
    "RetryAfter",
    "StaleAttemptError",
    "SyncClient",
    "SyncTaskHandle",
    "TaskContext",
    "TaskFailedError",
    "TaskHandle",
    "UnavailableError",
    "UnimplementedError",
    "WatchReconnect",
    "Worker",
    "WorkerSettings",
    "is_terminal",
    "parse_scope",
    "parse_state",
    "run_worker",
    "scope_name",
    "state_name",
    "task_spec",
    "unpack",
]
