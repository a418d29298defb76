"""examples/invoice/service.py, a TaskHandlerService in plain grpc.aio, as a real process.

The tests speak to it as a supervisor would: Herder's handler stubs on the outside, and the invoice
messages built only from the FileDescriptorSet its Describe returns.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from _cluster import Coordinator
from _helpers import process_group
from _timing import eventually_sync
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from herder.clients.embedded_etcd import free_port
from herder.clients.proto.v1 import coordinator_pb2 as pb
from herder.clients.proto.v1 import coordinator_pb2_grpc, handler_pb2, handler_pb2_grpc, task_pb2

pytestmark = pytest.mark.timeout(30)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "invoice"
SERVICE = EXAMPLE / "service.py"
# Long enough that half of it, as a deadline, still leaves time for the first answer on a loaded machine.
RENDER_SECONDS = 1.0
METADATA = (
    ("herder-task-id", "t-42"),
    ("herder-attempt", "3"),
    ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),
)


@dataclass
class Service:
    address: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def _service() -> Iterator[Service]:
    """The example service on a free port, SERVING; killed at exit (its log is shown on failure)."""
    address = f"127.0.0.1:{free_port()}"
    with tempfile.NamedTemporaryFile(prefix="invoice-", suffix=".log", delete=False) as log:
        args = [sys.executable, str(SERVICE), "--listen", address, "--render-seconds", str(RENDER_SECONDS)]
        with process_group(args, stdout=log) as process:
            service = Service(address, process, Path(log.name))
            try:
                eventually_sync(lambda: process.poll() is not None or _serving(address), "the service SERVING")
                assert process.poll() is None, service.log_text()
                yield service
            finally:
                sys.stderr.write(f"--- invoice service log ---\n{service.log_text()}\n")
    Path(log.name).unlink()


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    with _service() as value:
        yield value


@dataclass
class Contract:
    """The described task type and the invoice message classes built from its descriptor set alone."""

    handled: handler_pb2.HandledType
    request: type[Message]
    invoice: type[Message]


def _describe(address: str) -> Contract:
    with grpc.insecure_channel(address) as channel:
        response = handler_pb2_grpc.TaskHandlerServiceStub(channel).Describe(handler_pb2.DescribeRequest(), timeout=5)
    (handled,) = response.task_types
    pool = descriptor_pool.DescriptorPool()
    for file in handled.descriptors.file:  # dependencies first, so each Add finds its imports
        pool.Add(file)
    request = message_factory.GetMessageClass(pool.FindMessageTypeByName(handled.input_type))
    invoice = message_factory.GetMessageClass(pool.FindMessageTypeByName(handled.output_type))
    return Contract(handled, request, invoice)


@pytest.fixture(scope="module")
def contract(service: Service) -> Contract:
    return _describe(service.address)


def _task(payload: Message, task_id: str = "t-42") -> handler_pb2.ExecuteRequest:
    packed = any_pb2.Any()
    packed.Pack(payload)
    spec = task_pb2.TaskSpec(type="invoices.create", payload=packed)
    return handler_pb2.ExecuteRequest(task=task_pb2.Task(id=task_id, spec=spec, attempt=3))


async def _execute(address: str, request: handler_pb2.ExecuteRequest, **call: Any) -> list[handler_pb2.ExecuteResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = handler_pb2_grpc.TaskHandlerServiceStub(channel)
        return [response async for response in stub.Execute(request, metadata=METADATA, timeout=10, **call)]


def _valid(contract: Contract, **fields: Any) -> Message:
    values: dict[str, Any] = {
        "customer": "acme",
        "currency": "EUR",
        "items": [
            {"description": "widget", "quantity": 2, "unit_price_minor": 1250},
            {"description": "support", "quantity": 1, "unit_price_minor": 999},
        ],
        "tax_rate_bps": 2000,
    }
    values.update(fields)
    return contract.request(**values)


def test_describe_returns_invoices_create_with_its_descriptor_set(contract: Contract) -> None:
    assert contract.handled.name == "invoices.create"
    assert contract.handled.input_type == "invoices.v1.CreateInvoiceRequest"
    assert contract.handled.output_type == "invoices.v1.Invoice"
    # Dependencies first: the well-known import, then the service's own file.
    assert [f.name for f in contract.handled.descriptors.file] == [
        "google/protobuf/timestamp.proto",
        "invoices/v1/invoice.proto",
    ]
    assert {"customer", "currency", "items", "tax_rate_bps"} <= set(contract.request.DESCRIPTOR.fields_by_name)


async def test_valid_invoice_reports_progress_then_the_invoice(service: Service, contract: Contract) -> None:
    responses = await _execute(service.address, _task(_valid(contract)))

    kinds = [r.WhichOneof("message") for r in responses]
    assert kinds[-1] == "output" and kinds[:-1] and set(kinds[:-1]) == {"progress"}, kinds
    assert [r.progress.fraction for r in responses[:-1]] == sorted(r.progress.fraction for r in responses[:-1])
    invoice = contract.invoice()
    assert responses[-1].output.Unpack(invoice)
    assert (invoice.subtotal_minor, invoice.tax_minor, invoice.total_minor) == (3499, 700, 4199)  # type: ignore[attr-defined]
    assert [line.amount_minor for line in invoice.lines] == [2500, 999]  # type: ignore[attr-defined]
    assert invoice.number == "INV-t-42"  # type: ignore[attr-defined]
    assert "task t-42 attempt 3: issued INV-t-42" in service.log_text()


async def test_invalid_invoice_fails_without_retry_naming_each_field(service: Service, contract: Contract) -> None:
    bad = _valid(contract, customer=" ", currency="eur", items=[{"description": "x", "quantity": 0}])
    responses = await _execute(service.address, _task(bad))

    assert len(responses) == 1 and responses[0].WhichOneof("message") == "error"
    error = responses[0].error
    assert (error.type, error.retryable) == ("invoices.invalid", False)
    for field in ("customer", "currency", "items[0].quantity"):
        assert field in error.message


async def test_payload_of_another_type_is_invalid(service: Service) -> None:
    responses = await _execute(service.address, _task(task_pb2.Progress(fraction=0.5)))

    assert [(r.error.type, r.error.retryable) for r in responses] == [("invoices.invalid", False)]
    assert "invoices.v1.CreateInvoiceRequest" in responses[0].error.message


async def test_undecodable_payload_is_invalid(service: Service) -> None:
    request = _task(task_pb2.Progress())
    request.task.spec.payload.CopyFrom(
        any_pb2.Any(type_url="type.googleapis.com/invoices.v1.CreateInvoiceRequest", value=b"\xff")
    )
    responses = await _execute(service.address, request)

    assert [(r.error.type, r.error.retryable) for r in responses] == [("invoices.invalid", False)]


async def test_too_short_a_deadline_fails_at_once_and_retryably(service: Service, contract: Contract) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = handler_pb2_grpc.TaskHandlerServiceStub(channel)
        call = stub.Execute(_task(_valid(contract)), metadata=METADATA, timeout=RENDER_SECONDS / 2)
        responses = [response async for response in call]

    assert responses[-1].error.type == "invoices.deadline" and responses[-1].error.retryable


async def test_cancelling_the_call_cancels_the_attempt(service: Service, contract: Contract) -> None:
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = handler_pb2_grpc.TaskHandlerServiceStub(channel)
        call = stub.Execute(_task(_valid(contract), task_id="t-cancel"), metadata=(("herder-task-id", "t-cancel"),))
        first = await call.read()
        assert isinstance(first, handler_pb2.ExecuteResponse) and first.WhichOneof("message") == "progress"
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()

    eventually_sync(lambda: "task t-cancel attempt 3: canceled" in service.log_text(), "the attempt canceled")


def test_health_is_serving(service: Service) -> None:
    with grpc.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "herder.v1.TaskHandlerService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_coordinator_registers_the_described_type_and_accepts_its_payloads(
    coordinator: Coordinator, contract: Contract
) -> None:
    handled = contract.handled
    task_type = task_pb2.TaskType(
        name=handled.name,
        input_type=handled.input_type,
        output_type=handled.output_type,
        descriptors=handled.descriptors,
    )
    packed = any_pb2.Any()
    packed.Pack(_valid(contract))
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))
        typed = await stub.SubmitTask(pb.SubmitTaskRequest(spec=task_pb2.TaskSpec(type=handled.name, payload=packed)))
        as_json = task_pb2.TaskSpec(
            type=handled.name,
            payload_json='{"customer": "acme", "currency": "EUR", "items": [{"description": "x", "quantity": 1}]}',
        )
        from_json = await stub.SubmitTask(pb.SubmitTaskRequest(spec=as_json))
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await stub.SubmitTask(
                pb.SubmitTaskRequest(spec=task_pb2.TaskSpec(type=handled.name, payload_json='{"nope": 1}'))
            )

    assert typed.task.id and typed.task.spec.payload.type_url.endswith("invoices.v1.CreateInvoiceRequest")
    request = contract.request()
    assert from_json.task.spec.payload.Unpack(request) and request.customer == "acme"  # type: ignore[attr-defined]
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_example_imports_nothing_from_herder() -> None:
    sources = [SERVICE, *sorted((EXAMPLE / "gen").rglob("*.py"))]
    herder_imports = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            herder_imports += [f"{path.name}: {name}" for name in names if name.split(".")[0] == "herder"]
    assert len(sources) > 5 and herder_imports == []


def test_sigterm_stops_the_service_cleanly() -> None:
    with _service() as service:
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
        assert "stopped" in service.log_text()
