"""Where an operator's task type contracts come from: .proto files compiled in-process, or a descriptor set file.

`herder types register`, `Client.register_task_type` callers and the coordinator's declared
types (the [coordinator] table's `task_types`) all build their `FileDescriptorSet` here, so
the same input gives the same set and the same one-line errors everywhere:

- `compile_protos(files, include_paths)`: protoc from grpcio-tools, run in this process, with
  every import and the well-known types included (`--include_imports`). grpcio-tools is the
  `protoc` extra (`pip install 'herder[protoc]'`); without it the error says so in one line.
- `read_descriptor_set(path)`: a binary `FileDescriptorSet` such as `buf build -o FILE`'s output
  (or `buf build -o FILE.json`'s JSON form).
- `check_messages(files, input_type, output_type)`: both messages are defined in the set.

Every failure is a `ProtoSourceError`: one line, naming the file or message at fault.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterator, Sequence
from typing import TextIO

from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message import DecodeError

from herder.clients.descriptors import add_files
from herder.clients.proto.v1 import task_pb2

PROTOC_INSTALL = "pip install 'herder[protoc]'"
# Available messages listed in an error, at most.
_LISTED = 20
# protoc writes its errors to file descriptor 2 from C++; one compile at a time may borrow it.
_STDERR_LOCK = threading.Lock()


class ProtoSourceError(ValueError):
    """A .proto file, descriptor set or message name that cannot be used; the message is one line."""


def compile_protos(files: Sequence[str], include_paths: Sequence[str] = ()) -> descriptor_pb2.FileDescriptorSet:
    """Compile `files` with protoc (grpcio-tools) in this process into one descriptor set.

    Imports are looked up in `include_paths` (the current directory when none is given), then
    in grpcio-tools' bundled well-known types; the set holds every imported file too. Raises
    ProtoSourceError with protoc's first error line (file:line:column: what), or naming the
    missing file, or saying which install grpcio-tools needs. protoc reports errors on file
    descriptor 2, so while it runs this process's stderr goes to a temporary file (one compile
    at a time).
    """
    if not files:
        raise ProtoSourceError("no .proto files given")
    if importlib.util.find_spec("grpc_tools") is None:
        raise ProtoSourceError(
            f"compiling .proto files needs grpcio-tools: {PROTOC_INSTALL} (or give a descriptor set, e.g. from"
            " `buf build -o FILE`)"
        )
    from grpc_tools import protoc

    includes = list(include_paths) or ["."]
    for directory in includes:
        if not os.path.isdir(directory):
            raise ProtoSourceError(f"proto path {directory}: no such directory")
    for file in files:
        if not os.path.isfile(file) and not any(os.path.isfile(os.path.join(d, file)) for d in includes):
            raise ProtoSourceError(f"{file}: no such file (looked in the current directory and {', '.join(includes)})")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="herder-protoc-") as scratch:
        output = os.path.join(scratch, "set.binpb")
        arguments = [
            "protoc",
            *(f"--proto_path={d}" for d in includes),
            f"--proto_path={well_known}",
            "--include_imports",
            f"--descriptor_set_out={output}",
            *files,
        ]
        with _captured_stderr(os.path.join(scratch, "stderr")) as captured:
            code = protoc.main(arguments)
            captured.seek(0)
            errors = captured.read()
        if code != 0:
            lines = [line.strip() for line in errors.splitlines() if line.strip()]
            # protoc's last lines often repeat the first as a summary ("x.proto: Import ... was not found").
            raise ProtoSourceError(lines[0] if lines else f"protoc failed (exit code {code})")
        with open(output, "rb") as stream:
            return descriptor_pb2.FileDescriptorSet.FromString(stream.read())


@contextlib.contextmanager
def _captured_stderr(path: str) -> Iterator[TextIO]:
    """Point fd 2 at `path` while the block runs (protoc's C++ writes there, not to sys.stderr)."""
    with _STDERR_LOCK, open(path, "w+", encoding="utf-8", errors="replace") as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield sink
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def read_descriptor_set(path: str) -> descriptor_pb2.FileDescriptorSet:
    """The `FileDescriptorSet` in the file at `path`: binary (buf build -o FILE, protoc
    --descriptor_set_out) or its JSON form. Raises ProtoSourceError for a file that is not one."""
    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        raise ProtoSourceError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    not_one = (
        f"{path} is not a descriptor set (a binary FileDescriptorSet, e.g. from `buf build -o FILE` or"
        " `protoc --include_imports --descriptor_set_out=FILE`)"
    )
    files = descriptor_pb2.FileDescriptorSet()
    try:
        if data.lstrip().startswith(b"{"):
            # buf adds its own fields (bufExtension) to each file: not part of the descriptor.
            json_format.Parse(data.decode("utf-8"), files, ignore_unknown_fields=True)
        else:
            files.ParseFromString(data)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError, RecursionError):
        raise ProtoSourceError(not_one) from None
    # Many byte strings decode as some message: a set must name each file it holds.
    if not files.file or any(not f.name.endswith(".proto") for f in files.file):
        raise ProtoSourceError(not_one)
    return files


def check_messages(files: descriptor_pb2.FileDescriptorSet, *message_names: str) -> None:
    """Each of `message_names` (full names, `pkg.Msg`) is a message the set defines; raises
    ProtoSourceError naming the first one missing and listing the messages the set has."""
    pool = descriptor_pool.DescriptorPool()
    skipped = add_files(pool, files.file)
    for name in message_names:
        try:
            pool.FindMessageTypeByName(name)
        except KeyError:
            available = _message_names(files)
            shown = ", ".join(available[:_LISTED]) + (", ..." if len(available) > _LISTED else "")
            unusable = f"; files that do not build: {', '.join(skipped)}" if skipped else ""
            raise ProtoSourceError(
                f"no message {name!r} in the descriptors (messages: {shown or 'none'}{unusable})"
            ) from None


def task_type_from_sources(
    name: str,
    input_type: str,
    output_type: str,
    *,
    protos: Sequence[str] = (),
    proto_paths: Sequence[str] = (),
    descriptor_set: str = "",
    description: str = "",
) -> task_pb2.TaskType:
    """A TaskType for RegisterTaskType from .proto files or a descriptor set file (exactly one of
    them), its messages checked. Raises ProtoSourceError."""
    if bool(protos) == bool(descriptor_set):
        raise ProtoSourceError("give .proto files or a descriptor set, one of the two")
    files = read_descriptor_set(descriptor_set) if descriptor_set else compile_protos(protos, proto_paths)
    check_messages(files, input_type, output_type)
    return task_pb2.TaskType(
        name=name, input_type=input_type, output_type=output_type, descriptors=files, description=description
    )


def _message_names(files: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Messages defined in the set's own files (well-known imports left out), nested ones too."""
    names: list[str] = []

    def visit(prefix: str, messages: Sequence[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            full = f"{prefix}{message.name}"
            if not message.options.map_entry:
                names.append(full)
            visit(f"{full}.", message.nested_type)

    for file in files.file:
        if not file.name.startswith("google/protobuf/"):
            visit(f"{file.package}." if file.package else "", file.message_type)
    return names


__all__ = [
    "PROTOC_INSTALL",
    "ProtoSourceError",
    "check_messages",
    "compile_protos",
    "read_descriptor_set",
    "task_type_from_sources",
]
