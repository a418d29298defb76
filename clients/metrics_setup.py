"""The Prometheus scrape endpoint of a long-running Herder process (`--metrics ADDR`).

OpenTelemetry's SDK records; its Prometheus exporter turns the instruments into the Prometheus text
format, served by prometheus_client's HTTP server bound to ADDR only. Both packages are in the
`server` and `metrics` extras, not the SDK's dependencies: a client that submits tasks pays nothing.
Off (no provider, no port) unless an address is given. Instruments are created by each process's own
metrics module (herder.server.metrics, herder.supervisor.metrics) once the provider is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_PORT = 9464


class MetricsError(RuntimeError):
    """The endpoint cannot be served: the packages are missing, or the address cannot be bound."""


def parse_address(value: str) -> str:
    """A `--metrics` value: "" (off) or HOST:PORT."""
    value = value.strip()
    if not value:
        return ""
    host, sep, port = value.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return value


@dataclass(slots=True)
class Endpoint:
    """A running scrape endpoint; `close()` stops serving (safe twice)."""

    address: str
    _server: Any
    _provider: Any

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve(address: str, service_name: str) -> Endpoint:
    """Install a global MeterProvider exporting to Prometheus and serve it at `address` (HOST:PORT).

    Raises MetricsError, saying why, before anything is served when the packages are not installed or
    the address cannot be bound.
    """
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise MetricsError(
            f"--metrics needs opentelemetry-sdk and opentelemetry-exporter-prometheus: pip install 'herder[metrics]'"
            f" ({exc})"
        ) from None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        server, _thread = start_http_server(int(port), addr=host)
    except OSError as exc:
        raise MetricsError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader()],
        resource=Resource.create({"service.name": service_name}),
        # The Prometheus text format carries no exemplars; looking for one halves a record's speed.
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    metrics.set_meter_provider(provider)
    return Endpoint(address, server, provider)
