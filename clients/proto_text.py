"""A task type's messages as .proto text, rendered from the descriptors it was registered with.

For people (`herder types get`): it shows the files that define the input and output messages and
the files they import (well-known ones left out), with messages, enums, fields, oneofs, maps and
reservations. Options other than json_name, default and packed are left out; comments are not in
descriptors unless the set kept source info, and are not shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2

from herder.clients.proto.v1 import task_pb2

_F = descriptor_pb2.FieldDescriptorProto
_MAX_FIELD = 536870911  # reserved ranges ending at the largest field number read "to max"


def render_task_type(task_type: task_pb2.TaskType) -> str:
    """The .proto text of the files `task_type`'s messages need, defining files first; "" when none."""
    files = {f.name: f for f in task_type.descriptors.file}
    wanted: list[str] = []

    def visit(name: str) -> None:
        if name in wanted or name not in files or name.startswith("google/protobuf/"):
            return
        wanted.append(name)
        for dependency in files[name].dependency:
            visit(dependency)

    for full_name in (task_type.input_type, task_type.output_type):
        for file in files.values():
            if _defines(file, full_name):
                visit(file.name)
    return "\n".join(render_file(files[name]) for name in wanted)


def render_file(file: descriptor_pb2.FileDescriptorProto) -> str:
    lines = [f"// {file.name}", f'syntax = "{file.syntax or "proto2"}";' if file.syntax != "editions" else ""]
    lines = [line for line in lines if line]
    if file.syntax == "editions":
        lines.append(f'edition = "{descriptor_pb2.Edition.Name(file.edition).removeprefix("EDITION_")}";')
    if file.package:
        lines.append(f"package {file.package};")
    lines += [f'import "{dependency}";' for dependency in file.dependency]
    lines.append("")
    proto2 = file.syntax in ("", "proto2")
    for message in file.message_type:
        lines += _message(message, file.package, proto2, "")
    for enum in file.enum_type:
        lines += _enum(enum, "")
    return "\n".join(lines) + "\n"


def _defines(file: descriptor_pb2.FileDescriptorProto, full_name: str) -> bool:
    prefix = f"{file.package}." if file.package else ""
    if not full_name.startswith(prefix):
        return False
    path = full_name[len(prefix) :].split(".")
    messages = list(file.message_type)
    for part in path:
        found = next((m for m in messages if m.name == part), None)
        if found is None:
            return False
        messages = list(found.nested_type)
    return True


def _message(message: descriptor_pb2.DescriptorProto, package: str, proto2: bool, indent: str) -> list[str]:
    inner = indent + "  "
    lines = [f"{indent}message {message.name} {{"]
    maps = {n.name: n for n in message.nested_type if n.options.map_entry}
    oneofs: dict[int, list[_F]] = {}
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            oneofs.setdefault(field.oneof_index, []).append(field)
    done: set[int] = set()
    for field in message.field:
        if field.HasField("oneof_index") and not field.proto3_optional:
            if field.oneof_index in done:
                continue
            done.add(field.oneof_index)
            lines.append(f"{inner}oneof {message.oneof_decl[field.oneof_index].name} {{")
            lines += [f"{inner}  {_field(f, package, maps, proto2, in_oneof=True)}" for f in oneofs[field.oneof_index]]
            lines.append(f"{inner}}}")
        else:
            lines.append(f"{inner}{_field(field, package, maps, proto2, in_oneof=False)}")
    lines += _reserved(message.reserved_range, message.reserved_name, inner, end_inclusive=False)
    for nested in message.nested_type:
        if not nested.options.map_entry:
            lines += _message(nested, package, proto2, inner)
    for enum in message.enum_type:
        lines += _enum(enum, inner)
    lines.append(f"{indent}}}")
    return lines


def _field(
    field: _F, package: str, maps: dict[str, descriptor_pb2.DescriptorProto], proto2: bool, *, in_oneof: bool
) -> str:
    type_name = _type(field, package)
    entry = maps.get(field.type_name.rpartition(".")[2]) if field.type == _F.TYPE_MESSAGE else None
    if entry is not None and field.label == _F.LABEL_REPEATED:
        key, value = entry.field[0], entry.field[1]
        text = f"map<{_type(key, package)}, {_type(value, package)}> {field.name} = {field.number}"
    else:
        label = ""
        if field.label == _F.LABEL_REPEATED:
            label = "repeated "
        elif field.label == _F.LABEL_REQUIRED:
            label = "required "
        elif not in_oneof and (field.proto3_optional or proto2):
            label = "optional "
        text = f"{label}{type_name} {field.name} = {field.number}"
    options = []
    if field.json_name and field.json_name != _default_json_name(field.name):
        options.append(f'json_name = "{field.json_name}"')
    if field.HasField("default_value"):
        quoted = field.type in (_F.TYPE_STRING, _F.TYPE_BYTES)
        options.append(f'default = "{field.default_value}"' if quoted else f"default = {field.default_value}")
    if field.options.HasField("packed"):
        options.append(f"packed = {'true' if field.options.packed else 'false'}")
    return text + (f" [{', '.join(options)}]" if options else "") + ";"


def _type(field: _F, package: str) -> str:
    if field.type in (_F.TYPE_MESSAGE, _F.TYPE_ENUM, _F.TYPE_GROUP):
        name = field.type_name.lstrip(".")
        return name[len(package) + 1 :] if package and name.startswith(package + ".") else name
    return _F.Type.Name(field.type).removeprefix("TYPE_").lower()


def _enum(enum: descriptor_pb2.EnumDescriptorProto, indent: str) -> list[str]:
    lines = [f"{indent}enum {enum.name} {{"]
    lines += [f"{indent}  {value.name} = {value.number};" for value in enum.value]
    lines += _reserved(enum.reserved_range, enum.reserved_name, indent + "  ", end_inclusive=True)
    lines.append(f"{indent}}}")
    return lines


def _reserved(ranges: Iterable[Any], names: Iterable[str], indent: str, *, end_inclusive: bool) -> list[str]:
    parts = []
    for r in ranges:
        last = r.end if end_inclusive else r.end - 1
        if last == r.start:
            parts.append(str(r.start))
        else:
            parts.append(f"{r.start} to {'max' if last >= _MAX_FIELD else last}")
    lines = [f"{indent}reserved {', '.join(parts)};"] if parts else []
    quoted = [f'"{name}"' for name in names]
    if quoted:
        lines.append(f"{indent}reserved {', '.join(quoted)};")
    return lines


def _default_json_name(name: str) -> str:
    parts = name.split("_")
    return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])


__all__ = ["render_file", "render_task_type"]
