"""Descriptor sets compiled from small .proto texts, in-process with grpcio-tools' protoc."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc_tools
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_tools import protoc

from herder.clients.proto.v1 import task_pb2

_INCLUDE = str(Path(grpc_tools.__file__).parent / "_proto")


def descriptor_set(text: str, name: str = "contract.proto") -> descriptor_pb2.FileDescriptorSet:
    """The FileDescriptorSet of one .proto file's text and its imports; AssertionError naming protoc's complaint."""
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / name
        source.write_text(text)
        out = Path(directory) / "set.pb"
        code = protoc.main(
            ["protoc", f"-I{directory}", f"-I{_INCLUDE}", "--include_imports", f"--descriptor_set_out={out}", name]
        )
        assert code == 0, f"protoc failed on:\n{text}"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def task_type(
    text: str, *, name: str = "images.resize", input_type: str = "img.v1.In", output_type: str = "img.v1.Out"
) -> task_pb2.TaskType:
    """A TaskType whose messages are defined by `text` (package img.v1 by default)."""
    return task_pb2.TaskType(
        name=name, input_type=input_type, output_type=output_type, descriptors=descriptor_set(text)
    )


def message_classes(
    text: str, input_type: str = "img.v1.In", output_type: str = "img.v1.Out"
) -> tuple[type[Message], type[Message]]:
    """The input and output message classes of `text`, from a pool of their own (so two versions of
    the same messages live side by side in one process)."""
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_set(text).file:
        pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(input_type)),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(output_type)),
    )
