"""Time bounds: no delay or time the coordinator computes can leave what protobuf carries.

Durations a request gives (backoffs, ttl, timeout) are validated to at most
MAX_DELAY, and a not_before to at most MAX_DELAY ahead; durations a worker
gives (retry_after) are clamped to it. Every computed time is then at most
now plus MAX_DELAY (plus a backoff's jitter), far inside Timestamp's range
(years 0001 to 9999), and `set_timestamp` clamps into that range anyway, so a
timer can never fail on an out-of-range time.

It also holds the conversions from protobuf times to seconds and back.
"""

from __future__ import annotations

import math
import time

from google.protobuf import duration_pb2, timestamp_pb2

# The longest backoff, retry_after, ttl or timeout, and the furthest not_before: 366 days (the SDK
# checks the same bound before sending).
from herder.clients.client import MAX_DELAY_SECONDS

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def clamp_delay(seconds: float) -> float:
    """seconds bounded to [0, MAX_DELAY_SECONDS] (NaN counts as 0)."""
    if not seconds > 0:
        return 0.0
    return min(seconds, float(MAX_DELAY_SECONDS))


def set_timestamp(ts: timestamp_pb2.Timestamp, seconds: float) -> None:
    """ts = seconds since the epoch, clamped into Timestamp's range."""
    if math.isnan(seconds):
        seconds = 0.0
    ns = int(min(max(seconds, MIN_TIMESTAMP_SECONDS - 1.0), MAX_TIMESTAMP_SECONDS + 1.0) * 1e9)
    ns = min(max(ns, MIN_TIMESTAMP_SECONDS * 1_000_000_000), MAX_TIMESTAMP_SECONDS * 1_000_000_000 + 999_999_999)
    ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def set_duration(duration: duration_pb2.Duration, seconds: float) -> None:
    """duration = seconds, clamped to [0, MAX_DELAY_SECONDS]."""
    ns = int(clamp_delay(seconds) * 1e9)
    duration.seconds, duration.nanos = divmod(ns, 1_000_000_000)


def stamp_now(ts: timestamp_pb2.Timestamp) -> None:
    """Set ts to now (five times cheaper than Timestamp.GetCurrentTime, which goes through datetime)."""
    ns = time.time_ns()
    ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def duration_seconds(value: duration_pb2.Duration) -> float:
    return value.seconds + value.nanos / 1e9


def timestamp_seconds(value: timestamp_pb2.Timestamp) -> float:
    return value.seconds + value.nanos / 1e9


__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_TIMESTAMP_SECONDS",
    "MIN_TIMESTAMP_SECONDS",
    "clamp_delay",
    "duration_seconds",
    "set_duration",
    "set_timestamp",
    "stamp_now",
    "timestamp_seconds",
]
