"""The invoice example behind `herder supervisor`, end to end: a coordinator, examples/invoice/service.py
and the supervisor, each a real process, driven through the Python SDK's Client."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _cluster import Coordinator
from _helpers import process_group
from _timing import eventually

from herder.clients import Client, Retry
from herder.clients.embedded_etcd import free_port
from herder.clients.errors import TaskFailedError
from herder.clients.proto.v1 import task_pb2

pytestmark = pytest.mark.timeout(45)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "invoice"
# The example's own generated messages, imported as the service imports them (package `gen`).
sys.path.insert(0, str(EXAMPLE))
from gen.invoices.v1 import invoice_pb2  # noqa: E402

TYPE = "invoices.create"


@contextlib.contextmanager
def processes(coordinator: Coordinator, transport: str) -> Iterator[Path]:
    """The invoice service on `transport` ("tcp" or "unix") and a supervisor with 2 slots in front of it,
    each in its own process group, killed at exit; yields the directory of their logs."""
    with tempfile.TemporaryDirectory(prefix="herder-invoice-") as tmp, contextlib.ExitStack() as stack:
        logs = Path(tmp)
        # A short path under /tmp: unix socket paths are limited to about 100 bytes.
        address = f"unix:{logs / 'h.sock'}" if transport == "unix" else f"127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        service = [sys.executable, str(EXAMPLE / "service.py"), "--listen", address, "--render-seconds", "0.05"]
        supervisor = [sys.executable, "-m", "herder.supervisor", "--coordinator", coordinator.address]
        supervisor += ["--handler", address, "--slots", "2"]
        for name, args in (("service", service), ("supervisor", supervisor)):
            log = stack.enter_context(open(logs / f"{name}.log", "wb"))
            stack.enter_context(process_group(args, stdout=log, env=env))
        yield logs


@contextlib.asynccontextmanager
async def sidecar(coordinator: Coordinator, transport: str) -> AsyncIterator[Client]:
    """A Client once the supervisor's session serves invoices.create (see `processes`); on failure
    the service's and the supervisor's logs go to stderr."""
    with processes(coordinator, transport) as logs:
        async with Client(coordinator.address) as client:
            try:

                async def serving() -> bool:
                    return any(TYPE in node.task_types for node in await client.nodes())

                await eventually(serving, "a supervisor session serving invoices.create", timeout=20)
                yield client
            except BaseException:
                for path in sorted(logs.glob("*.log")):
                    sys.stderr.write(f"--- {path.name} ---\n{path.read_text(errors='replace')}\n")
                raise


def _request(**fields: Any) -> invoice_pb2.CreateInvoiceRequest:
    values: dict[str, Any] = {
        "customer": "acme",
        "currency": "EUR",
        "items": [
            invoice_pb2.LineItem(description="widget", quantity=2, unit_price_minor=1250),
            invoice_pb2.LineItem(description="support", quantity=1, unit_price_minor=999),
        ],
        "tax_rate_bps": 2000,
    }
    values.update(fields)
    return invoice_pb2.CreateInvoiceRequest(**values)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_invoice_runs_to_a_typed_result_and_json(coordinator: Coordinator, transport: str) -> None:
    async with sidecar(coordinator, transport) as client:
        handle = await client.submit(TYPE, _request())
        invoice = await handle.result(20, output_type=invoice_pb2.Invoice)
        task = await client.get(handle.id, include_result_json=True)

    assert (invoice.subtotal_minor, invoice.tax_minor, invoice.total_minor) == (3499, 700, 4199)
    assert [line.amount_minor for line in invoice.lines] == [2500, 999]
    assert invoice.number == f"INV-{handle.id}" and invoice.currency == "EUR"
    # The coordinator renders the output from the descriptors the supervisor registered.
    rendered = json.loads(task.result_json)
    assert rendered["number"] == f"INV-{handle.id}"
    assert rendered["total_minor"] == "4199"  # field names as in the .proto; int64 as a JSON string
    assert [line["description"] for line in rendered["lines"]] == ["widget", "support"]


async def test_invalid_invoice_fails_without_retry(coordinator: Coordinator) -> None:
    async with sidecar(coordinator, "tcp") as client:
        bad = _request(currency="eur", items=[invoice_pb2.LineItem(description="x", quantity=0)])
        handle = await client.submit(TYPE, bad, retry=Retry(max_attempts=3, initial_backoff=0.1))
        with pytest.raises(TaskFailedError) as failed:
            await handle.result(20)
        task = await client.get(handle.id)

    assert failed.value.error_type == "invoices.invalid"
    assert task.state == task_pb2.TASK_STATE_FAILED and task.attempt == 1  # not retried
    assert not task.error.retryable and "items[0].quantity" in task.error.message
