"""Typed task contracts: registered task types, their descriptor pools, and payloads checked against them.

Each registered task type gets its own `DescriptorPool`, built from the
`FileDescriptorSet` it was registered with, so two services may register
different versions of the same .proto file without clashing. Payloads sent as
JSON are encoded here with the registered input descriptor; payloads sent as
`Any` must carry exactly the registered input type.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
)
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError, Message

from herder.clients import errors
from herder.clients.descriptors import WELL_KNOWN_FILES, descriptor_set_for
from herder.clients.errors import FieldViolation
from herder.clients.proto.v1 import coordinator_pb2, task_pb2
from herder.server.compatibility import Change, compare

TYPE_URL_PREFIX = "type.googleapis.com/"


# Shared with validation.validate_spec so a caller running both can drop the duplicate.
BOTH_PAYLOADS = "set either payload or payload_json, not both"


@dataclass(frozen=True, slots=True)
class _Contract:
    task_type: task_pb2.TaskType
    pool: descriptor_pool.DescriptorPool
    input_class: type[Message]
    output_class: type[Message]


class TaskTypeRegistry:
    """Registered task types by name, each with the descriptor pool its messages resolve in.

    Not thread-safe; the coordinator uses it from its event loop only.
    """

    def __init__(self) -> None:
        self._contracts: dict[str, _Contract] = {}

    def put(self, task_type: task_pb2.TaskType) -> None:
        """Registers `task_type` (a copy of it), replacing any registration of the same name.

        Raises InvalidArgumentError, naming `task_type.name`, `task_type.descriptors`,
        `task_type.input_type` or `task_type.output_type`, when the name is empty or
        the descriptors do not build or do not define both messages; the registry is
        then unchanged. Validate the rest of the type with `validation.validate_task_type`.
        """
        contract, violations = _compile(task_type, "task_type")
        if not task_type.name:
            violations.insert(0, FieldViolation("task_type.name", "is required"))
        if contract is None or violations:
            raise errors.InvalidArgumentError(
                f"task type {task_type.name!r} has an invalid contract", violations=violations
            )
        self._contracts[task_type.name] = contract

    def discard(self, name: str) -> None:
        """Forgets the type called `name`; nothing happens when it is not registered."""
        self._contracts.pop(name, None)

    def get(self, name: str) -> task_pb2.TaskType | None:
        """A copy of the registered type called `name`, or None."""
        contract = self._contracts.get(name)
        return None if contract is None else _copy(contract.task_type)

    def all(self) -> list[task_pb2.TaskType]:
        """Copies of every registered type, sorted by name."""
        return [_copy(self._contracts[name].task_type) for name in sorted(self._contracts)]

    def version(self, name: str) -> int:
        """The registered version of the type called `name` (a record from before versions counts as 1), or 0."""
        contract = self._contracts.get(name)
        return 0 if contract is None else contract.task_type.version or 1

    def changes(self, task_type: task_pb2.TaskType) -> list[Change] | None:
        """Every difference from the registered messages of `task_type.name` to `task_type`'s, or None
        when no type of that name is registered. Raises InvalidArgumentError when `task_type`'s
        contract does not compile (validate it first)."""
        current = self._contracts.get(task_type.name)
        if current is None:
            return None
        contract, violations = _compile(task_type, "task_type")
        if contract is None:
            raise errors.InvalidArgumentError(
                f"task type {task_type.name!r} has an invalid contract", violations=violations
            )
        return compare(_messages_of(current), _messages_of(contract))

    def input_class(self, name: str) -> type[Message] | None:
        """The message class of the type's input, built from its registered descriptors, or None."""
        contract = self._contracts.get(name)
        return None if contract is None else contract.input_class

    def output_class(self, name: str) -> type[Message] | None:
        """The message class of the type's output, built from its registered descriptors, or None."""
        contract = self._contracts.get(name)
        return None if contract is None else contract.output_class

    def __contains__(self, name: object) -> bool:
        return name in self._contracts

    def __len__(self) -> int:
        return len(self._contracts)

    def _contract(self, name: str) -> _Contract | None:
        return self._contracts.get(name)

    def _pools(self, first: str | None) -> Iterable[descriptor_pool.DescriptorPool]:
        if first is not None and first in self._contracts:
            yield self._contracts[first].pool
        for name, contract in self._contracts.items():
            if name != first:
                yield contract.pool


def hello_versions_refused(hello: coordinator_pb2.WorkerHello, registry: TaskTypeRegistry) -> list[FieldViolation]:
    """A violation per type version a worker's hello declares that the registered type no longer serves:
    a version before the latest forced (incompatible) one, one never registered, or a type not registered."""
    found: list[FieldViolation] = []
    for name, declared in sorted(hello.type_versions.items()):
        if not declared:
            continue  # 0: no version known, as for a type left out
        where = f"hello.type_versions[{name}]"
        current = registry.get(name)
        if current is None:
            found.append(FieldViolation(where, f"task type {name} is not registered; register it before hello"))
            continue
        version, since = current.version or 1, current.compatible_since or 1
        if declared > version:
            found.append(
                FieldViolation(where, f"version {declared} of {name} was never registered (latest: {version})")
            )
        elif declared < since:
            found.append(
                FieldViolation(
                    where,
                    f"{name} version {declared} is incompatible with the registered version {version}:"
                    f" version {since} was forced over breaking changes",
                )
            )
    return found


def contract_violations(task_type: task_pb2.TaskType, prefix: str = "task_type") -> list[FieldViolation]:
    """Every reason `task_type`'s descriptors do not define its input and output messages.

    Paths are `<prefix>.descriptors`, `<prefix>.input_type` and `<prefix>.output_type`.
    An empty list means `TaskTypeRegistry.put` accepts the contract.
    """
    return _compile(task_type, prefix)[1]


def resolve_payload(
    spec: task_pb2.TaskSpec, registry: TaskTypeRegistry, *, accept_unregistered: bool, prefix: str = "spec"
) -> list[FieldViolation]:
    """Checks `spec`'s payload against its registered input type and encodes JSON payloads.

    On success (an empty list) `spec.payload` holds the input message and
    `spec.payload_json` is empty: JSON is parsed with the registered input
    descriptor, and no payload at all becomes an empty input message. An `Any`
    payload must carry the registered input type and parse as it. Unregistered
    types are a violation on `<prefix>.type` unless `accept_unregistered`, in which
    case an `Any` payload passes unchecked but JSON cannot be encoded. When any
    violation is returned `spec` is unchanged.
    """
    has_json = bool(spec.payload_json)
    has_any = spec.HasField("payload")
    if has_json and has_any:
        return [FieldViolation(f"{prefix}.payload_json", BOTH_PAYLOADS)]
    contract = registry._contract(spec.type)
    if contract is None:
        if not accept_unregistered:
            return [FieldViolation(f"{prefix}.type", f"task type {spec.type!r} is not registered")]
        if has_json:
            return [
                FieldViolation(
                    f"{prefix}.payload_json",
                    f"task type {spec.type!r} is not registered, so there is no descriptor to encode JSON with;"
                    " register the type or send payload",
                )
            ]
        return []
    input_name = contract.task_type.input_type
    if has_json:
        message, problem = _parse_json(spec.payload_json, contract.input_class, contract.pool)
        if message is None:
            return [FieldViolation(f"{prefix}.payload_json", problem)]
        spec.payload.Pack(message, type_url_prefix=TYPE_URL_PREFIX)
        spec.payload_json = ""
        return []
    if has_any:
        got = type_name_of(spec.payload.type_url)
        if got != input_name:
            return [FieldViolation(f"{prefix}.payload", f"expected a {input_name}, got {got or 'no type'}")]
        try:
            contract.input_class.FromString(spec.payload.value)
        except DecodeError as error:
            return [FieldViolation(f"{prefix}.payload", f"is not a valid {input_name}: {error}")]
        return []
    spec.payload.Pack(contract.input_class(), type_url_prefix=TYPE_URL_PREFIX)
    return []


def render_json(value: any_pb2.Any, registry: TaskTypeRegistry, type_name: str | None = None) -> str:
    """The message in `value` as compact JSON with proto field names, such as `{"text":"hi"}`.

    The message type is looked up by the `Any`'s type URL, first in the pool of
    task type `type_name` (its output is what results carry), then in every other
    registered type's pool, then among the well-known types. Returns "" when
    `value` is empty, its type is not found, or its bytes do not parse: the JSON is
    a convenience view and the binary value stays authoritative. Never raises.
    """
    full_name = type_name_of(value.type_url)
    if not full_name:
        return ""
    pools = list(registry._pools(type_name))
    if full_name.startswith("google.protobuf."):
        pools.append(descriptor_pool.Default())
    for pool in pools:
        try:
            descriptor = pool.FindMessageTypeByName(full_name)
        except KeyError:
            continue
        return _to_json(value.value, descriptor, pool)
    return ""


def type_name_of(type_url: str) -> str:
    """The full message name in an `Any` type URL ("type.googleapis.com/a.B" -> "a.B")."""
    return type_url.rpartition("/")[2]


def _to_json(data: bytes, descriptor: Descriptor, pool: descriptor_pool.DescriptorPool) -> str:
    try:
        message = message_factory.GetMessageClass(descriptor).FromString(data)
        as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True, descriptor_pool=pool)
    except (DecodeError, json_format.Error, TypeError, ValueError, KeyError):
        # A nested Any of an unknown type, or bytes that are not this message.
        return ""
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False)


def _parse_json(
    text: str, message_class: type[Message], pool: descriptor_pool.DescriptorPool
) -> tuple[Message | None, str]:
    full_name = message_class.DESCRIPTOR.full_name
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"is not valid JSON: {error}"
    except RecursionError:
        return None, "is not valid JSON: nested too deeply"
    except ValueError as error:
        # Python's own limits, such as integers of more than 4,300 digits.
        return None, f"is not valid JSON: {str(error)[:200]}"
    if not isinstance(loaded, dict):
        return None, f"must be a JSON object for {full_name}, got {_json_kind(loaded)}"
    message = message_class()
    try:
        # Parse the text again (not `loaded`) so json_format also rejects duplicate keys.
        json_format.Parse(text, message, descriptor_pool=pool)
    except (json_format.ParseError, TypeError, ValueError, KeyError) as error:
        problem = _readable(str(error))
        if problem.startswith(_LOAD_FAILED):
            # Only a duplicate key gets this far: json.loads accepted the rest.
            return None, "is not valid JSON: " + problem.replace(_LOAD_FAILED, "")
        return None, f"does not match {full_name}: {problem}"
    return message, ""


_LOAD_FAILED = "Failed to load JSON: "
_AVAILABLE_FIELDS = re.compile(r"Available Fields\(except extensions\): \"\[(.*)\]\"")


def _readable(message: str) -> str:
    """json_format's error on one line, with its field list as plain names."""
    message = " ".join(message.split())
    message = _AVAILABLE_FIELDS.sub(lambda m: "known fields: " + m.group(1).replace("'", ""), message)
    return message.replace(". known fields", "; known fields").rstrip(".")


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _messages_of(contract: _Contract) -> tuple[Descriptor, Descriptor]:
    # The stubs type upb's descriptor apart; at runtime it is a descriptor.Descriptor.
    return cast(Descriptor, contract.input_class.DESCRIPTOR), cast(Descriptor, contract.output_class.DESCRIPTOR)


def _copy(task_type: task_pb2.TaskType) -> task_pb2.TaskType:
    copy = task_pb2.TaskType()
    copy.CopyFrom(task_type)
    return copy


def _compile(task_type: task_pb2.TaskType, prefix: str) -> tuple[_Contract | None, list[FieldViolation]]:
    """Builds the type's pool and finds its messages; the contract is None when anything is wrong."""
    field = f"{prefix}.descriptors"
    pool, violations = _build_pool(task_type.descriptors, field)
    classes: list[type[Message]] = []
    for name in ("input_type", "output_type"):
        full_name: str = getattr(task_type, name)
        if not full_name:
            violations.append(FieldViolation(f"{prefix}.{name}", "is required"))
            continue
        try:
            descriptor = pool.FindMessageTypeByName(full_name)
        except KeyError:
            violations.append(FieldViolation(f"{prefix}.{name}", f"message {full_name} is not defined in {field}"))
            continue
        classes.append(message_factory.GetMessageClass(descriptor))
    if violations:
        return None, violations
    return _Contract(_copy(task_type), pool, classes[0], classes[1]), []


def _build_pool(
    descriptors: descriptor_pb2.FileDescriptorSet, field: str
) -> tuple[descriptor_pool.DescriptorPool, list[FieldViolation]]:
    """A pool of every file in the set that builds, each added after its imports.

    Imports missing from the set are taken from the well-known types; any other
    missing import, a file that does not build, or an import cycle is a violation.
    """
    violations: list[FieldViolation] = []
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for index, file in enumerate(descriptors.file):
        if not file.name:
            violations.append(FieldViolation(field, f"file[{index}] has no name"))
        elif file.name in files and files[file.name] != file:
            violations.append(FieldViolation(field, f"file {file.name} appears twice with different contents"))
        else:
            files.setdefault(file.name, file)

    # Close the set over imports, filling in well-known files it left out.
    missing: set[str] = set()
    work = list(files.values())
    while work:
        file = work.pop()
        for dependency in file.dependency:
            if dependency in files or dependency in missing:
                continue
            well_known = WELL_KNOWN_FILES.get(dependency)
            if well_known is None:
                missing.add(dependency)
                violations.append(FieldViolation(field, f"{file.name} imports {dependency}, which is not in the set"))
                continue
            proto = descriptor_pb2.FileDescriptorProto()
            well_known.CopyToProto(proto)
            files[dependency] = proto
            work.append(proto)

    # Kahn's algorithm: add a file once every file it imports has been added.
    pool = descriptor_pool.DescriptorPool()
    waiting = {name: set(file.dependency) for name, file in files.items()}
    dependents: dict[str, list[str]] = {}
    for name, dependencies in waiting.items():
        for dependency in dependencies:
            dependents.setdefault(dependency, []).append(name)
    ready = deque(sorted(name for name, dependencies in waiting.items() if not dependencies))
    added: set[str] = set()
    failed: set[str] = set(missing)
    while ready:
        name = ready.popleft()
        try:
            pool.AddSerializedFile(files[name].SerializeToString())
        except (TypeError, ValueError) as error:
            failed.add(name)
            violations.append(FieldViolation(field, f"{name} does not build: {_readable(str(error))}"))
            continue
        added.add(name)
        for dependent in dependents.get(name, ()):
            waiting[dependent].discard(name)
            if not waiting[dependent]:
                ready.append(dependent)

    # Whatever is left waits on a failed file (already reported) or on an import cycle.
    blocked: set[str] = set()
    work_names = list(failed)
    while work_names:
        for dependent in dependents.get(work_names.pop(), ()):
            if dependent not in blocked:
                blocked.add(dependent)
                work_names.append(dependent)
    cyclic = sorted(set(files) - added - failed - blocked)
    if cyclic:
        violations.append(FieldViolation(field, f"import cycle among {', '.join(cyclic)}"))
    return pool, violations


__all__ = [
    "BOTH_PAYLOADS",
    "TYPE_URL_PREFIX",
    "TaskTypeRegistry",
    "contract_violations",
    "descriptor_set_for",
    "hello_versions_refused",
    "render_json",
    "resolve_payload",
    "type_name_of",
]
