"""Traces: a task's journey is one trace, from the submitting client through the coordinator's PRODUCER
span to each attempt's CONSUMER `process` span on a Worker or a supervisor, and on to the handler.

The test process records its own spans (Client, in-process Worker) with the SDK's in-memory exporter;
the coordinator and supervisor subprocesses export theirs over real OTLP/HTTP to a small collector
the test runs on 127.0.0.1, configured by the standard OTEL_* variables as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from _cluster import Coordinator, start_replicas
from _helpers import process_group
from _timing import eventually
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from herder.clients import Client, Retry, tracing
from herder.clients.backoff import Backoff
from herder.clients.embedded_etcd import EmbeddedEtcd, free_port
from herder.clients.examples import build_example_worker
from herder.clients.proto.examples.v1 import examples_pb2
from herder.clients.worker import TaskContext, WorkerSettings

pytestmark = pytest.mark.timeout(90)

FAST = WorkerSettings(backoff=Backoff(initial=0.05, max=0.3), connect_timeout=5.0)
HANDLER = str(Path(__file__).with_name("_plain_handler.py"))
_tracer = trace.get_tracer("tests")


@dataclass(frozen=True)
class Span:
    """A span as the test compares it, whichever process exported it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[str, ...] = ()


class Collector:
    """An OTLP/HTTP trace receiver on 127.0.0.1: keeps every span the subprocesses export."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        collector = self

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                collector._add(request)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        found = []
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for s in scope.spans:
                    attributes = {a.key: _value(a.value) for a in s.attributes}
                    found.append(
                        Span(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            kind=["", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"][s.kind],
                            attributes=attributes,
                            links=tuple(link.span_id.hex() for link in s.links),
                        )
                    )
        with self._lock:
            self.spans.extend(found)

    def env(self) -> dict[str, str]:
        host, port = self._server.server_address[:2]
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://{host!s}:{port}/v1/traces",
            # Exported within 0.1 s, so a leader killed soon after a submit has sent its spans.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _local(span: ReadableSpan) -> Span:
    ctx = span.get_span_context()
    assert ctx is not None
    return Span(
        name=span.name,
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{span.parent.span_id:016x}" if span.parent else "",
        kind=span.kind.name,
        attributes=dict(span.attributes or {}),
        links=tuple(f"{link.context.span_id:016x}" for link in span.links),
    )


_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The test process's spans (Client, in-process Worker): the SDK set up once, as an app would."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    return _EXPORTER


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    """A collector, and OTEL_* variables that point every subprocess started in the test at it."""
    with Collector() as value:
        for key, item in value.env().items():
            monkeypatch.setenv(key, item)
        yield value


@pytest.fixture
def traced(
    etcd: EmbeddedEtcd, namespace: str, collector: Collector, exporter: InMemorySpanExporter
) -> Iterator[Coordinator]:
    """A coordinator exporting to the test's collector."""
    exporter.clear()
    with Coordinator(etcd.endpoint, namespace) as node:
        yield node


def _spans(exporter: InMemorySpanExporter, collector: Collector) -> list[Span]:
    return [_local(s) for s in exporter.get_finished_spans()] + list(collector.spans)


async def _find(exporter: InMemorySpanExporter, collector: Collector, what: str, check: Any) -> list[Span]:
    async def found() -> list[Span]:
        return [s for s in _spans(exporter, collector) if check(s)]

    try:
        return await eventually(found, what)
    except AssertionError:
        for s in _spans(exporter, collector):
            print(s.name, s.kind, s.trace_id[:6], s.span_id, s.parent_id)
        raise


def _process_spans(spans: list[Span], task_id: str) -> list[Span]:
    return [s for s in spans if s.kind == "CONSUMER" and s.attributes.get(tracing.TASK_ID) == task_id]


async def test_one_trace_from_client_through_coordinator_to_worker_handler(
    traced: Coordinator, collector: Collector, exporter: InMemorySpanExporter
) -> None:
    handler_spans: list[str] = []

    async def traced_echo(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        with _tracer.start_as_current_span("handler work") as span:
            handler_spans.append(f"{span.get_span_context().trace_id:032x}")
        return examples_pb2.EchoResponse(text=request.text)

    worker = build_example_worker(traced.address, settings=FAST)
    worker.add_task("test.traced", traced_echo, input_type=examples_pb2.EchoRequest)
    async with worker, Client(traced.address) as client:
        await worker.wait_connected(10)
        with _tracer.start_as_current_span("checkout") as root:
            handle = await client.submit("test.traced", examples_pb2.EchoRequest(text="hi"), queue="shop")
        await handle.result(15)
        trace_id = f"{root.get_span_context().trace_id:032x}"
        [producer] = await _find(
            exporter, collector, "the PRODUCER span", lambda s: s.kind == "PRODUCER" and s.trace_id == trace_id
        )
        [process] = await _find(exporter, collector, "the process span", lambda s: s.kind == "CONSUMER")
    assert producer.name == "shop create"
    assert producer.attributes[tracing.TASK_ID] == handle.id
    assert producer.attributes[tracing.TASK_TYPE] == "test.traced"
    assert producer.attributes[tracing.MESSAGING_SYSTEM] == "herder"
    # The stored context is the PRODUCER span's: the attempt parents on it and links to it.
    assert handle.task.trace_context["traceparent"].split("-")[2] == producer.span_id
    assert process.name == "shop process" and process.trace_id == trace_id
    assert process.parent_id == producer.span_id and process.links == (producer.span_id,)
    assert process.attributes[tracing.ATTEMPT] == 1
    assert process.attributes[tracing.OUTCOME] == "succeeded"
    assert process.attributes[tracing.WORKER_ID] == worker.worker_id
    assert process.attributes[tracing.QUEUE_WAIT_MS] >= 0
    assert handler_spans == [trace_id]
    spans = _spans(exporter, collector)
    # The gRPC instrumentation's spans on both sides are in the same trace.
    assert {s.kind for s in spans if s.trace_id == trace_id and "SubmitTask" in s.name} == {"CLIENT", "SERVER"}


async def test_a_retried_task_shows_one_process_span_per_attempt(
    traced: Coordinator, collector: Collector, exporter: InMemorySpanExporter
) -> None:
    async with build_example_worker(traced.address, settings=FAST) as worker, Client(traced.address) as client:
        await worker.wait_connected(10)
        handle = await client.submit(
            "examples.flaky",
            examples_pb2.FlakyRequest(fail_attempts=2),
            retry=Retry(max_attempts=3, initial_backoff=0.05, max_backoff=0.1),
        )
        await handle.result(20)

        async def three() -> list[Span]:
            found = _process_spans(_spans(exporter, collector), handle.id)
            return found if len(found) == 3 else []

        attempts = sorted(await eventually(three, "three process spans"), key=lambda s: s.attributes[tracing.ATTEMPT])
    assert [s.attributes[tracing.ATTEMPT] for s in attempts] == [1, 2, 3]
    assert [s.attributes[tracing.OUTCOME] for s in attempts] == ["failed", "failed", "succeeded"]
    assert attempts[0].attributes[tracing.ERROR_TYPE] == "FlakyError"
    assert len({s.trace_id for s in attempts}) == 1 and len({s.parent_id for s in attempts}) == 1


@contextlib.contextmanager
def _supervised(coordinator: Coordinator, markers: Path) -> Iterator[None]:
    port = free_port()
    handler = [sys.executable, HANDLER, "--port", str(port), "--mode", "echo", "--marker", str(markers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    supervisor = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address]
    supervisor += ["--handler", f"127.0.0.1:{port}", "--listen", f"127.0.0.1:{free_port()}"]
    with process_group(handler), process_group(supervisor, env=env, stdout=subprocess.DEVNULL):
        yield


async def test_the_supervisor_passes_its_process_span_to_the_handler(
    traced: Coordinator, collector: Collector, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with _supervised(traced, tmp_path):
        async with Client(traced.address) as client:

            async def connected() -> bool:
                return len(await client.nodes()) == 1

            await eventually(connected, "the supervisor's session")
            with _tracer.start_as_current_span("order") as root:
                handle = await client.submit("examples.echo", examples_pb2.EchoRequest(text="x"))
            await handle.result(20)
        trace_id = f"{root.get_span_context().trace_id:032x}"
        [process] = await _find(exporter, collector, "the supervisor's process span", lambda s: s.kind == "CONSUMER")
        # The supervisor's Execute call is a CLIENT span under the process span.
        [execute] = await _find(
            exporter,
            collector,
            "the Execute client span",
            lambda s: s.kind == "CLIENT" and "Execute" in s.name and s.parent_id == process.span_id,
        )
    assert process.trace_id == trace_id and process.attributes[tracing.OUTCOME] == "succeeded"
    metadata = json.loads((tmp_path / f"{handle.id}.metadata").read_text())
    # The handler, written with plain grpc, sees a traceparent in the same trace: it continues it.
    _, seen_trace, seen_parent, _ = metadata["traceparent"].split("-")
    assert seen_trace == trace_id and seen_parent == execute.span_id


async def test_a_leader_failover_between_submit_and_execution_keeps_one_trace(
    etcd: EmbeddedEtcd, namespace: str, collector: Collector, exporter: InMemorySpanExporter
) -> None:
    exporter.clear()
    with contextlib.ExitStack() as stack:
        nodes = start_replicas(etcd.endpoint, namespace, 2, stack)
        addresses = [n.address for n in nodes]
        async with Client(addresses) as client:
            async with build_example_worker(addresses, settings=FAST) as registering:
                await registering.wait_connected(10)  # registers the task types, then leaves
            with _tracer.start_as_current_span("before failover") as root:
                handle = await client.submit("examples.echo", examples_pb2.EchoRequest(text="x"))
            await asyncio.sleep(0.3)  # the leader's batch exporter sends its PRODUCER span
            nodes[0].kill()
            async with build_example_worker(addresses, settings=FAST) as worker:
                await worker.wait_connected(20)
                await handle.result(30)
            trace_id = f"{root.get_span_context().trace_id:032x}"
            [process] = await _find(exporter, collector, "the process span", lambda s: s.kind == "CONSUMER")
    producer = handle.task.trace_context["traceparent"].split("-")
    assert producer[1] == trace_id
    assert process.trace_id == trace_id and process.parent_id == producer[2]
    assert [s.span_id for s in collector.spans if s.kind == "PRODUCER"] == [producer[2]]


@contextlib.asynccontextmanager
async def _watching(client: Client, task_id: str) -> AsyncIterator[asyncio.Task[None]]:
    handle = await client.handle(task_id)

    async def watch() -> None:
        async for _ in handle.watch():
            pass

    watcher = asyncio.create_task(watch())
    try:
        yield watcher
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def test_cancelled_streams_leave_no_dangling_span_or_context(
    traced: Coordinator, collector: Collector, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    async with Client(traced.address) as client:
        async with build_example_worker(traced.address, settings=FAST) as worker:
            await worker.wait_connected(10)
            handle = await client.submit("examples.sleep", examples_pb2.SleepRequest())
            async with _watching(client, handle.id):
                await asyncio.sleep(1.0)  # a long WatchTasks and Connect, then both cancelled
        before = trace.get_current_span()

        def ended(method: str, kind: str) -> Any:
            return lambda s: method in s.name and s.kind == kind

        await _find(exporter, collector, "the Connect client span", ended("Connect", "CLIENT"))
        await _find(exporter, collector, "the WatchTasks client span", ended("WatchTasks", "CLIENT"))
        await _find(exporter, collector, "the Connect server span", ended("Connect", "SERVER"))
        await _find(exporter, collector, "the WatchTasks server span", ended("WatchTasks", "SERVER"))
    # Nothing was left current in the test's context, and no detach failed on either side.
    assert before is trace.INVALID_SPAN or not before.get_span_context().is_valid
    assert "Failed to detach context" not in caplog.text
    assert "Failed to detach context" not in traced.log_tail()


async def test_an_unsampled_trace_gets_no_spans_but_its_context_goes_on_to_the_handler(
    traced: Coordinator, collector: Collector, exporter: InMemorySpanExporter
) -> None:
    seen: list[trace.SpanContext] = []

    async def remember(request: examples_pb2.EchoRequest, ctx: TaskContext) -> examples_pb2.EchoResponse:
        seen.append(trace.get_current_span().get_span_context())
        return examples_pb2.EchoResponse(text=request.text)

    # A caller whose trace was not sampled (flags 00): the coordinator's default sampler follows it.
    unsampled = trace.SpanContext(0x5CE, 0x5EED, is_remote=False, trace_flags=trace.TraceFlags(0))
    worker = build_example_worker(traced.address, settings=FAST)
    worker.add_task("test.remember", remember, input_type=examples_pb2.EchoRequest)
    async with worker, Client(traced.address) as client:
        await worker.wait_connected(10)
        with trace.use_span(trace.NonRecordingSpan(unsampled)):
            handle = await client.submit("test.remember", examples_pb2.EchoRequest(text="x"))
        await handle.result(15)
        await asyncio.sleep(0.5)  # the coordinator's exporter would have sent a span by now
    assert handle.task.trace_context["traceparent"].split("-")[1] == f"{0x5CE:032x}"
    assert handle.task.trace_context["traceparent"].endswith("-00")
    assert [s for s in collector.spans if s.kind == "PRODUCER"] == []
    assert [c.trace_id for c in seen] == [0x5CE] and not seen[0].trace_flags.sampled


@pytest.mark.parametrize(
    ("stored", "read"),
    [
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}, True),
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, False),  # sampled
        ({"traceparent": "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-00"}, False),  # not W3C hex
        ({"traceparent": "00-00000000000000000000000000000000-00f067aa0ba902b7-00"}, False),  # invalid id
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "tracestate": "a=b"}, False),
        ({"traceparent": "not a traceparent"}, False),
        ({}, False),
    ],
)
def test_only_a_lone_unsampled_w3c_traceparent_skips_the_propagators(
    monkeypatch: pytest.MonkeyPatch, stored: dict[str, str], read: bool
) -> None:
    monkeypatch.setattr(tracing, "_w3c", True)
    monkeypatch.setattr(tracing, "_parent_decides", True)
    context = tracing._unsampled_parent(stored)
    assert (context is not None) == read
    if context is not None:
        span = trace.get_current_span(context).get_span_context()
        assert f"{span.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert f"{span.span_id:016x}" == "00f067aa0ba902b7"
        assert span.is_remote and not span.trace_flags.sampled
    monkeypatch.setattr(tracing, "_w3c", False)  # other propagators configured: always theirs
    assert tracing._unsampled_parent(stored) is None
