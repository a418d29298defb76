"""Descriptor sets for typed task contracts: the .proto files a task type's messages need.

A task type is registered with the `FileDescriptorSet` that defines its input and
output messages, so the coordinator (and grpcurl, the CLI, other languages) can
encode and decode them without the generated code at hand.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import cast

from google.protobuf import (
    any_pb2,
    api_pb2,
    descriptor_pb2,
    descriptor_pool,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    source_context_pb2,
    struct_pb2,
    timestamp_pb2,
    type_pb2,
    wrappers_pb2,
)
from google.protobuf.descriptor import Descriptor, FileDescriptor
from google.protobuf.message import Message

from herder.clients.errors import CLIENT_METADATA_KEY
from herder.clients.proto.v1 import task_pb2

MessageType = type[Message] | Descriptor

# Files a descriptor set may import without including them: every protobuf runtime has them.
WELL_KNOWN_FILES: dict[str, FileDescriptor] = {
    module.DESCRIPTOR.name: module.DESCRIPTOR
    for module in (
        any_pb2,
        api_pb2,
        descriptor_pb2,
        duration_pb2,
        empty_pb2,
        field_mask_pb2,
        source_context_pb2,
        struct_pb2,
        timestamp_pb2,
        type_pb2,
        wrappers_pb2,
    )
}


def _descriptor_of(message_type: MessageType) -> Descriptor:
    if isinstance(message_type, Descriptor):
        return message_type
    # The stubs type upb's descriptor separately; at runtime it is a descriptor.Descriptor.
    return cast(Descriptor, message_type.DESCRIPTOR)


def descriptor_set_for(*message_types: MessageType) -> descriptor_pb2.FileDescriptorSet:
    """The files defining these messages plus every file they import, transitively.

    Each file appears once, after all of its dependencies, so the set can be added
    to a fresh `DescriptorPool` in order. Well-known types (google/protobuf/*.proto)
    are included like any other dependency. No message types gives an empty set.
    """
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)

    for message_type in message_types:
        visit(_descriptor_of(message_type).file)
    files = []
    for file in ordered:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        files.append(proto)
    return descriptor_pb2.FileDescriptorSet(file=files)


def task_type_for(
    name: str, input_type: MessageType, output_type: MessageType, *, description: str = ""
) -> task_pb2.TaskType:
    """A `TaskType` ready for RegisterTaskType: names, descriptors and description filled in."""
    input_descriptor = _descriptor_of(input_type)
    output_descriptor = _descriptor_of(output_type)
    return task_pb2.TaskType(
        name=name,
        input_type=input_descriptor.full_name,
        output_type=output_descriptor.full_name,
        descriptors=descriptor_set_for(input_descriptor, output_descriptor),
        description=description,
    )


def caller_metadata(kind: str) -> tuple[tuple[str, str], ...]:
    """Call metadata naming this process ("worker host pid 12"): the coordinator records it as who
    registered a task type version."""
    return ((CLIENT_METADATA_KEY, f"{kind} {socket.gethostname()} pid {os.getpid()}"),)


def add_files(pool: descriptor_pool.DescriptorPool, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> list[str]:
    """Add the files the pool does not know yet, each after its imports; returns those that could not be added.

    Sets from other languages may list files in any order, and may leave out well-known
    imports (filled in here). A file that clashes with a known one of the same name, or
    whose imports are missing, is skipped: the first registration of a shared file wins.
    """

    def known(name: str) -> bool:
        try:
            pool.FindFileByName(name)
        except KeyError:
            return False
        return True

    waiting = [f for f in files if not known(f.name)]
    skipped: list[str] = []
    while waiting:
        left = []
        for file in waiting:
            for dependency in file.dependency:
                if not known(dependency) and dependency in WELL_KNOWN_FILES:
                    proto = descriptor_pb2.FileDescriptorProto()
                    WELL_KNOWN_FILES[dependency].CopyToProto(proto)
                    pool.Add(proto)
            if all(known(d) for d in file.dependency):
                try:
                    pool.Add(file)
                except (TypeError, ValueError):
                    skipped.append(file.name)
            else:
                left.append(file)
        if len(left) == len(waiting):
            return skipped + [f.name for f in left]
        waiting = left
    return skipped


__all__ = ["WELL_KNOWN_FILES", "MessageType", "add_files", "caller_metadata", "descriptor_set_for", "task_type_for"]
