"""Tracing: the one place that sets up OpenTelemetry tracing and names Herder's spans.

A task's journey is one trace, after OpenTelemetry's messaging conventions: the coordinator opens a
PRODUCER span (`<queue> create`) per created task under the submitter's context and stores that span's
context with the task; each attempt runs in a CONSUMER span (`<queue> process`) parented on it and
linked to it, on the Worker or the supervisor, which passes it on to the handler in Execute's metadata.

Only `opentelemetry-api` is a base dependency: without an SDK every span here is a no-op. Herder's
own processes (coordinator, supervisor, `herder dev`) call `configure_from_env()`, which installs the
SDK (the `traces` extra) only when `OTEL_TRACES_EXPORTER` names an exporter and `OTEL_SDK_DISABLED` is
not true, so by default tracing costs nothing. An app that embeds the Client or Worker sets up its own
SDK; gRPC spans come from the interceptors in `grpc_tracing`, added to a channel or server when a real
tracer provider is set as it is made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context

from herder.clients.proto.v1 import task_pb2

_log = logging.getLogger(__name__)
_Call = TypeVar("_Call")
_tracer = trace.get_tracer("herder")

SYSTEM = "herder"
# Span attributes: OpenTelemetry's messaging conventions, then Herder's own.
MESSAGING_SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
MESSAGE_ID = "messaging.message.id"
CONSUMER_GROUP = "messaging.consumer.group.name"
BATCH_SIZE = "messaging.batch.message_count"
TASK_ID = "herder.task.id"
TASK_TYPE = "herder.task.type"
ATTEMPT = "herder.task.attempt"
WORKER_ID = "herder.worker.id"
OUTCOME = "herder.task.outcome"
ERROR_TYPE = "error.type"
QUEUE_WAIT_MS = "herder.queue.wait_ms"

# The environment values that name an exporter, and the ones that mean "none".
EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
SAMPLER_ENV = "OTEL_TRACES_SAMPLER"
# Herder's default when OTEL_TRACES_SAMPLER is unset: follow the caller's decision, and sample this
# share of the traces that start here. Every sampled task costs three spans on two processes, each
# ~30 us to make and as much to export: at 1% that is under 2 us a task, at 10% it was about half of
# tracing's cost (README, "Tracing" has the figures). At 2,000 tasks/s, 1% is 20 traces a second.
DEFAULT_SAMPLE_RATIO = 0.01
_NO_EXPORTER = ("", "none")

_configured = False
# True when the installed sampler follows the parent's decision: a task whose stored context is not
# sampled then gets no spans of its own, only its parent's context passed on (nothing to build).
_parent_decides = False
# True when the propagators are W3C trace context (and baggage), as by default: an unsampled context
# is then read and written as a traceparent string directly, ~1 us instead of the propagators' ~5.
_w3c = False


def enabled_by_env(env: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for traces: an exporter named and the SDK not disabled."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return env.get(EXPORTER_ENV, "").strip().lower() not in _NO_EXPORTER


def configure_from_env(service_name: str) -> bool:
    """Install the OpenTelemetry SDK as the global tracer provider when the environment asks for traces.

    Reads the standard variables: OTEL_TRACES_EXPORTER (`otlp`, `console`, or a comma list),
    OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (`grpc`, the default, or `http/protobuf`) and endpoint,
    OTEL_TRACES_SAMPLER[_ARG] (unset: parentbased_traceidratio at DEFAULT_SAMPLE_RATIO, not the SDK's
    parentbased_always_on), OTEL_SERVICE_NAME (default `service_name`),
    OTEL_RESOURCE_ATTRIBUTES, OTEL_BSP_*. Returns whether it installed one; safe to call twice.
    Without the SDK installed it logs a warning and returns False, so a missing extra never stops a process.
    """
    global _configured, _parent_decides
    if _configured:
        return True
    if not enabled_by_env():
        return False
    try:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        _log.warning("%s is set but the OpenTelemetry SDK is not installed: pip install 'herder[traces]'", EXPORTER_ENV)
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}).merge(
        OTELResourceDetector().detect()
    )
    sampler = None  # the SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG
    named = os.environ.get(SAMPLER_ENV, "").strip().lower()
    if not named:
        sampler = ParentBased(TraceIdRatioBased(DEFAULT_SAMPLE_RATIO))
    _parent_decides = not named or named.startswith("parentbased_")
    global _w3c
    _w3c = os.environ.get("OTEL_PROPAGATORS", "tracecontext,baggage").replace(" ", "").lower() in (
        "tracecontext,baggage",
        "tracecontext",
    )
    provider = TracerProvider(resource=resource, sampler=sampler)
    for name in os.environ.get(EXPORTER_ENV, "").split(","):
        exporter = _exporter(name.strip().lower())
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def _exporter(name: str) -> Any:
    """The span exporter an OTEL_TRACES_EXPORTER entry names, or None (logged) for an unknown one."""
    if name in _NO_EXPORTER:
        return None
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name == "otlp":
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        if protocol.strip() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
        return OTLPSpanExporter()
    _log.warning("%s=%s: unknown exporter, ignored (use otlp or console)", EXPORTER_ENV, name)
    return None


def shutdown() -> None:
    """Flush and stop the SDK's exporters (a no-op without an SDK); call as the process stops."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if callable(stop):
        stop()


def _sdk_active() -> bool:
    """True once a real tracer provider (not the API's proxy or no-op one) is the global one."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def server_interceptors() -> list[Any]:
    """The gRPC server tracing interceptor (see grpc_tracing), when a real tracer provider is set."""
    if not _sdk_active():
        return []
    from herder.clients.grpc_tracing import ServerTracing

    return [ServerTracing()]


def client_interceptors() -> list[Any]:
    """The gRPC client tracing interceptors (see grpc_tracing), when a real tracer provider is set."""
    if not _sdk_active():
        return []
    from herder.clients import grpc_tracing

    return grpc_tracing.client_interceptors()


def start_stream(method: str, start: Callable[[Sequence[tuple[str, str]]], _Call]) -> _Call:
    """Start a stream-stream call with `start(metadata)`, in a CLIENT span when a tracer provider is
    set (see grpc_tracing.start_stream: such calls are not intercepted)."""
    if not _sdk_active():
        return start(())
    from herder.clients import grpc_tracing

    return grpc_tracing.start_stream(method, start)


# --------------------------------------------------------------------------- the queue's spans


def create_spans(tasks: Sequence[task_pb2.Task], parent: Mapping[str, str]) -> None:
    """One PRODUCER `<queue> create` span per new task, under the submitter's context `parent`; each
    task's trace_context becomes its span's, so its attempts continue the submitter's trace.

    One span per task rather than one per batch with links: a consumer must parent on the span that
    created its own message, and a span costs microseconds beside a task's etcd write.
    """
    if not _sdk_active():
        # No SDK: the submitter's context is stored as it came (the API's spans would carry no ids).
        for task in tasks:
            task.trace_context.update(parent)
        return
    # Under the gRPC server span when the server is instrumented, else under the caller's metadata.
    ctx = None if trace.get_current_span().get_span_context().is_valid else propagate.extract(dict(parent))
    current = trace.get_current_span(ctx).get_span_context()
    if _unsampled(current):
        carrier: dict[str, str] = {}
        if _w3c and not current.trace_state and not baggage.get_all(ctx):
            carrier["traceparent"] = f"00-{current.trace_id:032x}-{current.span_id:016x}-{current.trace_flags:02x}"
        else:
            propagate.inject(carrier, context=ctx)
        for task in tasks:
            task.trace_context.update(carrier)
        return
    for task in tasks:
        queue = task.spec.queue or "default"
        span = _tracer.start_span(
            f"{queue} create",
            context=ctx,
            kind=trace.SpanKind.PRODUCER,
            attributes={
                MESSAGING_SYSTEM: SYSTEM,
                OPERATION_TYPE: "create",
                OPERATION_NAME: "create",
                DESTINATION: queue,
                MESSAGE_ID: task.id,
                TASK_ID: task.id,
                TASK_TYPE: task.spec.type,
            },
        )
        carrier = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        task.trace_context.clear()
        task.trace_context.update(carrier)
        span.end()


# What process_span gives without a tracer provider: reusable, and no generator made per attempt.
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def process_span(task: task_pb2.Task, attempt: int, worker_id: str) -> contextlib.AbstractContextManager[trace.Span]:
    """The CONSUMER `<queue> process` span of one attempt, current inside the block: parented on the
    task's stored context (its PRODUCER span) and linked to it. Set its outcome with `set_outcome`.
    """
    if not _sdk_active():
        return _NO_SPAN
    return _process_span(task, attempt, worker_id)


@contextlib.contextmanager
def _process_span(task: task_pb2.Task, attempt: int, worker_id: str) -> Iterator[trace.Span]:
    unsampled = _unsampled_parent(task.trace_context)
    parent = unsampled if unsampled is not None else propagate.extract(dict(task.trace_context))
    producer = trace.get_current_span(parent).get_span_context()
    if unsampled is not None or _unsampled(producer):
        # Not sampled: the handler still sees the trace's context, at no span's cost.
        token = otel_context.attach(parent)
        try:
            yield trace.INVALID_SPAN
        finally:
            otel_context.detach(token)
        return
    queue = task.spec.queue or "default"
    attributes: dict[str, str | int | float] = {
        MESSAGING_SYSTEM: SYSTEM,
        OPERATION_TYPE: "process",
        OPERATION_NAME: "process",
        DESTINATION: queue,
        MESSAGE_ID: task.id,
        CONSUMER_GROUP: queue,
        TASK_ID: task.id,
        TASK_TYPE: task.spec.type,
        ATTEMPT: attempt,
        WORKER_ID: worker_id,
    }
    if task.HasField("assign_time") and task.HasField("queue_time"):
        # The wait in the queue: from the latest enqueue (a retry's too) to this assignment.
        wait = task.assign_time.ToNanoseconds() - task.queue_time.ToNanoseconds()
        attributes[QUEUE_WAIT_MS] = max(wait, 0) / 1e6
    links = [trace.Link(producer)] if producer.is_valid else []
    with _tracer.start_as_current_span(
        f"{queue} process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield span


_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _unsampled_parent(stored: Mapping[str, str]) -> otel_context.Context | None:
    """The context of a stored lone W3C traceparent whose flags say unsampled, read without the
    propagators; None when it is anything else (sampled, with tracestate or baggage, malformed)."""
    if not (_w3c and _parent_decides and len(stored) == 1):
        return None
    found = _TRACEPARENT.fullmatch(stored.get("traceparent", ""))
    if found is None:
        return None
    trace_id, span_id, flags = int(found[1], 16), int(found[2], 16), int(found[3], 16)
    if flags & 1 or not trace_id or not span_id:
        return None
    span = trace.NonRecordingSpan(trace.SpanContext(trace_id, span_id, True, trace.TraceFlags(flags)))
    return trace.set_span_in_context(span)


def _unsampled(parent: trace.SpanContext) -> bool:
    """True when a span under `parent` would be dropped by the sampler anyway."""
    return _parent_decides and parent.is_valid and not parent.trace_flags.sampled


def set_outcome(span: trace.Span, outcome: str, error_type: str = "") -> None:
    """Record an attempt's outcome (succeeded, failed, canceled) and its error type on its span."""
    span.set_attribute(OUTCOME, outcome)
    if error_type:
        span.set_attribute(ERROR_TYPE, error_type)
        span.set_status(trace.StatusCode.ERROR, error_type)


def traceparent_metadata() -> list[tuple[str, str]]:
    """The current context (W3C traceparent/tracestate) as gRPC metadata, for a call that continues it."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(key.lower(), value) for key, value in carrier.items()]


__all__ = [
    "client_interceptors",
    "configure_from_env",
    "create_spans",
    "enabled_by_env",
    "process_span",
    "server_interceptors",
    "set_outcome",
    "shutdown",
    "start_stream",
    "traceparent_metadata",
]
