"""Request validation in one place: every bad field of a request, reported at once.

Each `validate_*` function returns the list of violations (empty when the
input is fine) with paths as the caller names them (`spec.tags[2]`,
`specs[3].payload`), so a batch can say which item and which field is wrong.
`raise_if` turns a non-empty list into one InvalidArgumentError.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import duration_pb2, timestamp_pb2

from herder.clients import errors, outcomes
from herder.clients.errors import FieldViolation
from herder.clients.proto.v1 import coordinator_pb2, lock_pb2, task_pb2
from herder.server import contracts
from herder.server.committer import ETCD_MAX_REQUEST_BYTES, TXN_OVERHEAD_BYTES
from herder.server.horizon import MAX_DELAY_SECONDS
from herder.server.placement import MAX_CAPACITY_CPU_MILLIS, MAX_CAPACITY_MEMORY_BYTES

# Type and queue names: safe in etcd keys, metric labels and command lines.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
# Lock names: NAME_PATTERN without "/", so no lock's key prefix covers another lock's keys.
LOCK_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# Lease ids as LockService hands them out: etcd's 64-bit lease id in hex.
_LEASE_ID = re.compile(r"[0-9a-f]{1,16}")
# A protobuf full message name, such as "images.v1.ResizeRequest".
_FULL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# Ids: printable ASCII without spaces.
_ID = re.compile(r"[!-~]+")

# The ranges google.protobuf.Timestamp and Duration define (0001-01-01 .. 9999-12-31, about 10,000 years).
_MIN_TIMESTAMP_SECONDS = -62_135_596_800
_MAX_TIMESTAMP_SECONDS = 253_402_300_799
_MAX_DURATION_SECONDS = 315_576_000_000
_MAX_NANOS = 999_999_999
# The most slots a worker may declare, so also the most attempts it holds, re-claims or reports at once.
MAX_SLOTS = 10_000
# Long keys are cut short when they appear inside a field path.
_MAX_KEY_IN_PATH = 64
# What a task record holds besides payload, result, errors and progress: the rest of its spec
# (tags, metadata, keys), the attempt history (each earlier error's message cut short), times.
RECORD_OVERHEAD_BYTES = 256 * 1024
# etcd's default request limit minus what a transaction adds around one record.
MAX_RECORD_BYTES = ETCD_MAX_REQUEST_BYTES - TXN_OVERHEAD_BYTES


@dataclass(frozen=True)
class Limits:
    """Bounds on what a request may carry. Lengths count characters; sizes count bytes."""

    # Size of the payload: the Any's value bytes, or payload_json's UTF-8 bytes.
    max_payload_bytes: int = 256 * 1024
    # Type, queue and concurrency key names.
    max_name_length: int = 128
    max_idempotency_key_length: int = 256
    max_tags: int = 32
    max_tag_length: int = 128
    max_metadata: int = 32
    max_metadata_key_length: int = 128
    max_metadata_value_length: int = 1024
    # Specs in one SubmitTasks request.
    max_batch: int = 1000
    # RetryPolicy.max_attempts.
    max_attempts_limit: int = 100
    # Largest |priority|.
    max_abs_priority: int = 1_000_000
    max_page_size: int = 1000
    # Page size used when a request leaves it 0.
    default_page_size: int = 100
    # Task ids, worker ids and other opaque identifiers.
    max_id_length: int = 128
    # Resources.cpu_millis: a thousand cores.
    max_cpu_millis: int = 1_000_000
    # Resources.memory_bytes: 1 TiB.
    max_memory_bytes: int = 1 << 40
    # TaskType.description.
    max_description_length: int = 4096
    # TaskType.descriptors, serialized; it is stored in one etcd value (1.5 MiB at most by default).
    max_descriptors_bytes: int = 1024 * 1024
    # Longest backoff, ttl and timeout; furthest not_before ahead of now (herder.server.horizon).
    max_delay_seconds: int = MAX_DELAY_SECONDS
    # Any one record stored in etcd (a task with its result and errors, a task type, a limit):
    # below etcd's request limit (1.5 MiB by default) with room for the transaction around it.
    max_record_bytes: int = 1280 * 1024
    # What a worker reports, serialized: an attempt's output, its error, one progress update.
    max_result_bytes: int = outcomes.DEFAULT_MAX_RESULT_BYTES
    max_error_bytes: int = outcomes.DEFAULT_MAX_ERROR_BYTES
    max_progress_bytes: int = outcomes.DEFAULT_MAX_PROGRESS_BYTES
    # Characters of each earlier attempt's error message kept in the task's attempt history.
    max_history_message_length: int = 1024
    # Fields and sizes of a worker's hello.
    max_hello_task_types: int = 256
    max_labels: int = 64
    # Filters of a listing or a watch: ids (WatchTasks), states and tags.
    max_filter_ids: int = 1000
    # Locks: a holder's owner text, its lease TTL in whole seconds, how long an Acquire may wait,
    # and Acquires waiting at once on one replica (each holds an etcd watch and a keep-alive).
    max_lock_owner_length: int = 256
    min_lock_ttl_seconds: int = 1
    max_lock_ttl_seconds: int = 3600
    max_lock_wait_seconds: int = 3600
    max_lock_waiters: int = 10_000

    def problems(self) -> list[str]:
        """Why these limits cannot hold together (empty when they can)."""
        found = []
        worst_task = (
            self.max_payload_bytes + self.max_result_bytes + 2 * self.max_error_bytes + self.max_progress_bytes
        ) + RECORD_OVERHEAD_BYTES
        if self.max_record_bytes < worst_task:
            found.append(
                f"max_record_bytes ({self.max_record_bytes}) must be at least payload + result + 2 errors + progress"
                f" + {RECORD_OVERHEAD_BYTES} bytes for the rest of a task ({worst_task})"
            )
        sizes = (self.max_result_bytes, self.max_error_bytes, self.max_progress_bytes)
        if min(sizes) < 1024:
            found.append("max_result_bytes, max_error_bytes and max_progress_bytes must be at least 1024")
        if self.max_record_bytes > MAX_RECORD_BYTES:
            found.append(
                f"max_record_bytes ({self.max_record_bytes}) must be at most {MAX_RECORD_BYTES} (etcd's limit)"
            )
        if self.max_descriptors_bytes > self.max_record_bytes - RECORD_OVERHEAD_BYTES:
            found.append("max_descriptors_bytes must leave room in max_record_bytes")
        return found


def raise_if(violations: Sequence[FieldViolation], message: str) -> None:
    """Raises InvalidArgumentError(message) carrying `violations` when there are any."""
    if violations:
        raise errors.bad_request(message, [(v.field, v.description) for v in violations])


def validate_name(value: str, field: str, limits: Limits, *, required: bool = True) -> list[FieldViolation]:
    """A type or queue name: matches NAME_PATTERN and fits max_name_length; empty only when not required."""
    if not value:
        return [FieldViolation(field, "is required")] if required else []
    found: list[FieldViolation] = []
    if len(value) > limits.max_name_length:
        found.append(_too_long(field, value, limits.max_name_length))
    if not NAME_PATTERN.fullmatch(value):
        found.append(
            FieldViolation(
                field,
                "must start with a letter or digit and contain only letters, digits and . _ : / -",
            )
        )
    return found


def validate_acquire(request: lock_pb2.AcquireRequest, limits: Limits) -> list[FieldViolation]:
    """An Acquire: a lock name, an owner of printable characters, a TTL and a wait within the limits."""
    found = validate_lock_name(request.name, "name", limits)
    if len(request.owner) > limits.max_lock_owner_length:
        found.append(_too_long("owner", request.owner, limits.max_lock_owner_length))
    elif not request.owner.isprintable():
        found.append(FieldViolation("owner", "must be printable characters"))
    low, high = limits.min_lock_ttl_seconds, limits.max_lock_ttl_seconds
    ttl = _duration(request.ttl, "ttl")
    if not ttl and not low * 1_000_000_000 <= _total_nanos(request.ttl) <= high * 1_000_000_000:
        ttl.append(FieldViolation("ttl", f"must be between {low}s and {high}s"))
    wait = _duration(request.wait_timeout, "wait_timeout")
    if not wait and _total_nanos(request.wait_timeout) > limits.max_lock_wait_seconds * 1_000_000_000:
        wait.append(FieldViolation("wait_timeout", f"must be at most {limits.max_lock_wait_seconds}s"))
    return found + ttl + wait


def validate_lock_ref(name: str, lease_id: str, limits: Limits) -> list[FieldViolation]:
    """A Refresh or Release: the lock's name and the lease id its Acquire returned."""
    found = validate_lock_name(name, "name", limits)
    if not lease_id:
        found.append(FieldViolation("lease_id", "is required"))
    elif not _LEASE_ID.fullmatch(lease_id):
        found.append(FieldViolation("lease_id", "must be 1 to 16 lowercase hex digits, as Acquire returns it"))
    return found


def validate_lock_name(value: str, field: str, limits: Limits) -> list[FieldViolation]:
    """A lock name: like a queue name (validate_name) but without "/"."""
    found = validate_name(value, field, limits)
    if not found and not LOCK_NAME_PATTERN.fullmatch(value):
        found.append(FieldViolation(field, 'must not contain "/"'))
    return found


def validate_id(value: str, field: str, limits: Limits) -> list[FieldViolation]:
    """An opaque id (task, worker, session): non-empty printable ASCII without spaces, at most max_id_length."""
    if not value:
        return [FieldViolation(field, "is required")]
    if len(value) > limits.max_id_length:
        return [_too_long(field, value, limits.max_id_length)]
    if not _ID.fullmatch(value):
        return [FieldViolation(field, "must be printable ASCII without spaces")]
    return []


def validate_page_size(value: int, field: str, limits: Limits) -> list[FieldViolation]:
    """0 (the default, `limits.default_page_size`) up to max_page_size."""
    if value < 0 or value > limits.max_page_size:
        return [FieldViolation(field, f"must be between 0 and {limits.max_page_size}, got {value}")]
    return []


def validate_batch_size(count: int, field: str, limits: Limits) -> list[FieldViolation]:
    """At least one item and at most max_batch."""
    if count == 0:
        return [FieldViolation(field, "must not be empty")]
    if count > limits.max_batch:
        return [FieldViolation(field, f"has {count} items, at most {limits.max_batch} allowed")]
    return []


def validate_spec(spec: task_pb2.TaskSpec, limits: Limits, prefix: str = "spec") -> list[FieldViolation]:
    """Every violation in `spec`, with paths under `prefix`.

    Checks the shape of each field only; whether the payload matches the
    registered type is `contracts.resolve_payload`'s job.
    """
    found = validate_name(spec.type, f"{prefix}.type", limits)
    found += validate_name(spec.queue, f"{prefix}.queue", limits, required=False)
    found += _payload(spec, limits, prefix)
    if abs(spec.priority) > limits.max_abs_priority:
        found.append(
            FieldViolation(
                f"{prefix}.priority",
                f"must be between -{limits.max_abs_priority} and {limits.max_abs_priority}, got {spec.priority}",
            )
        )
    if len(spec.idempotency_key) > limits.max_idempotency_key_length:
        found.append(_too_long(f"{prefix}.idempotency_key", spec.idempotency_key, limits.max_idempotency_key_length))
    if len(spec.concurrency_key) > limits.max_name_length:
        found.append(_too_long(f"{prefix}.concurrency_key", spec.concurrency_key, limits.max_name_length))
    if not spec.concurrency_key.isprintable():
        found.append(FieldViolation(f"{prefix}.concurrency_key", "must not contain control characters"))
    found += _not_before(spec.not_before, limits, f"{prefix}.not_before")
    found += _delay(spec.ttl, limits, f"{prefix}.ttl")
    found += _delay(spec.timeout, limits, f"{prefix}.timeout")
    found += _retry(spec.retry, limits, f"{prefix}.retry")
    found += _tags(spec.tags, limits, f"{prefix}.tags")
    found += _metadata(spec.metadata, limits, f"{prefix}.metadata")
    if spec.resources.cpu_millis > limits.max_cpu_millis:
        found.append(FieldViolation(f"{prefix}.resources.cpu_millis", f"must be at most {limits.max_cpu_millis}"))
    if spec.resources.memory_bytes > limits.max_memory_bytes:
        found.append(FieldViolation(f"{prefix}.resources.memory_bytes", f"must be at most {limits.max_memory_bytes}"))
    return found


def validate_task_type(task_type: task_pb2.TaskType, limits: Limits, prefix: str = "task_type") -> list[FieldViolation]:
    """Every violation in a RegisterTaskType request's type, its descriptors included.

    An empty list means `contracts.TaskTypeRegistry.put` accepts it.
    """
    found = validate_name(task_type.name, f"{prefix}.name", limits)
    for name in ("input_type", "output_type"):
        value: str = getattr(task_type, name)
        if not value:
            found.append(FieldViolation(f"{prefix}.{name}", "is required"))
        elif not _FULL_NAME.fullmatch(value):
            found.append(
                FieldViolation(f"{prefix}.{name}", f"must be a full message name such as pkg.v1.Request, got {value!r}")
            )
    if len(task_type.description) > limits.max_description_length:
        found.append(_too_long(f"{prefix}.description", task_type.description, limits.max_description_length))
    size = task_type.descriptors.ByteSize()
    total = task_type.ByteSize()
    if total > limits.max_record_bytes - 1024:
        found.append(_too_big(prefix, total, limits.max_record_bytes - 1024))
        return found
    if size > limits.max_descriptors_bytes:
        found.append(
            FieldViolation(f"{prefix}.descriptors", f"is {size} bytes, at most {limits.max_descriptors_bytes} allowed")
        )
        return found
    # The contract check repeats "is required" / bad-name findings in its own words; keep the first.
    named = {v.field for v in found}
    found += [v for v in contracts.contract_violations(task_type, prefix) if v.field not in named]
    return found


def validate_hello_extras(hello: coordinator_pb2.WorkerHello, limits: Limits) -> list[FieldViolation]:
    """A hello's type names, labels, address and re-claims: bounded, since a session keeps them."""
    found: list[FieldViolation] = []
    if len(hello.running) > MAX_SLOTS:
        return [FieldViolation("hello.running", f"at most {MAX_SLOTS} attempts (the most slots a worker can have)")]
    if len(hello.task_types) > limits.max_hello_task_types:
        found.append(FieldViolation("hello.task_types", f"at most {limits.max_hello_task_types} types"))
    else:
        for i, name in enumerate(hello.task_types):
            found += validate_name(name, f"hello.task_types[{i}]", limits)
        served = set(hello.task_types)
        for name in sorted(hello.type_versions):
            if name not in served:
                found.append(
                    FieldViolation(f"hello.type_versions[{name[:128]}]", "names a type not in hello.task_types")
                )
    if not hello.worker_id.isprintable() or not hello.address.isprintable():
        found.append(FieldViolation("hello", "worker_id and address must not contain control characters"))
    # Labels are shown and logged: metadata's bounds, and printable.
    found += _metadata(hello.labels, limits, "hello.labels", max_entries=limits.max_labels, printable=True)
    if len(hello.address) > 256:
        found.append(FieldViolation("hello.address", "must be at most 256 characters"))
    # A node beyond these is a typo (a unit missed), not hardware.
    if hello.capacity.cpu_millis > MAX_CAPACITY_CPU_MILLIS:
        found.append(FieldViolation("hello.capacity.cpu_millis", f"must be at most {MAX_CAPACITY_CPU_MILLIS}"))
    if hello.capacity.memory_bytes > MAX_CAPACITY_MEMORY_BYTES:
        found.append(FieldViolation("hello.capacity.memory_bytes", f"must be at most {MAX_CAPACITY_MEMORY_BYTES}"))
    return found


def validate_filter(
    ids: Sequence[str], states: Sequence[int], tags: Sequence[str], limits: Limits
) -> list[FieldViolation]:
    """The filters of a ListTasks or WatchTasks request: counted first, then each checked."""
    found: list[FieldViolation] = []
    if len(ids) > limits.max_filter_ids:
        found.append(FieldViolation("ids", f"has {len(ids)} ids, at most {limits.max_filter_ids} allowed"))
    else:
        for i, task_id in enumerate(ids):
            found += validate_id(task_id, f"ids[{i}]", limits)
    if len(states) > len(task_pb2.TaskState.values()):
        found.append(FieldViolation("states", f"has {len(states)} states, more than there are"))
    if len(tags) > limits.max_tags:
        found.append(FieldViolation("tags", f"has {len(tags)} tags, at most {limits.max_tags} allowed"))
    return found


MAX_WATCH_EVENTS = 1000


def validate_max_events(value: int) -> list[FieldViolation]:
    """WatchTasks' events per response: 0 or 1 (one, in `event`) up to MAX_WATCH_EVENTS."""
    if value > MAX_WATCH_EVENTS:
        return [FieldViolation("max_events", f"must be at most {MAX_WATCH_EVENTS}, got {value}")]
    return []


def validate_after_revision(value: int, current: int, field: str = "after_revision") -> list[FieldViolation]:
    """A WatchTasks resume point: a revision etcd has reached (`current`), or 0 for none."""
    if value < 0:
        return [FieldViolation(field, f"must be 0 (no resume) or a revision seen on a stream, got {value}")]
    if value > current:
        return [FieldViolation(field, f"is {value}, beyond etcd's current revision {current}")]
    return []


def _payload(spec: task_pb2.TaskSpec, limits: Limits, prefix: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    has_any = spec.HasField("payload")
    if has_any and spec.payload_json:
        found.append(FieldViolation(f"{prefix}.payload_json", contracts.BOTH_PAYLOADS))
    if has_any:
        if not contracts.type_name_of(spec.payload.type_url):
            found.append(FieldViolation(f"{prefix}.payload.type_url", "must name the message type"))
        size = len(spec.payload.value)
        if size > limits.max_payload_bytes:
            found.append(_too_big(f"{prefix}.payload", size, limits.max_payload_bytes))
    json_size = len(spec.payload_json.encode())
    if json_size > limits.max_payload_bytes:
        found.append(_too_big(f"{prefix}.payload_json", json_size, limits.max_payload_bytes))
    return found


def _retry(retry: task_pb2.RetryPolicy, limits: Limits, prefix: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if retry.max_attempts > limits.max_attempts_limit:
        found.append(FieldViolation(f"{prefix}.max_attempts", f"must be at most {limits.max_attempts_limit}"))
    bad_durations = _delay(retry.initial_backoff, limits, f"{prefix}.initial_backoff")
    bad_durations += _delay(retry.max_backoff, limits, f"{prefix}.max_backoff")
    found += bad_durations
    initial = _total_nanos(retry.initial_backoff)
    maximum = _total_nanos(retry.max_backoff)
    # Zero means "the coordinator's default", so the order only matters when both are given.
    if not bad_durations and initial > 0 and maximum > 0 and maximum < initial:
        found.append(FieldViolation(f"{prefix}.max_backoff", "must not be shorter than initial_backoff"))
    multiplier = retry.backoff_multiplier
    if not (multiplier == 0 or 1 <= multiplier <= 100):
        found.append(FieldViolation(f"{prefix}.backoff_multiplier", f"must be 0 (default) or 1..100, got {multiplier}"))
    if math.isnan(retry.jitter) or not 0 <= retry.jitter <= 1:
        found.append(FieldViolation(f"{prefix}.jitter", f"must be between 0 and 1, got {retry.jitter}"))
    if len(retry.non_retryable_error_types) > limits.max_tags:
        found.append(FieldViolation(f"{prefix}.non_retryable_error_types", f"at most {limits.max_tags} types"))
        return found
    for index, error_type in enumerate(retry.non_retryable_error_types):
        if not error_type:
            found.append(FieldViolation(f"{prefix}.non_retryable_error_types[{index}]", "must not be empty"))
    return found


def _tags(tags: Sequence[str], limits: Limits, prefix: str) -> list[FieldViolation]:
    found: list[FieldViolation] = []
    if len(tags) > limits.max_tags:
        # Counted before anything else: a million tags must not cost a million checks.
        return [FieldViolation(prefix, f"has {len(tags)} tags, at most {limits.max_tags} allowed")]
    first_index: dict[str, int] = {}
    for index, tag in enumerate(tags):
        field = f"{prefix}[{index}]"
        if not tag:
            found.append(FieldViolation(field, "must not be empty"))
            continue
        if len(tag) > limits.max_tag_length:
            found.append(_too_long(field, tag, limits.max_tag_length))
        if tag in first_index:
            found.append(FieldViolation(field, f"duplicates {prefix}[{first_index[tag]}]"))
        else:
            first_index[tag] = index
    return found


def _metadata(
    items: Mapping[str, str], limits: Limits, prefix: str, *, max_entries: int = 0, printable: bool = False
) -> list[FieldViolation]:
    """Key/value pairs: at most max_entries (limits.max_metadata by default), keys non-empty, both bounded;
    with `printable`, no control characters either."""
    found: list[FieldViolation] = []
    max_entries = max_entries or limits.max_metadata
    if len(items) > max_entries:
        return [FieldViolation(prefix, f"has {len(items)} entries, at most {max_entries} allowed")]
    for key in sorted(items):
        shown = key if len(key) <= _MAX_KEY_IN_PATH else key[:_MAX_KEY_IN_PATH] + "..."
        field = f"{prefix}[{shown}]"
        if not key:
            found.append(FieldViolation(field, "key must not be empty"))
        elif len(key) > limits.max_metadata_key_length:
            found.append(
                FieldViolation(field, f"key is {len(key)} characters, at most {limits.max_metadata_key_length} allowed")
            )
        value = items[key]
        if printable and not (key + value).isprintable():
            found.append(FieldViolation(field, "must not contain control characters"))
        if len(value) > limits.max_metadata_value_length:
            found.append(
                FieldViolation(
                    field, f"value is {len(value)} characters, at most {limits.max_metadata_value_length} allowed"
                )
            )
    return found


def _timestamp(value: timestamp_pb2.Timestamp, field: str) -> list[FieldViolation]:
    if not _MIN_TIMESTAMP_SECONDS <= value.seconds <= _MAX_TIMESTAMP_SECONDS:
        return [FieldViolation(field, "seconds must be between years 0001 and 9999")]
    if not 0 <= value.nanos <= _MAX_NANOS:
        return [FieldViolation(field, f"nanos must be between 0 and {_MAX_NANOS}, got {value.nanos}")]
    return []


def _not_before(value: timestamp_pb2.Timestamp, limits: Limits, field: str) -> list[FieldViolation]:
    found = _timestamp(value, field)
    if not found and value.seconds > time.time() + limits.max_delay_seconds:
        found.append(FieldViolation(field, f"must be at most {_days(limits.max_delay_seconds)} ahead"))
    return found


def _delay(value: duration_pb2.Duration, limits: Limits, field: str) -> list[FieldViolation]:
    """A duration the coordinator waits for: at most max_delay_seconds, so no computed time overflows."""
    found = _duration(value, field)
    if not found and _total_nanos(value) > limits.max_delay_seconds * 1_000_000_000:
        found.append(
            FieldViolation(field, f"must be at most {limits.max_delay_seconds}s ({_days(limits.max_delay_seconds)})")
        )
    return found


def _days(seconds: int) -> str:
    return f"{seconds / 86400:g} days"


def _duration(value: duration_pb2.Duration, field: str) -> list[FieldViolation]:
    if value.seconds < 0 or value.nanos < 0:
        return [FieldViolation(field, "must not be negative")]
    if value.seconds > _MAX_DURATION_SECONDS:
        return [FieldViolation(field, f"seconds must be at most {_MAX_DURATION_SECONDS}")]
    if value.nanos > _MAX_NANOS:
        return [FieldViolation(field, f"nanos must be at most {_MAX_NANOS}, got {value.nanos}")]
    return []


def _total_nanos(value: duration_pb2.Duration) -> int:
    return value.seconds * 1_000_000_000 + value.nanos


def _too_long(field: str, value: str, limit: int) -> FieldViolation:
    return FieldViolation(field, f"is {len(value)} characters, at most {limit} allowed")


def _too_big(field: str, size: int, limit: int) -> FieldViolation:
    return FieldViolation(field, f"is {size} bytes, at most {limit} allowed")


__all__ = [
    "LOCK_NAME_PATTERN",
    "NAME_PATTERN",
    "Limits",
    "raise_if",
    "validate_acquire",
    "validate_batch_size",
    "validate_id",
    "validate_lock_name",
    "validate_lock_ref",
    "validate_name",
    "validate_page_size",
    "validate_spec",
    "validate_task_type",
]


_MAX_RETENTION_SECONDS = 366 * 24 * 3600


def validate_limit(limit: coordinator_pb2.Limit, limits: Limits, prefix: str = "limit") -> list[FieldViolation]:
    """A SetLimit request: the scope decides which name and fields make sense."""
    found: list[FieldViolation] = []
    scope = limit.scope
    if scope == coordinator_pb2.LIMIT_SCOPE_GLOBAL:
        if limit.name:
            found.append(FieldViolation(f"{prefix}.name", "must be empty for the global scope"))
    elif scope == coordinator_pb2.LIMIT_SCOPE_QUEUE:
        found += validate_name(limit.name, f"{prefix}.name", limits)
    elif scope == coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY:
        if not limit.name:
            found.append(FieldViolation(f"{prefix}.name", "is required: the concurrency key"))
        elif len(limit.name) > limits.max_name_length or not limit.name.isprintable():
            found.append(
                FieldViolation(f"{prefix}.name", f"must be 1 to {limits.max_name_length} printable characters")
            )
    else:
        found.append(FieldViolation(f"{prefix}.scope", "must be GLOBAL, QUEUE or CONCURRENCY_KEY"))
    if not 0 <= limit.max_running <= 1_000_000_000:
        found.append(FieldViolation(f"{prefix}.max_running", "must be between 0 (no limit) and 1000000000"))
    if limit.weight and scope != coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY:
        found.append(FieldViolation(f"{prefix}.weight", "applies to concurrency keys only"))
    elif limit.weight > 1000:
        found.append(FieldViolation(f"{prefix}.weight", "must be at most 1000"))
    if limit.HasField("retention"):
        if scope != coordinator_pb2.LIMIT_SCOPE_QUEUE:
            found.append(FieldViolation(f"{prefix}.retention", "applies to queues only"))
        else:
            found += _duration(limit.retention, f"{prefix}.retention")
            if limit.retention.seconds > _MAX_RETENTION_SECONDS:
                found.append(FieldViolation(f"{prefix}.retention", "must be at most 366 days"))
    return found


def validate_created(
    after: timestamp_pb2.Timestamp | None, before: timestamp_pb2.Timestamp | None, prefix: str = ""
) -> list[FieldViolation]:
    """created_after / created_before of a listing or a bulk filter: valid times, after before before."""
    found: list[FieldViolation] = []
    if after is not None:
        found += _timestamp(after, f"{prefix}created_after")
    if before is not None:
        found += _timestamp(before, f"{prefix}created_before")
    if (
        not found
        and after is not None
        and before is not None
        and (after.seconds, after.nanos)
        >= (
            before.seconds,
            before.nanos,
        )
    ):
        found.append(FieldViolation(f"{prefix}created_before", "must be later than created_after"))
    return found


def validate_task_filter(
    task_filter: coordinator_pb2.TaskFilter, allowed_states: frozenset[int], limits: Limits, prefix: str = "filter"
) -> list[FieldViolation]:
    """A bulk operation's filter: names, tags, times, and only states the operation can change."""
    found = validate_name(task_filter.queue, f"{prefix}.queue", limits, required=False)
    found += validate_name(task_filter.type, f"{prefix}.type", limits, required=False)
    found += validate_filter((), task_filter.states, task_filter.tags, limits)
    allowed = ", ".join(sorted(task_pb2.TaskState.Name(s).removeprefix("TASK_STATE_") for s in allowed_states))  # type: ignore[arg-type]
    for i, state in enumerate(task_filter.states):
        if state not in allowed_states:
            found.append(FieldViolation(f"{prefix}.states[{i}]", f"must be one of {allowed}"))
    found += validate_created(
        task_filter.created_after if task_filter.HasField("created_after") else None,
        task_filter.created_before if task_filter.HasField("created_before") else None,
        f"{prefix}.",
    )
    return found


def validate_bulk_limit(value: int, most: int, field: str = "limit") -> list[FieldViolation]:
    if not 0 <= value <= most:
        return [FieldViolation(field, f"must be between 1 and {most} (0 for {most})")]
    return []


def validate_reason(value: str, field: str = "reason") -> list[FieldViolation]:
    return [FieldViolation(field, "must be at most 1024 characters")] if len(value) > 1024 else []
