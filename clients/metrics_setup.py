"""The Prometheus scrape endpoint of a long-running Herder process (`--metrics ADDR`).

OpenTelemetry's SDK records; its Prometheus exporter turns the instruments into the Prometheus text
format, served by prometheus_client's HTTP server bound to ADDR only. Both packages are in the
`server` and `metrics` extras, not the SDK's dependencies: a client that submits tasks pays nothing.
Off (no provider, no port) unless an address is given. Instruments are created by each process's own
metrics module (herder.server.metrics, herder.supervisor.metrics) once the provider is set.

Histograms recorded per task are the exception: an SDK histogram's `record` costs ~4.5 us (attribute
checks, a lock, a frozenset of the labels), three a task was ~15% of the coordinator's CPU per task,
so they are `Histogram`s below, plain lists (~0.2 us a record) that the same endpoint serves beside
the exporter's families in the same text format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
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


class Histogram:
    """Fixed buckets per label values, recorded on the event loop and read (copied) at scrape time.

    `name` is the Prometheus name, unit included (herder_task_queue_wait_seconds); a value lands in the
    first bucket whose bound is at least the value (Prometheus's `le`), past the last in +Inf.
    """

    __slots__ = ("_series", "bounds", "description", "labels", "name")

    def __init__(self, name: str, description: str, bounds: Sequence[float], labels: Sequence[str] = ()) -> None:
        self.name = name
        self.description = description
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        # label values -> [count per bucket ..., count past the last bound, sum]
        self._series: dict[tuple[str, ...], list[float]] = {}

    def record(self, value: float, *labels: str) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1
        series[-1] += value

    def snapshot(self) -> list[tuple[tuple[str, ...], list[float]]]:
        """(label values, cumulative counts per bound then +Inf, sum) copies, safe from another thread."""
        return [(labels, [*accumulate(series[:-1]), series[-1]]) for labels, series in list(self._series.items())]


# Every Histogram the process records, served by the endpoint (instruments are created once a process).
histograms: list[Histogram] = []


def histogram(name: str, description: str, bounds: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
    """A Histogram served at the scrape endpoint (replacing one of the same name)."""
    made = Histogram(name, description, bounds, labels)
    histograms[:] = [h for h in histograms if h.name != name] + [made]
    return made


class _HistogramCollector:
    """prometheus_client's side of `histograms`: one histogram family each, at every scrape."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        for made in list(histograms):
            family = HistogramMetricFamily(made.name, made.description, labels=made.labels)
            edges = [*(_bound(b) for b in made.bounds), "+Inf"]
            for labels, values in made.snapshot():
                family.add_metric(list(labels), list(zip(edges, values[:-1], strict=True)), values[-1])
            yield family


def _bound(value: float) -> str:
    return repr(float(value))


_collector_registered = False


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
        from prometheus_client import REGISTRY, start_http_server
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
    global _collector_registered
    if not _collector_registered:
        REGISTRY.register(_HistogramCollector())
        _collector_registered = True
    return Endpoint(address, server, provider)
