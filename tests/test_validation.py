"""Validation reports every bad field at once, with the path the caller uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from google.protobuf import any_pb2, descriptor_pb2, duration_pb2, timestamp_pb2

from herder.clients import errors
from herder.clients.descriptors import task_type_for
from herder.clients.errors import FieldViolation
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server import validation
from herder.server.validation import (
    Limits,
    raise_if,
    validate_batch_size,
    validate_id,
    validate_name,
    validate_page_size,
    validate_spec,
    validate_task_type,
)

pytestmark = pytest.mark.timeout(30)

LIMITS = Limits()


def _good_spec() -> task_pb2.TaskSpec:
    """A spec that uses every field, each within its limits."""
    payload = any_pb2.Any()
    payload.Pack(examples_pb2.EchoRequest(text="hi"))
    return task_pb2.TaskSpec(
        type="images.v1/resize:fast",
        queue="media-high",
        payload=payload,
        priority=-1_000_000,
        idempotency_key="k" * LIMITS.max_idempotency_key_length,
        concurrency_key="tenant 42 ü",
        not_before=timestamp_pb2.Timestamp(seconds=1_700_000_000, nanos=999_999_999),
        ttl=duration_pb2.Duration(seconds=60),
        timeout=duration_pb2.Duration(nanos=5),
        retry=task_pb2.RetryPolicy(
            max_attempts=LIMITS.max_attempts_limit,
            initial_backoff=duration_pb2.Duration(seconds=1),
            max_backoff=duration_pb2.Duration(seconds=1),
            backoff_multiplier=2.5,
            jitter=1.0,
            non_retryable_error_types=["ValueError"],
        ),
        tags=[f"tag{i}" for i in range(LIMITS.max_tags)],
        metadata={f"key{i}": "v" * LIMITS.max_metadata_value_length for i in range(LIMITS.max_metadata)},
        resources=task_pb2.Resources(cpu_millis=LIMITS.max_cpu_millis, memory_bytes=LIMITS.max_memory_bytes),
    )


def _fields(violations: list[FieldViolation]) -> list[str]:
    return [v.field for v in violations]


def test_a_spec_at_every_limit_is_valid() -> None:
    assert validate_spec(_good_spec(), LIMITS) == []


def test_a_minimal_spec_is_valid() -> None:
    assert validate_spec(task_pb2.TaskSpec(type="examples.echo"), LIMITS) == []
    assert validate_spec(task_pb2.TaskSpec(type="examples.echo", payload_json='{"text": "hi"}'), LIMITS) == []


def _set(**fields: object) -> Callable[[task_pb2.TaskSpec], None]:
    def change(spec: task_pb2.TaskSpec) -> None:
        for name, value in fields.items():
            target: object = spec
            *parents, last = name.split(".")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, last, value)

    return change


def _append(name: str, value: str) -> Callable[[task_pb2.TaskSpec], None]:
    return lambda spec: getattr(spec, name).append(value)


def _tags(*tags: str) -> Callable[[task_pb2.TaskSpec], None]:
    def change(spec: task_pb2.TaskSpec) -> None:
        del spec.tags[:]
        spec.tags.extend(tags)

    return change


def _metadata(key: str, value: str) -> Callable[[task_pb2.TaskSpec], None]:
    def change(spec: task_pb2.TaskSpec) -> None:
        spec.metadata.clear()
        spec.metadata[key] = value

    return change


def _append_retry_type(value: str) -> Callable[[task_pb2.TaskSpec], None]:
    return lambda spec: spec.retry.non_retryable_error_types.append(value)


BIG = LIMITS.max_payload_bytes + 1

CASES: list[tuple[str, Callable[[task_pb2.TaskSpec], None], str]] = [
    ("type-empty", _set(type=""), "spec.type"),
    ("type-pattern", _set(type="-images"), "spec.type"),
    ("type-space", _set(type="images resize"), "spec.type"),
    ("type-length", _set(type="t" * 129), "spec.type"),
    ("queue-pattern", _set(queue="high priority"), "spec.queue"),
    ("queue-length", _set(queue="q" * 129), "spec.queue"),
    ("both-payloads", _set(payload_json="{}"), "spec.payload_json"),
    ("payload-size", _set(**{"payload.value": b"x" * BIG}), "spec.payload"),
    ("payload-no-type-url", _set(**{"payload.type_url": ""}), "spec.payload.type_url"),
    ("payload-type-url-no-name", _set(**{"payload.type_url": "type.googleapis.com/"}), "spec.payload.type_url"),
    ("priority-high", _set(priority=1_000_001), "spec.priority"),
    ("priority-low", _set(priority=-1_000_001), "spec.priority"),
    ("idempotency-key-length", _set(idempotency_key="k" * 257), "spec.idempotency_key"),
    ("concurrency-key-length", _set(concurrency_key="c" * 129), "spec.concurrency_key"),
    ("concurrency-key-control", _set(concurrency_key="tenant\n1"), "spec.concurrency_key"),
    ("not-before-seconds", _set(**{"not_before.seconds": 253_402_300_800}), "spec.not_before"),
    ("not-before-nanos", _set(**{"not_before.nanos": 1_000_000_000}), "spec.not_before"),
    ("not-before-negative-nanos", _set(**{"not_before.nanos": -1}), "spec.not_before"),
    ("ttl-negative", _set(**{"ttl.seconds": -1}), "spec.ttl"),
    ("ttl-negative-nanos", _set(**{"ttl.nanos": -1}), "spec.ttl"),
    ("timeout-huge", _set(**{"timeout.seconds": 315_576_000_001}), "spec.timeout"),
    ("timeout-nanos", _set(**{"timeout.nanos": 1_000_000_000}), "spec.timeout"),
    ("max-attempts", _set(**{"retry.max_attempts": 101}), "spec.retry.max_attempts"),
    ("initial-backoff-negative", _set(**{"retry.initial_backoff.seconds": -1}), "spec.retry.initial_backoff"),
    ("max-backoff-negative", _set(**{"retry.max_backoff.nanos": -5}), "spec.retry.max_backoff"),
    ("max-backoff-short", _set(**{"retry.initial_backoff.seconds": 10}), "spec.retry.max_backoff"),
    ("multiplier-below-one", _set(**{"retry.backoff_multiplier": 0.5}), "spec.retry.backoff_multiplier"),
    ("multiplier-huge", _set(**{"retry.backoff_multiplier": 100.5}), "spec.retry.backoff_multiplier"),
    ("multiplier-nan", _set(**{"retry.backoff_multiplier": float("nan")}), "spec.retry.backoff_multiplier"),
    ("jitter-high", _set(**{"retry.jitter": 1.01}), "spec.retry.jitter"),
    ("jitter-negative", _set(**{"retry.jitter": -0.1}), "spec.retry.jitter"),
    ("jitter-nan", _set(**{"retry.jitter": float("nan")}), "spec.retry.jitter"),
    ("non-retryable-empty", _append_retry_type(""), "spec.retry.non_retryable_error_types[1]"),
    ("tags-count", _append("tags", "one-too-many"), "spec.tags"),
    ("tag-empty", _tags("a", "", "c"), "spec.tags[1]"),
    ("tag-length", _tags("a", "b", "t" * 129), "spec.tags[2]"),
    ("tag-duplicate", _tags("a", "b", "a"), "spec.tags[2]"),
    ("metadata-count", lambda spec: spec.metadata.update({"one-too-many": ""}), "spec.metadata"),
    ("metadata-key-empty", _metadata("", "v"), "spec.metadata[]"),
    ("metadata-key-length", _metadata("k" * 129, "v"), f"spec.metadata[{'k' * 64}...]"),
    ("metadata-value-length", _metadata("foo", "v" * 1025), "spec.metadata[foo]"),
    ("cpu", _set(**{"resources.cpu_millis": 1_000_001}), "spec.resources.cpu_millis"),
    ("memory", _set(**{"resources.memory_bytes": (1 << 40) + 1}), "spec.resources.memory_bytes"),
]


@pytest.mark.parametrize(("change", "field"), [(c, f) for _, c, f in CASES], ids=[i for i, _, _ in CASES])
def test_each_limit_is_reported_on_its_field(change: Callable[[task_pb2.TaskSpec], None], field: str) -> None:
    spec = _good_spec()
    change(spec)

    violations = validate_spec(spec, LIMITS)

    assert _fields(violations) == [field], violations
    assert all(v.description for v in violations)


def test_payload_json_size_is_limited() -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload_json='"' + "é" * (BIG // 2) + '"')

    assert validate_spec(spec, LIMITS) == [
        FieldViolation("spec.payload_json", f"is {BIG + 1} bytes, at most {LIMITS.max_payload_bytes} allowed")
    ]


def test_every_violation_is_reported_at_once() -> None:
    spec = task_pb2.TaskSpec(
        type="",
        queue="no spaces",
        payload=any_pb2.Any(type_url="", value=b"x" * BIG),
        payload_json="{}",
        priority=2_000_000,
        concurrency_key="\x00",
        ttl=duration_pb2.Duration(seconds=-1),
        retry=task_pb2.RetryPolicy(jitter=2, backoff_multiplier=0.1, non_retryable_error_types=["", "x"]),
        tags=["dup", "dup", ""],
        metadata={"": "v"},
        resources=task_pb2.Resources(cpu_millis=2_000_000),
    )

    violations = validate_spec(spec, LIMITS, prefix="specs[3]")

    assert _fields(violations) == [
        "specs[3].type",
        "specs[3].queue",
        "specs[3].payload_json",
        "specs[3].payload.type_url",
        "specs[3].payload",
        "specs[3].priority",
        "specs[3].concurrency_key",
        "specs[3].ttl",
        "specs[3].retry.backoff_multiplier",
        "specs[3].retry.jitter",
        "specs[3].retry.non_retryable_error_types[0]",
        "specs[3].tags[1]",
        "specs[3].tags[2]",
        "specs[3].metadata[]",
        "specs[3].resources.cpu_millis",
    ]


def test_limits_are_configurable() -> None:
    strict = dataclasses.replace(LIMITS, max_tags=1, max_name_length=5)
    spec = task_pb2.TaskSpec(type="echoes", tags=["a", "b"])

    assert _fields(validate_spec(spec, strict)) == ["spec.type", "spec.tags"]


def test_raise_if_raises_invalid_argument_with_every_violation() -> None:
    violations = validate_spec(task_pb2.TaskSpec(type="", priority=-2_000_000), LIMITS)

    raise_if([], "fine")
    with pytest.raises(errors.InvalidArgumentError) as raised:
        raise_if(violations, "invalid task spec")

    assert raised.value.message == "invalid task spec"
    assert list(raised.value.violations) == violations
    assert errors.to_status_proto(raised.value).details  # carries google.rpc.BadRequest


@pytest.mark.parametrize(
    ("value", "ok"),
    [("01HZX3K9Q2", True), ("a" * 128, True), ("", False), ("a" * 129, False), ("has space", False), ("tab\t", False)],
)
def test_validate_id(value: str, ok: bool) -> None:
    violations = validate_id(value, "id", LIMITS)

    assert violations == [] if ok else _fields(violations) == ["id"]


@pytest.mark.parametrize(("value", "ok"), [(0, True), (1, True), (1000, True), (-1, False), (1001, False)])
def test_validate_page_size(value: int, ok: bool) -> None:
    violations = validate_page_size(value, "page_size", LIMITS)

    assert violations == [] if ok else _fields(violations) == ["page_size"]


@pytest.mark.parametrize(("count", "ok"), [(1, True), (1000, True), (0, False), (1001, False)])
def test_validate_batch_size(count: int, ok: bool) -> None:
    violations = validate_batch_size(count, "specs", LIMITS)

    assert violations == [] if ok else _fields(violations) == ["specs"]


def test_validate_name_for_optional_filters() -> None:
    assert validate_name("", "queue", LIMITS, required=False) == []
    assert _fields(validate_name("", "queue", LIMITS)) == ["queue"]
    assert _fields(validate_name("bad name", "queue", LIMITS, required=False)) == ["queue"]


# --- Task types ------------------------------------------------------------------


def _echo_type() -> task_pb2.TaskType:
    return task_type_for("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse, description="echo")


def test_a_task_type_built_from_messages_is_valid() -> None:
    assert validate_task_type(_echo_type(), LIMITS) == []


def test_task_type_violations_are_reported_once_each() -> None:
    task_type = _echo_type()
    task_type.name = "bad name"
    task_type.input_type = ""
    task_type.output_type = "not a name"
    task_type.description = "d" * 4097

    violations = validate_task_type(task_type, LIMITS)

    assert _fields(violations) == [
        "task_type.name",
        "task_type.input_type",
        "task_type.output_type",
        "task_type.description",
    ]


def test_task_type_messages_must_be_in_its_descriptors() -> None:
    task_type = _echo_type()
    task_type.input_type = "herder.examples.v1.Missing"

    assert validate_task_type(task_type, LIMITS) == [
        FieldViolation(
            "task_type.input_type", "message herder.examples.v1.Missing is not defined in task_type.descriptors"
        )
    ]


def test_task_type_with_broken_descriptors() -> None:
    task_type = _echo_type()
    task_type.descriptors.file.add(name="extra.proto", dependency=["missing.proto"])

    assert _fields(validate_task_type(task_type, LIMITS)) == ["task_type.descriptors"]


def test_task_type_descriptors_are_size_limited() -> None:
    task_type = _echo_type()
    task_type.descriptors.file.add(name="padding.proto", package="p" * 2000)
    small = dataclasses.replace(LIMITS, max_descriptors_bytes=1000)

    assert _fields(validate_task_type(task_type, small)) == ["task_type.descriptors"]


def test_task_type_without_descriptors() -> None:
    task_type = _echo_type()
    task_type.descriptors.CopyFrom(descriptor_pb2.FileDescriptorSet())

    assert _fields(validate_task_type(task_type, LIMITS)) == ["task_type.input_type", "task_type.output_type"]


# ----------------------------------------------------------------- limits


def _limit_fields(limit: coordinator_pb2.Limit) -> list[str]:
    return [v.field for v in validation.validate_limit(limit, validation.Limits())]


@pytest.mark.parametrize(
    "limit",
    [
        coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_GLOBAL, max_running=100),
        coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_QUEUE, name="emails", max_running=5),
        coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY, name="tenant 7", weight=3),
    ],
)
def test_valid_limits_pass(limit: coordinator_pb2.Limit) -> None:
    assert _limit_fields(limit) == []


def test_queue_retention_is_a_queue_setting() -> None:
    limit = coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_QUEUE, name="q")
    limit.retention.FromSeconds(3600)
    assert _limit_fields(limit) == []
    limit.scope = coordinator_pb2.LIMIT_SCOPE_GLOBAL
    limit.name = ""
    assert _limit_fields(limit) == ["limit.retention"]


@pytest.mark.parametrize(
    ("limit", "field"),
    [
        (coordinator_pb2.Limit(), "limit.scope"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_GLOBAL, name="x"), "limit.name"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_QUEUE), "limit.name"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_QUEUE, name="bad name!"), "limit.name"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY), "limit.name"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_GLOBAL, max_running=-1), "limit.max_running"),
        (coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_QUEUE, name="q", weight=2), "limit.weight"),
        (
            coordinator_pb2.Limit(scope=coordinator_pb2.LIMIT_SCOPE_CONCURRENCY_KEY, name="k", weight=5000),
            "limit.weight",
        ),
    ],
)
def test_invalid_limits_name_the_field(limit: coordinator_pb2.Limit, field: str) -> None:
    assert field in _limit_fields(limit)
