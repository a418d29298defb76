"""Retry backoff: how long a failed attempt waits before the next one."""

from __future__ import annotations

import random
from dataclasses import dataclass

from herder.clients.proto.v1 import task_pb2


@dataclass(frozen=True, slots=True)
class RetryDefaults:
    """Used for every field a task's RetryPolicy leaves unset.

    max_attempts counts failed attempts (the first included); a task stopped by
    its worker's shutdown is re-run without using one up.
    """

    max_attempts: int = 3
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 60.0
    jitter: float = 0.1


def next_backoff(policy: task_pb2.RetryPolicy, failures: int, defaults: RetryDefaults) -> float:
    """Seconds to wait after the given number of failed attempts (1 after the first failure)."""
    initial = policy.initial_backoff.ToNanoseconds() / 1e9 if policy.HasField("initial_backoff") else None
    maximum = policy.max_backoff.ToNanoseconds() / 1e9 if policy.HasField("max_backoff") else None
    initial = defaults.initial_backoff if initial is None else initial
    maximum = defaults.max_backoff if maximum is None else maximum
    multiplier = policy.backoff_multiplier or defaults.multiplier
    # Default jitter only for tasks that left the backoff to the coordinator; an explicit policy is exact.
    jitter = policy.jitter or (defaults.jitter if not policy.HasField("initial_backoff") else 0.0)
    delay = min(initial * multiplier ** max(failures - 1, 0), maximum)
    if jitter:
        delay *= 1 + random.uniform(-jitter, jitter)
    return max(delay, 0.0)
