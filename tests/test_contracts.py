"""Typed contracts: payloads are checked against, and JSON encoded with, the registered descriptors."""

from __future__ import annotations

import json

import pytest
from google.protobuf import any_pb2, descriptor_pb2, duration_pb2, empty_pb2, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import FileDescriptor

from herder.clients import errors
from herder.clients.descriptors import descriptor_set_for, task_type_for
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.proto.v1 import task_pb2
from herder.server.contracts import TaskTypeRegistry, contract_violations, render_json, resolve_payload

pytestmark = pytest.mark.timeout(30)

ECHO_REQUEST = "herder.examples.v1.EchoRequest"


@pytest.fixture
def registry() -> TaskTypeRegistry:
    registry = TaskTypeRegistry()
    registry.put(task_type_for("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse))
    registry.put(task_type_for("examples.sleep", examples_pb2.SleepRequest, examples_pb2.SleepResponse))
    return registry


def _packed(message: examples_pb2.EchoRequest | examples_pb2.SleepRequest) -> any_pb2.Any:
    value = any_pb2.Any()
    value.Pack(message)
    return value


def _resolve(registry: TaskTypeRegistry, spec: task_pb2.TaskSpec, *, accept_unregistered: bool = False) -> list[str]:
    """`field: description` of each violation, for readable assertions."""
    return [
        f"{v.field}: {v.description}" for v in resolve_payload(spec, registry, accept_unregistered=accept_unregistered)
    ]


# --- JSON payloads -----------------------------------------------------------


def test_json_payload_is_encoded_with_the_registered_input_type(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload_json='{"text": "hi", "attributes": {"k": "v"}}')

    assert _resolve(registry, spec) == []

    assert spec.payload_json == ""
    assert spec.payload.type_url == f"type.googleapis.com/{ECHO_REQUEST}"
    request = examples_pb2.EchoRequest()
    assert spec.payload.Unpack(request)
    assert request == examples_pb2.EchoRequest(text="hi", attributes={"k": "v"})


def test_json_with_well_known_types_is_encoded(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.sleep", payload_json='{"duration": "1.5s", "steps": 3}')

    assert _resolve(registry, spec) == []

    request = examples_pb2.SleepRequest()
    assert spec.payload.Unpack(request)
    assert request.duration == duration_pb2.Duration(seconds=1, nanos=500_000_000)
    assert request.steps == 3


def test_json_with_an_unknown_field_names_the_field(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload_json='{"txt": "hi"}')

    violations = resolve_payload(spec, registry, accept_unregistered=False)

    assert [v.field for v in violations] == ["spec.payload_json"]
    assert '"txt"' in violations[0].description
    assert "known fields: text, attributes" in violations[0].description
    assert "\n" not in violations[0].description
    assert spec.payload_json == '{"txt": "hi"}' and not spec.HasField("payload")


@pytest.mark.parametrize(
    ("task_type", "payload_json", "field_name"),
    [
        ("examples.echo", '{"text": 5}', "text"),
        ("examples.sleep", '{"steps": "many"}', "steps"),
        ("examples.sleep", '{"steps": -1}', "steps"),
        ("examples.sleep", '{"duration": "soon"}', "duration"),
    ],
)
def test_json_of_the_wrong_type_names_the_field(
    registry: TaskTypeRegistry, task_type: str, payload_json: str, field_name: str
) -> None:
    spec = task_pb2.TaskSpec(type=task_type, payload_json=payload_json)

    [violation] = resolve_payload(spec, registry, accept_unregistered=False)

    assert violation.field == "spec.payload_json"
    assert violation.description.startswith("does not match herder.examples.v1.")
    assert field_name in violation.description
    assert spec.payload_json == payload_json


@pytest.mark.parametrize(
    ("payload_json", "expected"),
    [
        ("{not json", "is not valid JSON"),
        ('["hi"]', "must be a JSON object for herder.examples.v1.EchoRequest, got an array"),
        ('{"text": "a", "text": "b"}', "is not valid JSON: duplicate key text"),
        ("[" * 100_000, "is not valid JSON: nested too deeply"),
    ],
)
def test_json_that_is_not_an_object_is_rejected(registry: TaskTypeRegistry, payload_json: str, expected: str) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload_json=payload_json)

    [violation] = _resolve(registry, spec)

    assert violation.startswith(f"spec.payload_json: {expected}")


def test_json_for_an_unregistered_type_cannot_be_encoded(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="images.resize", payload_json='{"width": 10}')

    [violation] = _resolve(registry, spec, accept_unregistered=True)

    assert violation.startswith("spec.payload_json: task type 'images.resize' is not registered")


def test_payload_and_payload_json_together_are_rejected(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(
        type="examples.echo", payload=_packed(examples_pb2.EchoRequest(text="a")), payload_json='{"text": "b"}'
    )

    assert _resolve(registry, spec) == ["spec.payload_json: set either payload or payload_json, not both"]


# --- Any payloads ------------------------------------------------------------


def test_any_of_the_registered_input_type_passes_unchanged(registry: TaskTypeRegistry) -> None:
    payload = _packed(examples_pb2.EchoRequest(text="hi"))
    spec = task_pb2.TaskSpec(type="examples.echo", payload=payload)

    assert _resolve(registry, spec) == []
    assert spec.payload == payload


def test_any_of_another_type_is_rejected_with_expected_and_got(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload=_packed(examples_pb2.SleepRequest(steps=2)))

    assert _resolve(registry, spec) == [
        "spec.payload: expected a herder.examples.v1.EchoRequest, got herder.examples.v1.SleepRequest"
    ]


def test_any_whose_bytes_do_not_parse_is_rejected(registry: TaskTypeRegistry) -> None:
    # Field 1 claims 5 bytes of text but only 2 follow.
    payload = any_pb2.Any(type_url=f"type.googleapis.com/{ECHO_REQUEST}", value=b"\x0a\x05ab")
    spec = task_pb2.TaskSpec(type="examples.echo", payload=payload)

    [violation] = _resolve(registry, spec)

    assert violation.startswith(f"spec.payload: is not a valid {ECHO_REQUEST}")


def test_no_payload_becomes_an_empty_input_message(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo")

    assert _resolve(registry, spec) == []

    assert spec.payload.type_url == f"type.googleapis.com/{ECHO_REQUEST}"
    assert spec.payload.value == b""


def test_unregistered_type_is_rejected_unless_accepted(registry: TaskTypeRegistry) -> None:
    payload = _packed(examples_pb2.EchoRequest(text="hi"))
    spec = task_pb2.TaskSpec(type="images.resize", payload=payload)

    assert _resolve(registry, spec) == ["spec.type: task type 'images.resize' is not registered"]
    assert _resolve(registry, spec, accept_unregistered=True) == []
    assert spec.payload == payload


def test_violation_paths_use_the_callers_prefix(registry: TaskTypeRegistry) -> None:
    spec = task_pb2.TaskSpec(type="examples.echo", payload=_packed(examples_pb2.SleepRequest()))

    violations = resolve_payload(spec, registry, accept_unregistered=False, prefix="specs[3]")

    assert [v.field for v in violations] == ["specs[3].payload"]


# --- The registry and descriptors ---------------------------------------------


def test_registry_lists_copies_sorted_by_name(registry: TaskTypeRegistry) -> None:
    registry.put(task_type_for("a.first", empty_pb2.Empty, empty_pb2.Empty))

    assert [t.name for t in registry.all()] == ["a.first", "examples.echo", "examples.sleep"]
    assert "examples.echo" in registry and "nope" not in registry
    assert registry.get("nope") is None
    echo = registry.get("examples.echo")
    assert echo is not None and echo.input_type == ECHO_REQUEST
    echo.input_type = "changed"
    assert registry.get("examples.echo") == task_type_for(
        "examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse
    )


def test_registering_again_replaces_the_contract(registry: TaskTypeRegistry) -> None:
    registry.put(task_type_for("examples.echo", wrappers_pb2.StringValue, wrappers_pb2.StringValue))

    spec = task_pb2.TaskSpec(type="examples.echo", payload_json='{"text": "hi"}')
    [violation] = _resolve(registry, spec)
    assert "google.protobuf.StringValue" in violation
    assert len(registry) == 2


def test_discard_forgets_a_type(registry: TaskTypeRegistry) -> None:
    registry.discard("examples.echo")
    registry.discard("examples.echo")

    assert "examples.echo" not in registry
    assert registry.input_class("examples.echo") is None


def test_well_known_imports_may_be_left_out_of_the_set(registry: TaskTypeRegistry) -> None:
    task_type = task_type_for("sleep.bare", examples_pb2.SleepRequest, examples_pb2.SleepResponse)
    del task_type.descriptors.file[:]
    _add_file(task_type, examples_pb2.DESCRIPTOR)

    registry.put(task_type)

    spec = task_pb2.TaskSpec(type="sleep.bare", payload_json='{"duration": "2s"}')
    assert _resolve(registry, spec) == []


def test_files_may_come_in_any_order(registry: TaskTypeRegistry) -> None:
    task_type = task_type_for("task.copy", task_pb2.Task, task_pb2.Task)
    task_type.descriptors.file.reverse()

    registry.put(task_type)

    assert registry.input_class("task.copy") is not None


def test_each_type_has_its_own_pool() -> None:
    """Two services may register different versions of the same file under different types."""
    registry = TaskTypeRegistry()
    registry.put(task_type_for("examples.echo", examples_pb2.EchoRequest, examples_pb2.EchoResponse))
    newer = task_type_for("examples.echo2", examples_pb2.EchoRequest, examples_pb2.EchoResponse)
    echo_file = next(f for f in newer.descriptors.file if f.name.endswith("examples.proto"))
    request = next(m for m in echo_file.message_type if m.name == "EchoRequest")
    request.field.add(
        name="loud", number=99, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL, json_name="loud"
    ).label = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    registry.put(newer)

    old = task_pb2.TaskSpec(type="examples.echo", payload_json='{"loud": true}')
    new = task_pb2.TaskSpec(type="examples.echo2", payload_json='{"loud": true}')

    assert len(_resolve(registry, old)) == 1
    assert _resolve(registry, new) == []


def _add_file(task_type: task_pb2.TaskType, file: FileDescriptor) -> None:
    file.CopyToProto(task_type.descriptors.file.add())


def _file(name: str, *dependencies: str, messages: dict[str, str] | None = None) -> descriptor_pb2.FileDescriptorProto:
    """A proto3 file in package `test`; `messages` maps message name to the type name of its one field."""
    proto = descriptor_pb2.FileDescriptorProto(name=name, package="test", syntax="proto3", dependency=dependencies)
    for message, field_type in (messages or {}).items():
        proto.message_type.add(name=message).field.add(
            name="value",
            number=1,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
            type_name=field_type,
        )
    return proto


def _bad_type(*files: descriptor_pb2.FileDescriptorProto, input_type: str = "test.In") -> task_pb2.TaskType:
    return task_pb2.TaskType(
        name="test.bad",
        input_type=input_type,
        output_type="test.In",
        descriptors=descriptor_pb2.FileDescriptorSet(file=files),
    )


@pytest.mark.parametrize(
    ("task_type", "expected"),
    [
        (
            _bad_type(_file("a.proto", "b.proto", messages={"In": ".google.protobuf.Empty"})),
            "task_type.descriptors: a.proto imports b.proto, which is not in the set",
        ),
        (
            _bad_type(_file("a.proto", messages={"In": ".test.Missing"})),
            "task_type.descriptors: a.proto does not build: ",
        ),
        (
            _bad_type(_file("a.proto", "b.proto"), _file("b.proto", "a.proto")),
            "task_type.descriptors: import cycle among a.proto, b.proto",
        ),
        (
            _bad_type(
                _file("a.proto", "google/protobuf/empty.proto", messages={"In": ".google.protobuf.Empty"}),
                _file("a.proto"),
            ),
            "task_type.descriptors: file a.proto appears twice with different contents",
        ),
        (
            _bad_type(
                _file("a.proto", "google/protobuf/empty.proto", messages={"In": ".google.protobuf.Empty"}),
                input_type="test.Out",
            ),
            "task_type.input_type: message test.Out is not defined in task_type.descriptors",
        ),
        (
            _bad_type(input_type=""),
            "task_type.input_type: is required",
        ),
    ],
    ids=["missing-import", "does-not-build", "cycle", "duplicate-file", "input-not-defined", "no-input"],
)
def test_bad_descriptors_are_rejected_and_change_nothing(
    registry: TaskTypeRegistry, task_type: task_pb2.TaskType, expected: str
) -> None:
    before = registry.all()

    with pytest.raises(errors.InvalidArgumentError) as raised:
        registry.put(task_type)

    described = [f"{v.field}: {v.description}" for v in raised.value.violations]
    assert any(line.startswith(expected) for line in described), described
    assert described == [f"{v.field}: {v.description}" for v in contract_violations(task_type)]
    assert registry.all() == before


def test_a_good_type_built_by_hand_registers() -> None:
    good = _bad_type(_file("a.proto", "google/protobuf/empty.proto", messages={"In": ".google.protobuf.Empty"}))

    assert contract_violations(good) == []
    TaskTypeRegistry().put(good)


def test_a_type_without_a_name_is_rejected() -> None:
    task_type = task_type_for("", examples_pb2.EchoRequest, examples_pb2.EchoResponse)

    with pytest.raises(errors.InvalidArgumentError) as raised:
        TaskTypeRegistry().put(task_type)

    assert [v.field for v in raised.value.violations] == ["task_type.name"]


def test_descriptor_set_lists_each_file_once_after_its_imports() -> None:
    files = [f.name for f in descriptor_set_for(task_pb2.Task, examples_pb2.SleepRequest, task_pb2.TaskSpec).file]

    assert sorted(files) == sorted(set(files))
    assert files.index("google/protobuf/any.proto") < files.index("herder/v1/task.proto")
    assert files.index("google/protobuf/duration.proto") < files.index("herder/examples/v1/examples.proto")
    assert set(files) == {
        "google/protobuf/any.proto",
        "google/protobuf/descriptor.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/timestamp.proto",
        "herder/v1/task.proto",
        "herder/examples/v1/examples.proto",
    }


# --- Rendering results as JSON ---------------------------------------------------


def test_render_json_round_trips_an_encoded_payload(registry: TaskTypeRegistry) -> None:
    original = {"text": "héllo", "attributes": {"k": "v"}}
    spec = task_pb2.TaskSpec(type="examples.echo", payload_json=json.dumps(original))
    assert _resolve(registry, spec) == []

    rendered = render_json(spec.payload, registry)

    assert rendered == '{"text":"héllo","attributes":{"k":"v"}}'
    assert json.loads(rendered) == original


def test_render_json_uses_the_output_type_and_proto_field_names(registry: TaskTypeRegistry) -> None:
    result = any_pb2.Any()
    result.Pack(examples_pb2.SleepResponse(slept=duration_pb2.Duration(seconds=2)))

    assert render_json(result, registry, "examples.sleep") == '{"slept":"2s"}'


def test_render_json_of_well_known_types(registry: TaskTypeRegistry) -> None:
    value = any_pb2.Any()
    value.Pack(struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=1)}))

    assert render_json(value, registry) == '{"n":1.0}'


@pytest.mark.parametrize(
    "value",
    [
        any_pb2.Any(),
        any_pb2.Any(type_url="type.googleapis.com/images.v1.ResizeResponse", value=b"\x08\x01"),
        any_pb2.Any(type_url=f"type.googleapis.com/{ECHO_REQUEST}", value=b"\x0a\x05ab"),
    ],
    ids=["empty", "unknown-type", "bad-bytes"],
)
def test_render_json_is_empty_when_it_cannot_render(registry: TaskTypeRegistry, value: any_pb2.Any) -> None:
    assert render_json(value, registry, "examples.echo") == ""
