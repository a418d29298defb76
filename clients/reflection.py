"""Herder's server reflection: grpc.reflection.v1 and v1alpha over a catalog of .proto files.

It serves everything a client needs to render any reply with no .proto at hand: Herder's own
files with their comments (source info, from clients/proto/v1/descriptors.binpb), the
google.rpc error details (so grpcurl shows a BadRequest's field violations as JSON), the
well-known types, and whatever a server adds (the coordinator: the registered task types'
files). Symbols resolve down to methods (`pkg.Service.Method`), nested messages, enums, enum
values and fields, which grpcio-reflection's pool lookup does not do for methods.

The one rule: a name is served by the first file that claims it. A catalog is built base
files first, then the caller's extra files in the order it gives (the coordinator: newest
registration first), so Herder's own contracts can never be shadowed by a task type's copy.

Every answer carries a file's transitive imports, each file once per stream (a client keeps
what it was sent), as the reference implementation does. Hostile input is bounded: a stream
answers at most `Limits.requests` requests and a name longer than `Limits.name` is NOT_FOUND.

It lives in herder.clients because the supervisor, which never imports herder.server, serves it too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from herder.clients.descriptors import WELL_KNOWN_FILES

V1ALPHA_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_METHOD = "ServerReflectionInfo"
_SOURCE_INFO = "descriptors.binpb"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto, which grpcio-reflection does not ship: v1alpha renamed.

    The two protos are the same messages on the wire, only the package differs.
    """
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for message_field in message.field:
            if message_field.HasField("type_name"):
                message_field.type_name = message_field.type_name.replace(old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    return proto


V1_FILE = _v1_file()
_v1_pool = descriptor_pool.DescriptorPool()
_v1_pool.Add(V1_FILE)
# Message classes of grpc.reflection.v1, built at import (a client can use them as its stub's types).
_V1_CLASSES = message_factory.GetMessages([V1_FILE], pool=_v1_pool)
V1ServerReflectionRequest: Any = _V1_CLASSES["grpc.reflection.v1.ServerReflectionRequest"]
V1ServerReflectionResponse: Any = _V1_CLASSES["grpc.reflection.v1.ServerReflectionResponse"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one reflection stream may ask (grpcurl sends a few dozen requests)."""

    # Requests answered per stream; the next one ends it with RESOURCE_EXHAUSTED.
    requests: int = 10_000
    # Longest file or symbol name looked up; a longer one is NOT_FOUND without a lookup.
    name: int = 1024


def _copy(file: Any) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _source_info_files() -> list[descriptor_pb2.FileDescriptorProto]:
    data = resources.files("herder.clients.proto.v1").joinpath(_SOURCE_INFO).read_bytes()
    files = list(descriptor_pb2.FileDescriptorSet.FromString(data).file)
    for file in files:
        _drop_json_names(file)
    return files


def _drop_json_names(file: descriptor_pb2.FileDescriptorProto) -> None:
    """Clears the fields' json_name, which protoc's descriptor sets carry and the generated
    modules' do not: grpcurl prints a field by its json_name when it has one, and Herder's
    replies have always printed proto field names (`result_json`, not `resultJson`)."""
    for extension in file.extension:
        extension.ClearField("json_name")
    stack = list(file.message_type)
    while stack:
        message = stack.pop()
        for message_field in (*message.field, *message.extension):
            message_field.ClearField("json_name")
        stack.extend(message.nested_type)


def base_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Herder's files (with comments), the google.rpc error details, health, both reflection
    protos and the well-known types: what every Herder server reflects."""
    return [
        *_source_info_files(),
        *(_copy(module.DESCRIPTOR) for module in (status_pb2, error_details_pb2, code_pb2)),
        _copy(health_pb2.DESCRIPTOR),
        _copy(v1alpha_pb2.DESCRIPTOR),
        V1_FILE,
        *(_copy(file) for file in WELL_KNOWN_FILES.values()),
    ]


@dataclass(slots=True)
class Catalog:
    """Files by name and the file that defines each symbol; the first claim of a name wins."""

    files: dict[str, descriptor_pb2.FileDescriptorProto] = field(default_factory=dict)
    symbols: dict[str, str] = field(default_factory=dict)
    # The symbols that are messages (all_extension_numbers_of_type answers only those).
    messages: set[str] = field(default_factory=set)
    # Extended message (full name) -> field number -> the file defining the extension.
    extensions: dict[str, dict[int, str]] = field(default_factory=dict)
    _serialized: dict[str, bytes] = field(default_factory=dict)

    def add(self, file: descriptor_pb2.FileDescriptorProto) -> bool:
        """Adds `file` unless one of that name is known (then False). Its symbols already
        claimed by another file keep pointing there."""
        if file.name in self.files or not file.name:
            return False
        self.files[file.name] = file
        prefix = f"{file.package}." if file.package else ""
        for name, is_message in _symbols(file, prefix):
            if name not in self.symbols:
                self.symbols[name] = file.name
                if is_message:
                    self.messages.add(name)
        for extension in _extensions(file):
            numbers = self.extensions.setdefault(extension.extendee.lstrip("."), {})
            numbers.setdefault(extension.number, file.name)
        return True

    def add_all(self, files: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        for file in files:
            self.add(file)

    def serialized(self, name: str) -> bytes:
        data = self._serialized.get(name)
        if data is None:
            data = self._serialized[name] = self.files[name].SerializeToString()
        return data

    def with_imports(self, name: str, sent: set[str]) -> list[bytes]:
        """`name` (always) and its transitive imports known here that are not in `sent`, imports
        first; `sent` grows by what is returned."""
        out: list[bytes] = []
        stack = [(name, False)]
        sent.discard(name)
        while stack:
            current, expanded = stack.pop()
            if expanded:
                out.append(self.serialized(current))
                continue
            if current in sent or current not in self.files:
                continue
            sent.add(current)
            stack.append((current, True))
            stack.extend((dependency, False) for dependency in reversed(self.files[current].dependency))
        return out


def _symbols(file: descriptor_pb2.FileDescriptorProto, prefix: str) -> Iterable[tuple[str, bool]]:
    """Every name `file` defines, with whether it is a message."""

    def message(proto: descriptor_pb2.DescriptorProto, scope: str) -> Iterable[tuple[str, bool]]:
        name = scope + proto.name
        yield name, True
        members = [*(f.name for f in proto.field), *(e.name for e in proto.extension)]
        for member in (*members, *(o.name for o in proto.oneof_decl)):
            yield f"{name}.{member}", False
        for nested in proto.nested_type:
            yield from message(nested, name + ".")
        for enum in proto.enum_type:
            yield from enum_symbols(enum, name + ".")

    def enum_symbols(proto: descriptor_pb2.EnumDescriptorProto, scope: str) -> Iterable[tuple[str, bool]]:
        yield scope + proto.name, False
        # Enum values are scoped beside their enum (C++ rules), not inside it.
        for value in proto.value:
            yield scope + value.name, False

    for proto in file.message_type:
        yield from message(proto, prefix)
    for enum in file.enum_type:
        yield from enum_symbols(enum, prefix)
    for extension in file.extension:
        yield prefix + extension.name, False
    for service in file.service:
        yield prefix + service.name, False
        for method in service.method:
            yield f"{prefix}{service.name}.{method.name}", False


def _extensions(file: descriptor_pb2.FileDescriptorProto) -> Iterable[descriptor_pb2.FieldDescriptorProto]:
    yield from file.extension
    stack = list(file.message_type)
    while stack:
        proto = stack.pop()
        yield from proto.extension
        stack.extend(proto.nested_type)


CatalogSource = Callable[[], Awaitable[Catalog]]


class ReflectionServicer:
    """ServerReflectionInfo for one of the two reflection packages (`pb` holds its messages).

    `services` are those listed (the server's, whatever files the catalog holds).
    `catalog` is awaited for each request, so a source that changes (the coordinator's task
    types) is seen by the next request; it must not raise (serve what it has instead).
    A cancelled stream just stops: it holds nothing but what it sent.
    """

    def __init__(self, pb: Any, services: tuple[str, ...], catalog: CatalogSource, limits: Limits) -> None:
        self._pb = pb
        self._services = sorted(services)
        self._catalog = catalog
        self._limits = limits

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        sent: set[str] = set()
        answered = 0
        async for request in requests:
            if answered >= self._limits.requests:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a reflection stream answers at most {self._limits.requests} requests; open another",
                )
            answered += 1
            yield self._answer(request, await self._catalog(), sent)

    def _answer(self, request: Any, catalog: Catalog, sent: set[str]) -> Any:
        pb = self._pb
        response = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        if kind == "list_services":
            services = [pb.ServiceResponse(name=name) for name in self._services]
            response.list_services_response.CopyFrom(pb.ListServiceResponse(service=services))
        elif kind == "all_extension_numbers_of_type":
            name = request.all_extension_numbers_of_type
            if name in catalog.messages:
                numbers = sorted(catalog.extensions.get(name, {}))
                response.all_extension_numbers_response.CopyFrom(
                    pb.ExtensionNumberResponse(base_type_name=name, extension_number=numbers)
                )
            else:
                response.error_response.CopyFrom(self._not_found(f"no message named {self._shown(name)}"))
        elif kind is None:
            response.error_response.CopyFrom(
                pb.ErrorResponse(error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0], error_message="empty request")
            )
        else:
            file_name, missing = self._file_for(kind, request, catalog)
            if file_name is None:
                response.error_response.CopyFrom(self._not_found(missing))
            else:
                files = catalog.with_imports(file_name, sent)
                response.file_descriptor_response.CopyFrom(pb.FileDescriptorResponse(file_descriptor_proto=files))
        return response

    def _file_for(self, kind: str, request: Any, catalog: Catalog) -> tuple[str | None, str]:
        """The name of the file that answers a file request, or None and why not."""
        if kind == "file_by_filename":
            name = request.file_by_filename
            found = name if len(name) <= self._limits.name and name in catalog.files else None
            return found, f"no file named {self._shown(name)}"
        if kind == "file_containing_symbol":
            name = request.file_containing_symbol.lstrip(".")
            return catalog.symbols.get(name) if len(name) <= self._limits.name else None, (
                f"no symbol named {self._shown(name)}"
            )
        extension = request.file_containing_extension
        found = catalog.extensions.get(extension.containing_type, {}).get(extension.extension_number)
        return found, f"no extension {extension.extension_number} of {self._shown(extension.containing_type)}"

    def _not_found(self, message: str) -> Any:
        return self._pb.ErrorResponse(error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message=message)

    def _shown(self, name: str) -> str:
        # A hostile name is cut, not echoed whole into the error message.
        return repr(name[: self._limits.name])


def _handler(servicer: ReflectionServicer, request: Any, response: Any) -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=request.FromString,
        response_serializer=response.SerializeToString,
    )


def enable_reflection(
    server: grpc.aio.Server, services: Iterable[str], catalog: CatalogSource, limits: Limits | None = None
) -> None:
    """Serves grpc.reflection.v1 and v1alpha on `server` from the catalog `catalog` returns;
    list_services answers `services` and both reflection services."""
    limits = limits or Limits()
    listed = (*services, V1_SERVICE, V1ALPHA_SERVICE)
    handlers = {
        V1ALPHA_SERVICE: _handler(
            ReflectionServicer(v1alpha_pb2, listed, catalog, limits),
            v1alpha_pb2.ServerReflectionRequest,
            v1alpha_pb2.ServerReflectionResponse,
        ),
        V1_SERVICE: _handler(
            ReflectionServicer(_V1Messages, listed, catalog, limits),
            V1ServerReflectionRequest,
            V1ServerReflectionResponse,
        ),
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {_METHOD: handler}) for service, handler in handlers.items()]
    )


class _V1Messages:
    """grpc.reflection.v1's message classes under the names the v1alpha module uses."""

    ServerReflectionResponse = V1ServerReflectionResponse
    ServiceResponse = _V1_CLASSES["grpc.reflection.v1.ServiceResponse"]
    ListServiceResponse = _V1_CLASSES["grpc.reflection.v1.ListServiceResponse"]
    ExtensionNumberResponse = _V1_CLASSES["grpc.reflection.v1.ExtensionNumberResponse"]
    ErrorResponse = _V1_CLASSES["grpc.reflection.v1.ErrorResponse"]
    FileDescriptorResponse = _V1_CLASSES["grpc.reflection.v1.FileDescriptorResponse"]


def static_catalog(extra: Iterable[descriptor_pb2.FileDescriptorProto] = ()) -> CatalogSource:
    """A source that always answers the base files plus `extra` (a server with no task types)."""
    catalog = Catalog()
    catalog.add_all(base_files())
    catalog.add_all(extra)

    async def source() -> Catalog:
        return catalog

    return source


__all__ = [
    "V1ALPHA_SERVICE",
    "V1_SERVICE",
    "Catalog",
    "CatalogSource",
    "Limits",
    "V1ServerReflectionRequest",
    "V1ServerReflectionResponse",
    "base_files",
    "enable_reflection",
    "static_catalog",
]
