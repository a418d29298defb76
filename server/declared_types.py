"""Task types declared in the coordinator's config file, so they exist from the first start.

    [[coordinator.task_types]]
    name = "images.resize"
    input = "images.v1.ResizeRequest"
    output = "images.v1.ResizeResult"
    proto_path = ["protos"]                 # where imports are found (default: the working directory)
    protos = ["images/v1/images.proto"]     # or: descriptor_set = "images.binpb" (`buf build -o`)
    description = "resize an image"         # optional

Each declaration is compiled (clients.proto_sources) and validated as RegisterTaskType would
validate it when the settings are read, so a bad one stops the coordinator before anything
starts, with one line naming it. Relative paths are taken from the coordinator's working
directory. The leader registers each declared type when it takes office unless etcd already
holds the same contract, so no worker has to run first and a restart writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from herder.clients.proto.v1 import task_pb2
from herder.clients.proto_sources import task_type_from_sources
from herder.server import validation

_KEYS = ("name", "input", "output", "proto_path", "protos", "descriptor_set", "description")


@dataclass(frozen=True, slots=True)
class DeclaredType:
    """One declared task type, compiled: the TaskType the leader registers."""

    task_type: task_pb2.TaskType

    def __str__(self) -> str:  # how `herder config show coordinator` lists it
        t = self.task_type
        return f"{t.name} ({t.input_type} -> {t.output_type}, {len(t.descriptors.file)} files)"


def parse_declarations(raw: object) -> tuple[DeclaredType, ...]:
    """The `task_types` array of tables, each compiled and checked; raises ValueError naming
    every bad declaration (by name and index) in one line."""
    if not isinstance(raw, list):
        raise ValueError("must be an array of tables ([[coordinator.task_types]])")
    declared: list[DeclaredType] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        label = f"task_types[{index}]" + (f" {name!r}" if isinstance(name, str) and name else "")
        try:
            task_type = _compile(item)
        except ValueError as exc:
            problems.append(f"{label}: {exc}")
            continue
        if task_type.name in seen:
            problems.append(f"{label}: declared twice")
            continue
        seen.add(task_type.name)
        declared.append(DeclaredType(task_type))
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(declared)


def _compile(item: object) -> task_pb2.TaskType:
    if not isinstance(item, dict):
        raise ValueError("must be a table with name, input, output and protos or descriptor_set")
    unknown = sorted(set(item) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))} (keys: {', '.join(_KEYS)})")
    for key in ("name", "input", "output"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ValueError(f"{key} is required (a string)")
    task_type = task_type_from_sources(
        item["name"],
        item["input"],
        item["output"],
        protos=_strings(item, "protos"),
        proto_paths=_strings(item, "proto_path"),
        descriptor_set=_string(item, "descriptor_set"),
        description=_string(item, "description"),
    )
    violations = validation.validate_task_type(task_type, validation.Limits(), "task_type")
    if violations:
        raise ValueError("; ".join(f"{v.field}: {v.description}" for v in violations))
    return task_type


def _strings(item: dict[str, Any], key: str) -> list[str]:
    value = item.get(key, [])
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be an array of strings")
    return value


def _string(item: dict[str, Any], key: str) -> str:
    value = item.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string")
    return value


__all__ = ["DeclaredType", "parse_declarations"]
