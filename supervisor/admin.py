"""The supervisor's local admin API: SupervisorService (GetStatus, Drain), grpc.health.v1 and reflection.

Health is SERVING while a coordinator session is open and the handler answers, NOT_SERVING
otherwise, for the whole server ("") and for herder.v1.SupervisorService. WatchResources streams
the sampler's samples, at most MAX_RESOURCE_WATCHERS streams at once, each holding only the newest
sample (a slow reader skips samples). WatchAlerts streams the active alerts, then each raise and
resolution, at most MAX_ALERT_WATCHERS streams at once (see supervisor/alerting.py for its bound).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from herder.clients import tracing
from herder.clients.alerts import to_proto
from herder.clients.proto.v1 import supervisor_pb2, supervisor_pb2_grpc
from herder.clients.reflection import enable_reflection, static_catalog
from herder.clients.resources import ResourceSampler
from herder.supervisor.alerting import Alerter, FellBehind

SERVICE_NAME = supervisor_pb2.DESCRIPTOR.services_by_name["SupervisorService"].full_name

# A local admin API has a handful of readers (a dashboard, an alerting agent); more is a leak.
MAX_RESOURCE_WATCHERS = 16
MAX_ALERT_WATCHERS = 16


@dataclass(frozen=True, slots=True)
class Status:
    """What GetStatus reports, read from the engine and the handler runner."""

    worker_id: str
    session_id: str
    coordinator_address: str
    connected: bool
    draining: bool
    slots: int
    running: int
    task_types: tuple[str, ...]
    handler_available: bool
    resources: supervisor_pb2.ResourceSample | None = field(default=None)
    alerts: tuple[supervisor_pb2.Alert, ...] = ()
    alerts_raised: dict[str, int] = field(default_factory=dict)
    attempts: tuple[supervisor_pb2.HeldAttempt, ...] = ()


class _Servicer(supervisor_pb2_grpc.SupervisorServiceServicer):
    def __init__(
        self,
        status: Callable[[], Status],
        drain: Callable[[], Awaitable[int]],
        sampler: ResourceSampler | None,
        alerter: Alerter | None,
    ) -> None:
        self._status = status
        self._drain = drain
        self._sampler = sampler
        self._alerter = alerter
        self._watchers = 0

    async def GetStatus(
        self, request: supervisor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> supervisor_pb2.GetStatusResponse:
        s = self._status()
        return supervisor_pb2.GetStatusResponse(
            worker_id=s.worker_id,
            session_id=s.session_id,
            coordinator_address=s.coordinator_address,
            connected=s.connected,
            draining=s.draining,
            slots=s.slots,
            running=s.running,
            task_types=list(s.task_types),
            resources=s.resources,
            alerts=s.alerts,
            alerts_raised=s.alerts_raised,
            attempts=s.attempts,
        )

    async def Drain(
        self, request: supervisor_pb2.DrainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> supervisor_pb2.DrainResponse:
        return supervisor_pb2.DrainResponse(running=await self._drain())

    async def WatchResources(
        self, request: supervisor_pb2.WatchResourcesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[supervisor_pb2.WatchResourcesResponse]:
        if self._sampler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this supervisor samples no resources")
        if self._watchers >= MAX_RESOURCE_WATCHERS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"already {self._watchers} WatchResources streams, the limit ({MAX_RESOURCE_WATCHERS})",
            )
        assert self._sampler is not None
        self._watchers += 1
        try:
            # The sampler hands each stream only its newest sample: nothing queues behind a slow reader.
            async for sample in self._sampler.watch():
                yield supervisor_pb2.WatchResourcesResponse(sample=sample)
        finally:
            self._watchers -= 1

    async def WatchAlerts(
        self, request: supervisor_pb2.WatchAlertsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[supervisor_pb2.WatchAlertsResponse]:
        if self._alerter is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this supervisor evaluates no alerts")
        assert self._alerter is not None
        if self._alerter.watchers >= MAX_ALERT_WATCHERS:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"already {self._alerter.watchers} WatchAlerts streams, the limit ({MAX_ALERT_WATCHERS})",
            )
        try:
            async for alert in self._alerter.watch():
                yield supervisor_pb2.WatchAlertsResponse(alert=to_proto(alert))
        except FellBehind as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


class AdminServer:
    """The admin gRPC server on `listen`; `port` is the bound port once started.

    `status()` is read for GetStatus and for health (refreshed every `refresh` seconds);
    `drain()` starts the supervisor's shutdown and returns how many attempts were running.
    """

    def __init__(
        self,
        listen: str,
        status: Callable[[], Status],
        drain: Callable[[], Awaitable[int]],
        refresh: float = 0.5,
        sampler: ResourceSampler | None = None,
        alerter: Alerter | None = None,
    ) -> None:
        self._listen = listen
        self._status = status
        self._refresh = refresh
        self._server = grpc.aio.server(interceptors=tracing.server_interceptors())
        self._health = health.aio.HealthServicer()
        supervisor_pb2_grpc.add_SupervisorServiceServicer_to_server(
            _Servicer(status, drain, sampler, alerter), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        enable_reflection(
            self._server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), static_catalog()
        )
        self._updater: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be bound."""
        try:
            self.port = self._server.add_insecure_port(self._listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._listen}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}: the address is in use or invalid")
        await self._server.start()
        await self._update()
        self._updater = asyncio.create_task(self._update_loop(), name="herder-supervisor-health")

    async def stop(self, grace: float = 1.0) -> None:
        if self._updater is not None:
            self._updater.cancel()
            await asyncio.wait({self._updater})
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def _update_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh)
            await self._update()

    async def _update(self) -> None:
        s = self._status()
        serving = s.connected and s.handler_available and not s.draining
        state = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, state)


__all__ = ["MAX_ALERT_WATCHERS", "MAX_RESOURCE_WATCHERS", "SERVICE_NAME", "AdminServer", "Status"]
