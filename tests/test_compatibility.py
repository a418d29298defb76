"""Contract evolution: one test per compatibility rule (buf breaking's WIRE_JSON), accepted and refused.

Pure: each test compiles two small .proto texts and compares them as a registration would.
"""

from __future__ import annotations

import pytest
from _protos import task_type

from herder.server.compatibility import Change
from herder.server.contracts import TaskTypeRegistry

pytestmark = pytest.mark.timeout(30)

HEAD = 'syntax = "proto3";\npackage img.v1;\n'
OUT = "message Out { bytes data = 1; }\n"


def _changes(old: str, new: str, *, input_type: str = "img.v1.In", head: str = HEAD) -> list[Change]:
    registry = TaskTypeRegistry()
    registry.put(task_type(head + old))
    changes = registry.changes(task_type(head + new, input_type=input_type))
    assert changes is not None
    return changes


def _breaking(old: str, new: str, **kwargs: str) -> list[str]:
    return [str(c) for c in _changes(old, new, **kwargs) if c.breaking]


def _accepted(old: str, new: str, **kwargs: str) -> list[str]:
    changes = _changes(old, new, **kwargs)
    assert not [c for c in changes if c.breaking], changes
    return [str(c) for c in changes]


# --- same contract: no-op ------------------------------------------------------


def test_the_same_messages_are_no_change_even_reordered_and_commented() -> None:
    old = "message In { int32 width = 1; string name = 2; }\n" + OUT
    new = (
        OUT + "// resized images\nmessage In {\n  string name = 2; // shown\n  int32 width = 1;\n}\nmessage Unused {}\n"
    )

    assert _changes(old, new) == []


# --- message renamed -------------------------------------------------------------


def test_renaming_the_input_message_is_refused() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = "message Input { int32 width = 1; }\n" + OUT

    assert _breaking(old, new, input_type="img.v1.Input") == [
        "input_type: message renamed from img.v1.In to img.v1.Input (a payload's type URL names it)"
    ]


# --- fields added --------------------------------------------------------------------


def test_adding_a_field_is_accepted() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = "message In { int32 width = 1; int32 height = 2; }\n" + OUT

    assert _accepted(old, new) == ["input_type:img.v1.In.height: field 2 (int32) added"]


def test_adding_a_required_field_is_refused() -> None:
    head = 'syntax = "proto2";\npackage img.v1;\n'
    out = "message Out { optional bytes data = 1; }\n"
    old = "message In { optional int32 width = 1; }\n" + out
    new = "message In { optional int32 width = 1; required int32 height = 2; }\n" + out

    assert _breaking(old, new, head=head) == [
        "input_type:img.v1.In.height: required field 2 added (old writers do not send it)"
    ]


# --- fields removed ---------------------------------------------------------------------


def test_removing_a_field_with_its_number_and_name_reserved_is_accepted() -> None:
    old = "message In { int32 width = 1; string name = 2; }\n" + OUT
    new = 'message In { int32 width = 1; reserved 2; reserved "name"; }\n' + OUT

    assert "input_type:img.v1.In.name: field 2 removed; its number and name are reserved" in _accepted(old, new)


@pytest.mark.parametrize(
    ("reserved", "missing"),
    [("", "number and name"), ("reserved 2;", "name"), ('reserved "name";', "number")],
)
def test_removing_a_field_without_reserving_number_and_name_is_refused(reserved: str, missing: str) -> None:
    old = "message In { int32 width = 1; string name = 2; }\n" + OUT
    new = f"message In {{ int32 width = 1; {reserved} }}\n" + OUT

    assert _breaking(old, new) == [f"input_type:img.v1.In.name: field 2 removed without reserving its {missing}"]


def test_reusing_a_reserved_number_is_refused() -> None:
    old = "message In { int32 width = 1; reserved 2 to 4; }\n" + OUT
    new = "message In { int32 width = 1; reserved 2, 4; string name = 3; }\n" + OUT

    assert _breaking(old, new) == ["input_type:img.v1.In: reserved number 3 is no longer reserved"]


# --- names ---------------------------------------------------------------------------------


def test_renaming_a_field_is_refused() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = "message In { int32 w = 1; }\n" + OUT

    assert _breaking(old, new) == ["input_type:img.v1.In.width: field 1 renamed to w (ProtoJSON uses the name)"]


def test_changing_a_json_name_is_refused() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = 'message In { int32 width = 1 [json_name = "wide"]; }\n' + OUT

    assert _breaking(old, new) == ["input_type:img.v1.In.width: field 1's JSON name changed from width to wide"]


# --- types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old_type", "new_type"),
    [
        ("int32", "int64"),
        ("uint64", "uint32"),
        ("int32", "uint32"),
        ("sint32", "sint64"),
        ("fixed32", "sfixed32"),
        ("sfixed64", "fixed64"),
    ],
)
def test_a_wire_and_json_compatible_type_change_is_accepted(old_type: str, new_type: str) -> None:
    old = f"message In {{ {old_type} size = 1; }}\n" + OUT
    new = f"message In {{ {new_type} size = 1; }}\n" + OUT

    assert _accepted(old, new) == [
        f"input_type:img.v1.In.size: field 1's type changed from {old_type} to {new_type} (compatible)"
    ]


@pytest.mark.parametrize(
    ("old_type", "new_type"),
    [
        ("int32", "string"),
        ("string", "bytes"),
        ("bool", "int32"),
        ("int32", "sint32"),
        ("Mode", "int32"),
        ("int64", "double"),
        ("Size", "Other"),
    ],
)
def test_an_incompatible_type_change_is_refused(old_type: str, new_type: str) -> None:
    types = "enum Mode { MODE_UNSPECIFIED = 0; }\nmessage Size { int32 w = 1; }\nmessage Other { int32 w = 1; }\n"
    old = f"message In {{ {old_type} size = 1; }}\n" + OUT + types
    new = f"message In {{ {new_type} size = 1; }}\n" + OUT + types

    full = {"Mode": "img.v1.Mode", "Size": "img.v1.Size", "Other": "img.v1.Other"}
    assert _breaking(old, new) == [
        f"input_type:img.v1.In.size: field 1's type changed from {full.get(old_type, old_type)}"
        f" to {full.get(new_type, new_type)}"
    ]


def test_changes_in_a_nested_message_are_found() -> None:
    old = "message In { Size size = 1; }\nmessage Size { int32 w = 1; }\n" + OUT
    new = "message In { Size size = 1; }\nmessage Size { string w = 1; int32 h = 2; }\n" + OUT

    changes = [str(c) for c in _changes(old, new)]

    assert changes == [
        "input_type:img.v1.Size.w: field 1's type changed from int32 to string",
        "input_type:img.v1.Size.h: field 2 (int32) added",
    ]


def test_the_output_message_is_checked_too() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = "message In { int32 width = 1; }\nmessage Out { string data = 1; }\n"

    assert _breaking(old, new) == ["output_type:img.v1.Out.data: field 1's type changed from bytes to string"]


# --- cardinality -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old_field", "new_field", "change"),
    [
        ("string tags = 1;", "repeated string tags = 1;", "singular to repeated"),
        ("repeated string tags = 1;", "string tags = 1;", "repeated to singular"),
        ("map<string, string> tags = 1;", "repeated Entry tags = 1;", "map to repeated"),
    ],
)
def test_a_cardinality_change_is_refused(old_field: str, new_field: str, change: str) -> None:
    entry = "message Entry { string key = 1; string value = 2; }\n"
    old = f"message In {{ {old_field} }}\n" + OUT + entry
    new = f"message In {{ {new_field} }}\n" + OUT + entry

    assert f"input_type:img.v1.In.tags: field 1 changed from {change}" in _breaking(old, new)


def test_tracking_presence_with_optional_is_accepted() -> None:
    old = "message In { int32 width = 1; }\n" + OUT
    new = "message In { optional int32 width = 1; }\n" + OUT

    assert _accepted(old, new) == ["input_type:img.v1.In.width: field 1 now tracks presence (optional)"]


# --- oneofs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old_body", "new_body", "move"),
    [
        ("int32 width = 1;", "oneof size { int32 width = 1; }", "no oneof to oneof size"),
        ("oneof size { int32 width = 1; }", "int32 width = 1;", "oneof size to no oneof"),
        ("oneof size { int32 width = 1; }", "oneof dims { int32 width = 1; }", "oneof size to oneof dims"),
    ],
)
def test_moving_a_field_into_out_of_or_between_oneofs_is_refused(old_body: str, new_body: str, move: str) -> None:
    old = f"message In {{ {old_body} }}\n" + OUT
    new = f"message In {{ {new_body} }}\n" + OUT

    assert _breaking(old, new) == [f"input_type:img.v1.In.width: field 1 moved from {move}"]


def test_adding_a_field_to_an_existing_oneof_is_accepted() -> None:
    old = "message In { oneof size { int32 width = 1; } }\n" + OUT
    new = "message In { oneof size { int32 width = 1; int32 height = 2; } }\n" + OUT

    assert _accepted(old, new) == ["input_type:img.v1.In.height: field 2 (int32) added"]


# --- proto2 defaults --------------------------------------------------------------------------------------


def test_changing_a_default_is_refused() -> None:
    head = 'syntax = "proto2";\npackage img.v1;\n'
    out = "message Out { optional bytes data = 1; }\n"
    old = "message In { optional int32 width = 1 [default = 10]; }\n" + out
    new = "message In { optional int32 width = 1 [default = 20]; }\n" + out

    assert _breaking(old, new, head=head) == ["input_type:img.v1.In.width: field 1's default changed from 10 to 20"]


# --- enums --------------------------------------------------------------------------------------------------

ENUM_OLD = "message In { Mode mode = 1; }\n" + OUT + "enum Mode { MODE_UNSPECIFIED = 0; MODE_FAST = 1; }\n"


def test_adding_an_enum_value_is_accepted() -> None:
    new = ENUM_OLD.replace("MODE_FAST = 1;", "MODE_FAST = 1; MODE_SLOW = 2;")

    assert _accepted(ENUM_OLD, new) == ["input_type:img.v1.Mode.MODE_SLOW: value 2 added"]


def test_removing_an_enum_value_with_number_and_name_reserved_is_accepted() -> None:
    new = ENUM_OLD.replace("MODE_FAST = 1;", 'reserved 1; reserved "MODE_FAST";')

    assert "input_type:img.v1.Mode.MODE_FAST: value 1 removed; its number and name are reserved" in _accepted(
        ENUM_OLD, new
    )


def test_removing_an_enum_value_without_reserving_it_is_refused() -> None:
    new = ENUM_OLD.replace("MODE_FAST = 1;", "reserved 1;")

    assert _breaking(ENUM_OLD, new) == ["input_type:img.v1.Mode.MODE_FAST: value 1 removed without reserving its name"]


def test_renaming_an_enum_value_is_refused() -> None:
    new = ENUM_OLD.replace("MODE_FAST = 1;", "MODE_QUICK = 1;")

    assert _breaking(ENUM_OLD, new) == [
        "input_type:img.v1.Mode.MODE_FAST: value 1 renamed to MODE_QUICK (ProtoJSON uses the name)"
    ]


def test_unreserving_an_enum_number_is_refused() -> None:
    old = ENUM_OLD.replace("MODE_FAST = 1;", "MODE_FAST = 1; reserved 5 to 6;")
    new = ENUM_OLD.replace("MODE_FAST = 1;", "MODE_FAST = 1; MODE_SLOW = 5; reserved 6;")

    assert _breaking(old, new) == ["input_type:img.v1.Mode: reserved number 5 is no longer reserved"]
