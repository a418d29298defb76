"""Whether a task type's new messages may replace its registered ones: buf breaking's WIRE_JSON rules.

Pure: it compares two contracts (each an input and an output message descriptor, from their own
pools) over the input and output messages and every message and enum their fields reach, and lists
each difference as a `Change`, breaking or not. No changes at all means the same contract (comments,
options and messages nothing reaches do not count), so registering it again is a no-op.

The rules, each breaking unless said otherwise (README "Task types as contracts" has the table):
- the input or output message is renamed (a payload's type URL names it);
- a field is removed without reserving its number (wire) and its name (JSON);
- a field's name or JSON name changes (ProtoJSON reads and writes names);
- a field's type changes, except within the groups that read each other on the wire and in
  JSON: int32/int64/uint32/uint64, sint32/sint64, fixed32/sfixed32, fixed64/sfixed64 (values out of
  the narrower range are truncated); a message or enum field naming another message or enum;
- a field's cardinality changes (singular, repeated, map, required), or a required field is added;
- a field moves into, out of or between oneofs;
- a proto2 default value changes;
- an enum value is removed without reserving its number and name, or a number gets another name;
- a reserved number or name is no longer reserved.
Adding fields, enum values and reservations, and the compatible type changes above, are not breaking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

_Proto = descriptor_pb2.FieldDescriptorProto

# Scalar types that read each other's values on the wire and in ProtoJSON (whose parsers accept
# integers as numbers or strings). string/bytes (base64 in JSON), bool and enums stand alone.
_COMPATIBLE_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"int32", "int64", "uint32", "uint64"}),
    frozenset({"sint32", "sint64"}),
    frozenset({"fixed32", "sfixed32"}),
    frozenset({"fixed64", "sfixed64"}),
)


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: where (`input_type:pkg.Message.field`), what, and whether it breaks readers."""

    path: str
    description: str
    breaking: bool

    def __str__(self) -> str:
        return f"{self.path}: {self.description}"


@dataclass
class _Walk:
    changes: list[Change] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add(self, path: str, description: str, breaking: bool) -> None:
        self.changes.append(Change(path, description, breaking))


def compare(old: tuple[Descriptor, Descriptor], new: tuple[Descriptor, Descriptor]) -> list[Change]:
    """Every difference from the (input, output) messages `old` to `new`, in a stable order.

    Never raises; an empty list means the same contract.
    """
    walk = _Walk()
    for side, before, after in (("input_type", old[0], new[0]), ("output_type", old[1], new[1])):
        if before.full_name != after.full_name:
            walk.add(
                side,
                f"message renamed from {before.full_name} to {after.full_name} (a payload's type URL names it)",
                True,
            )
            continue
        _message(walk, side, before, after)
    return walk.changes


def breaking(changes: Iterable[Change]) -> list[Change]:
    return [c for c in changes if c.breaking]


def _message(walk: _Walk, side: str, old: Descriptor, new: Descriptor) -> None:
    # One visit per message: a type reached from both sides or recursively is compared once.
    if old.full_name in walk.seen:
        return
    walk.seen.add(old.full_name)
    where = f"{side}:{old.full_name}"
    old_proto, new_proto = _proto_of(old), _proto_of(new)
    old_fields = {f.number: f for f in old.fields}
    new_fields = {f.number: f for f in new.fields}
    new_ranges = [(r.start, r.end) for r in new_proto.reserved_range]  # end exclusive
    old_ranges = [(r.start, r.end) for r in old_proto.reserved_range]
    for number, before in sorted(old_fields.items()):
        path = f"{where}.{before.name}"
        after = new_fields.get(number)
        if after is None:
            missing = _unreserved(number, before.name, new_ranges, new_proto.reserved_name)
            if missing:
                walk.add(path, f"field {number} removed without reserving its {missing}", True)
            else:
                walk.add(path, f"field {number} removed; its number and name are reserved", False)
            continue
        _field(walk, side, path, before, after, _field_proto(old_proto, number), _field_proto(new_proto, number))
    for number, after in sorted(new_fields.items()):
        if number in old_fields:
            continue
        path = f"{where}.{after.name}"
        if after.is_required:
            walk.add(path, f"required field {number} added (old writers do not send it)", True)
        else:
            walk.add(path, f"field {number} ({_type_name(after)}) added", False)
    for start, end in _uncovered(old_ranges, new_ranges):
        numbers = str(start) if end - start == 1 else f"{start} to {end - 1}"
        walk.add(where, f"reserved number {numbers} is no longer reserved", True)
    for name in sorted(set(old_proto.reserved_name) - set(new_proto.reserved_name)):
        walk.add(where, f"reserved name {name} is no longer reserved", True)
    if (set(new_proto.reserved_name) > set(old_proto.reserved_name)) or _uncovered(new_ranges, old_ranges):
        walk.add(where, "reservations added", False)


def _field(
    walk: _Walk,
    side: str,
    path: str,
    old: FieldDescriptor,
    new: FieldDescriptor,
    old_proto: _Proto,
    new_proto: _Proto,
) -> None:
    number = old.number
    if old.name != new.name:
        walk.add(path, f"field {number} renamed to {new.name} (ProtoJSON uses the name)", True)
    elif old.json_name != new.json_name:
        walk.add(path, f"field {number}'s JSON name changed from {old.json_name} to {new.json_name}", True)
    old_card, new_card = _cardinality(old), _cardinality(new)
    if old_card != new_card:
        walk.add(path, f"field {number} changed from {old_card} to {new_card}", True)
    elif old_proto.proto3_optional != new_proto.proto3_optional:
        presence = "now tracks presence (optional)" if new_proto.proto3_optional else "no longer tracks presence"
        walk.add(path, f"field {number} {presence}", False)
    old_oneof, new_oneof = _oneof(old, old_proto), _oneof(new, new_proto)
    if old_oneof != new_oneof:
        before = f"oneof {old_oneof}" if old_oneof else "no oneof"
        after = f"oneof {new_oneof}" if new_oneof else "no oneof"
        walk.add(path, f"field {number} moved from {before} to {after}", True)
    old_type, new_type = _type_name(old), _type_name(new)
    if old_type != new_type:
        if any(old_type in group and new_type in group for group in _COMPATIBLE_GROUPS):
            walk.add(path, f"field {number}'s type changed from {old_type} to {new_type} (compatible)", False)
        else:
            walk.add(path, f"field {number}'s type changed from {old_type} to {new_type}", True)
    elif old.message_type is not None and new.message_type is not None:
        _message(walk, side, old.message_type, new.message_type)
    elif old.enum_type is not None and new.enum_type is not None:
        _enum(walk, side, old.enum_type, new.enum_type)
    if (old.has_default_value or new.has_default_value) and old_proto.default_value != new_proto.default_value:
        walk.add(
            path,
            f"field {number}'s default changed from {old_proto.default_value or '(none)'}"
            f" to {new_proto.default_value or '(none)'}",
            True,
        )


def _enum(walk: _Walk, side: str, old: EnumDescriptor, new: EnumDescriptor) -> None:
    if old.full_name in walk.seen:
        return
    walk.seen.add(old.full_name)
    where = f"{side}:{old.full_name}"
    old_proto, new_proto = _enum_proto_of(old), _enum_proto_of(new)
    # Enum reserved ranges include their end; made exclusive here like a message's.
    old_ranges = [(r.start, r.end + 1) for r in old_proto.reserved_range]
    new_ranges = [(r.start, r.end + 1) for r in new_proto.reserved_range]
    new_names: dict[int, set[str]] = {}
    for value in new.values:
        new_names.setdefault(value.number, set()).add(value.name)
    old_numbers = {value.number for value in old.values}
    for value in old.values:
        path = f"{where}.{value.name}"
        if value.number not in new_names:
            missing = _unreserved(value.number, value.name, new_ranges, new_proto.reserved_name)
            if missing:
                walk.add(path, f"value {value.number} removed without reserving its {missing}", True)
            else:
                walk.add(path, f"value {value.number} removed; its number and name are reserved", False)
        elif value.name not in new_names[value.number]:
            renamed = ", ".join(sorted(new_names[value.number]))
            walk.add(path, f"value {value.number} renamed to {renamed} (ProtoJSON uses the name)", True)
    for value in new.values:
        if value.number not in old_numbers:
            walk.add(f"{where}.{value.name}", f"value {value.number} added", False)
    for start, end in _uncovered(old_ranges, new_ranges):
        numbers = str(start) if end - start == 1 else f"{start} to {end - 1}"
        walk.add(where, f"reserved number {numbers} is no longer reserved", True)
    for name in sorted(set(old_proto.reserved_name) - set(new_proto.reserved_name)):
        walk.add(where, f"reserved name {name} is no longer reserved", True)
    if (set(new_proto.reserved_name) > set(old_proto.reserved_name)) or _uncovered(new_ranges, old_ranges):
        walk.add(where, "reservations added", False)


def _unreserved(number: int, name: str, ranges: list[tuple[int, int]], names: Iterable[str]) -> str:
    """What of a removed field or value is not reserved: "number", "name", "number and name" or ""."""
    number_ok = any(start <= number < end for start, end in ranges)
    name_ok = name in set(names)
    return " and ".join(part for part, ok in (("number", number_ok), ("name", name_ok)) if not ok)


def _uncovered(ranges: list[tuple[int, int]], cover: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `ranges` (end exclusive) that no range of `cover` contains."""
    left: list[tuple[int, int]] = []
    merged = sorted(cover)
    for start, end in sorted(ranges):
        cursor = start
        for c_start, c_end in merged:
            if c_end <= cursor or c_start >= end:
                continue
            if c_start > cursor:
                left.append((cursor, c_start))
            cursor = max(cursor, c_end)
            if cursor >= end:
                break
        if cursor < end:
            left.append((cursor, end))
    return left


def _cardinality(f: FieldDescriptor) -> str:
    if f.is_required:
        return "required"
    if f.is_repeated:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            return "map"
        return "repeated"
    return "singular"


def _oneof(f: FieldDescriptor, proto: _Proto) -> str:
    """The real oneof holding the field, or "" (proto3 optional's synthetic oneof does not count)."""
    if f.containing_oneof is None or proto.proto3_optional:
        return ""
    return str(f.containing_oneof.name)


def _type_name(f: FieldDescriptor) -> str:
    if f.type == FieldDescriptor.TYPE_GROUP and f.message_type is not None:
        return f"group {f.message_type.full_name}"
    if f.message_type is not None:
        if f.message_type.GetOptions().map_entry:
            key, value = f.message_type.fields_by_number[1], f.message_type.fields_by_number[2]
            return f"map<{_type_name(key)}, {_type_name(value)}>"
        return str(f.message_type.full_name)
    if f.enum_type is not None:
        return str(f.enum_type.full_name)
    return _Proto.Type.Name(f.type).removeprefix("TYPE_").lower()  # type: ignore[arg-type]


def _proto_of(message: Descriptor) -> descriptor_pb2.DescriptorProto:
    proto = descriptor_pb2.DescriptorProto()
    message.CopyToProto(proto)
    return proto


def _enum_proto_of(enum: EnumDescriptor) -> descriptor_pb2.EnumDescriptorProto:
    proto = descriptor_pb2.EnumDescriptorProto()
    enum.CopyToProto(proto)
    return proto


def _field_proto(message: descriptor_pb2.DescriptorProto, number: int) -> _Proto:
    for proto in message.field:
        if proto.number == number:
            return proto
    return _Proto()


__all__ = ["Change", "breaking", "compare"]
