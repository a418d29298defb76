"""Spans for Herder's gRPC calls: SERVER on its aio servers (coordinator, supervisor admin API), CLIENT
on its channels (SDK Client and Worker, the supervisor's calls to the coordinator and to the handler).

Not `opentelemetry-instrumentation-grpc`'s aio interceptors, for two of their open stream problems:
- its client span of a streaming call ends only when the caller reads the stream to its end (a
  supervisor that stops at Execute's result, or a cancelled watch, leaves it open); here it ends when
  the call does (a done callback);
- its server interceptor takes every streaming handler for an async generator, so a handler written
  with `context.read()`/`context.write()` (the coordinator's Connect and WatchTasks) fails with a
  TypeError; and a span made current inside an async generator is detached wherever the generator is
  closed, which logs "Failed to detach context" when a stream is cancelled. Here a coroutine handler
  runs inside its span, attached and detached in the call's own task; an async-generator handler's span
  is never made current across a yield, and is ended however the stream ends.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

_tracer = trace.get_tracer("herder.grpc")
_Call = TypeVar("_Call")
_ROOT = otel_context.Context()


def _attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _parent(context: grpc.aio.ServicerContext[Any, Any]) -> otel_context.Context:
    """The caller's context from its metadata; a root (empty) context without a traceparent, unparsed."""
    metadata = context.invocation_metadata() or ()
    if not any(key == "traceparent" for key, _ in metadata):
        return _ROOT
    return propagate.extract({key: value for key, value in metadata if isinstance(value, str)})


def _finish(span: trace.Span, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> None:
    """Record the call's status code; a cancelled stream is CANCELLED, not an error of the server."""
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        if exc is None:
            code = grpc.StatusCode.OK
        else:
            code = grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        span.set_status(trace.StatusCode.ERROR, code.name)


def _coroutine(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    # Worked out once per method: this runs on every call, sampled or not.
    name, attributes = method.lstrip("/"), _attributes(method)

    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        parent = _parent(context)
        span = _tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        # attach/detach by hand, not start_as_current_span: its context managers cost more than the span
        # when nothing is sampled. Both happen in this call's own task, so the detach always matches.
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        failure: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            otel_context.detach(token)
            if span.is_recording():
                _finish(span, context, failure)
            span.end()

    return traced


def _generator(method: str, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    name, attributes = method.lstrip("/"), _attributes(method)

    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        span = _tracer.start_span(name, context=_parent(context), kind=trace.SpanKind.SERVER, attributes=attributes)
        failure: BaseException | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            failure = exc
            raise
        finally:
            _finish(span, context, failure)
            span.end()

    return traced


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ServerTracing(grpc.aio.ServerInterceptor):
    """Wraps each method's handler in a SERVER span, parented on the caller's traceparent metadata.

    Handlers are wrapped once per method and reused; sync (non-asyncio) behaviours are left untraced.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        behavior = getattr(handler, kind)
        if inspect.isasyncgenfunction(behavior):
            traced: Callable[..., Any] = _generator(method, behavior)
        elif inspect.iscoroutinefunction(behavior):
            traced = _coroutine(method, behavior)
        else:
            return handler
        # grpc's RpcMethodHandler is a namedtuple; the stubs do not say so.
        wrapped: Handler = cast(Any, handler)._replace(**{kind: traced})
        # Keyed by methods that have a handler, so bounded by what the server serves.
        self._wrapped[method] = (handler, wrapped)
        return wrapped


# --------------------------------------------------------------------------- client side


def _metadata_with_context(details: grpc.aio.ClientCallDetails, span: trace.Span) -> grpc.aio.ClientCallDetails:
    """The call's details with the span's W3C context in its metadata (replacing any the caller put)."""
    metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    for key, value in carrier.items():
        metadata[key.lower()] = value
    replaced: grpc.aio.ClientCallDetails = cast(Any, details)._replace(metadata=metadata)
    return replaced


def _client_span(details: grpc.aio.ClientCallDetails) -> trace.Span:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return _tracer.start_span(method.lstrip("/"), kind=trace.SpanKind.CLIENT, attributes=_attributes(method))


async def _end_when_done(span: trace.Span, call: Any) -> None:
    try:
        code = await call.code()
    except Exception:  # cancelled before it had a status
        code = grpc.StatusCode.CANCELLED
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        span.set_status(trace.StatusCode.ERROR, code.name)
    span.end()


def _end_on_done(span: trace.Span, call: Any) -> None:
    """End the span when the call ends however it ends: read to the end, abandoned once done, or cancelled."""
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = _PENDING

    def done(_: Any) -> None:
        task = loop.create_task(_end_when_done(span, call))
        pending.add(task)
        task.add_done_callback(pending.discard)

    call.add_done_callback(done)


# Tasks recording a finished stream's status; held so they are not collected before they run.
_PENDING: set[asyncio.Task[None]] = set()


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        span = _client_span(details)
        try:
            call = await continuation(_metadata_with_context(details, span), request)
            code = await call.code()  # the call's end: a unary call holds nothing open
        except BaseException:
            span.end()
            raise
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(trace.StatusCode.ERROR, code.name)
        span.end()
        return call


async def _start_streaming(continuation: Any, details: Any, request: Any) -> Any:
    """Start a call with a stream on either side; its span ends when the call does, however it ends."""
    span = _client_span(details)
    try:
        call = await continuation(_metadata_with_context(details, span), request)
    except BaseException:
        span.end()
        raise
    _end_on_done(span, call)
    return call


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await _start_streaming(continuation, details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await _start_streaming(continuation, details, requests)


def client_interceptors() -> list[Any]:
    """An interceptor per call kind but stream-stream: each call gets a CLIENT span, its context sent
    as traceparent. grpc.aio passes every message of an intercepted stream-stream call through extra
    queues and awaits (~6 us each, four messages a task on a worker's session stream): the one
    stream-stream call, the session, is traced where it starts (`start_stream`)."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary()]


def start_stream(method: str, start: Callable[[Sequence[tuple[str, str]]], _Call]) -> _Call:
    """Start a call with `start(metadata)` inside a CLIENT span for `method`, its context in the
    metadata; the span ends when the call does, however it ends."""
    span = _tracer.start_span(method.lstrip("/"), kind=trace.SpanKind.CLIENT, attributes=_attributes(method))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        call = start([(key.lower(), value) for key, value in carrier.items()])
    except BaseException:
        span.end()
        raise
    _end_on_done(span, call)
    return call
