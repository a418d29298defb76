"""The `herder` command's exit codes, and the one function that maps an exception to its code.

A script can tell apart "the task failed" (1), "I typed it wrong" (2), "try again later: nothing
answered" (3), "the coordinator said no" (4) and "still running when --wait-timeout ran out" (5).
"""

from __future__ import annotations

import argparse

from herder.clients import errors
from herder.clients.proto_sources import ProtoSourceError

OK = 0
# A task waited for ended FAILED, CANCELED or EXPIRED; `herder lock` did not get or lost its lock.
TASK_FAILED = 1
# Bad command-line input, a bad setting, a file that cannot be read; nothing was sent.
USAGE = 2
# No coordinator answered, or it cannot reach etcd (UNAVAILABLE), or a call ran past --rpc-timeout.
UNREACHABLE = 3
# The coordinator refused the request: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...
REJECTED = 4
# `--wait-timeout` passed with the task still unfinished (it keeps running).
WAIT_TIMEOUT = 5
# A bug in herder itself (sysexits' EX_SOFTWARE): one line, please report it.
INTERNAL = 70
# Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line input found after parsing (exit code USAGE)."""


class WaitTimeoutError(Exception):
    """`--wait-timeout` passed before the task finished (exit code WAIT_TIMEOUT)."""


def exit_code(error: BaseException) -> int:
    """The exit code for an exception that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(error, UsageError | ProtoSourceError | argparse.ArgumentError):
        return USAGE
    if isinstance(error, WaitTimeoutError):
        return WAIT_TIMEOUT
    if isinstance(error, errors.TaskFailedError | errors.LockHeldError | errors.LockLostError):
        return TASK_FAILED
    if isinstance(error, errors.UnavailableError | errors.DeadlineExceededError | ConnectionError | TimeoutError):
        return UNREACHABLE
    if isinstance(error, errors.HerderError):
        return REJECTED
    return INTERNAL


__all__ = [
    "INTERNAL",
    "INTERRUPTED",
    "OK",
    "REJECTED",
    "TASK_FAILED",
    "UNREACHABLE",
    "USAGE",
    "WAIT_TIMEOUT",
    "UsageError",
    "WaitTimeoutError",
    "exit_code",
]
