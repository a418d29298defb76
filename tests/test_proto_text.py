"""A task type's messages rendered as .proto text: what `herder types get` shows compiles back to the same contract."""

from __future__ import annotations

import pytest
from _protos import task_type

from herder.clients.proto_text import render_task_type
from herder.server.contracts import TaskTypeRegistry

pytestmark = pytest.mark.timeout(30)

RICH = """syntax = "proto3";
package img.v1;
import "google/protobuf/duration.proto";

message In {
  int32 width = 1;
  optional string name = 2;
  repeated string tags = 3;
  Mode mode = 4;
  map<string, int64> sizes = 5;
  oneof target { string path = 6; Size box = 7; }
  google.protobuf.Duration timeout = 8;
  int32 camel_case = 21 [json_name = "cc"];
  reserved 9, 11 to 20;
  reserved "old";
  message Size { int32 w = 1; Mode mode = 2; }
}
enum Mode { MODE_UNSPECIFIED = 0; MODE_FAST = 1; reserved 5; reserved "MODE_SLOW"; }
message Out { bytes data = 1; repeated In.Size boxes = 2; }
"""


def test_rendered_text_compiles_back_to_the_same_contract() -> None:
    original = task_type(RICH)

    text = render_task_type(original)

    registry = TaskTypeRegistry()
    registry.put(original)
    assert registry.changes(task_type(text.replace("// contract.proto\n", ""))) == []


def test_rendered_text_reads_like_the_source() -> None:
    text = render_task_type(task_type(RICH))

    assert "  map<string, int64> sizes = 5;\n" in text
    assert "  oneof target {\n    string path = 6;\n    In.Size box = 7;\n  }\n" in text
    assert '  int32 camel_case = 21 [json_name = "cc"];\n' in text
    assert "  reserved 9, 11 to 20;\n" in text
    assert 'google/protobuf/duration.proto";\n' in text
    assert "message Duration" not in text  # well-known files are imported, not shown


def test_proto2_labels_and_defaults_are_rendered() -> None:
    source = (
        'syntax = "proto2";\npackage img.v1;\n'
        'message In { required int32 width = 1; optional string name = 2 [default = "x"]; }\n'
        "message Out { optional bytes data = 1; }\n"
    )

    text = render_task_type(task_type(source))

    assert "  required int32 width = 1;\n" in text
    assert '  optional string name = 2 [default = "x"];\n' in text
