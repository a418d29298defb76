"""The coordinator process: etcd connection, election loop and the gRPC server.

It serves CoordinatorService, LockService (on every replica, leader or not: etcd
arbitrates locks; WatchTasks too, from each replica's etcd-fed feed.py),
grpc.health.v1.Health and server reflection. Each replica is registered
under members/ on its own lease (membership.py) and, while it does not lead, follows who
does by watching the leader key, so the address it redirects (or forwards) to is never stale.
A follower serves stored reads from etcd and forwards reads of the leader's memory to it
(service.py says which).
While it leads, a NamespaceLeader holds all leader state; when leadership
is lost (lease gone, fence failed, etcd unreachable) that object is torn down
at once and the replica campaigns again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from herder.clients import errors, metrics_setup, tracing
from herder.clients.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, lock_pb2, lock_pb2_grpc, task_pb2
from herder.clients.reflection import enable_reflection
from herder.server import election, keys, membership, metrics, validation
from herder.server._etcd import Etcd, EtcdCredentials, EtcdError
from herder.server.contracts import TaskTypeRegistry
from herder.server.decoding import DecodingInterceptor
from herder.server.feed import Feed
from herder.server.forwarding import Forwarder
from herder.server.horizon import set_timestamp
from herder.server.leader import LeaderSettings, NamespaceLeader
from herder.server.lock_service import LockServicer
from herder.server.overload import Overload, server_ids
from herder.server.reflection import ContractReflection
from herder.server.service import CoordinatorServicer
from herder.server.watchers import WatchSettings

log = logging.getLogger(__name__)

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
LOCK_SERVICE_NAME = lock_pb2.DESCRIPTOR.services_by_name["LockService"].full_name


class ListenError(RuntimeError):
    """The gRPC address could not be bound."""


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything `herder coordinator` takes; flags and HERDER_* variables fill it."""

    etcd: tuple[str, ...] = ("127.0.0.1:2379",)
    listen: str = "127.0.0.1:50051"
    namespace: str = "default"
    # The address other replicas and clients are told to use; defaults to listen.
    advertise: str = ""
    lease: election.LeaseSettings = field(default_factory=election.LeaseSettings)
    leader: LeaderSettings = field(default_factory=LeaderSettings)
    limits: validation.Limits = field(default_factory=validation.Limits)
    watch: WatchSettings = field(default_factory=WatchSettings)
    etcd_timeout: float = 5.0
    # etcd with authentication on: the user and password every request is made as (never in repr).
    credentials: EtcdCredentials | None = field(default=None, repr=False)
    # Declared in the config file (declared_types.py): registered by each new leader, before any worker.
    task_types: tuple[task_pb2.TaskType, ...] = ()
    # HOST:PORT of the Prometheus scrape endpoint; "" for none.
    metrics: str = ""
    # Submissions are refused while more calls than this wait in gRPC to be picked up, or the event
    # loop runs this many seconds behind (server/overload.py); 0 turns either check off.
    max_waiting_calls: int = 1000
    max_loop_lag: float = 1.0
    # Calls gRPC holds before the coordinator picks them up; past it gRPC itself cancels new ones.
    max_pending_calls: int = 10_000


class Coordinator:
    """One coordinator replica. `async with` or start()/stop(); stop() is safe to call twice."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.replica_id = uuid.uuid4().hex[:12]
        self.prefix = keys.prefix(config.namespace)
        self.limits = config.limits
        self.etcd = Etcd(config.etcd, timeout=config.etcd_timeout, credentials=config.credentials)
        self.leader: NamespaceLeader | None = None
        # WatchTasks on this replica, leader or not, reads task changes from here.
        self.feed = Feed(self.etcd, self.prefix)
        self.reflection = ContractReflection(self.etcd, self.prefix)
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._leader_address = ""
        self._membership: membership.Membership | None = None
        # Followers pass ListQueues and ListNodes on to the leader through it.
        self.forwarder = Forwarder()
        self.started = time.time()
        self.overload = Overload(config.max_loop_lag, config.max_waiting_calls)

    @property
    def address(self) -> str:
        host = self.config.listen.rpartition(":")[0]
        return self.config.advertise or f"{host}:{self.port}"

    def leader_address(self) -> str:
        if self.leader is not None and not self.leader.deposed:
            return self.address
        return self._leader_address

    def not_leader_message(self) -> str:
        """Why a leader-only call is refused here: the details of the UNAVAILABLE it gets."""
        address = self.leader_address()
        if address == self.address:
            return "this coordinator is stepping down; retry on the new leader"
        if self._membership is None or not self._membership.registered:
            seen = f" (the last leader it saw: {address})" if address else ""
            return f"this coordinator is not the leader and cannot reach an etcd quorum{seen}"
        if address:
            return f"this coordinator is not the leader; {address} is"
        return "this coordinator is not the leader, and no replica leads right now (an election is under way)"

    async def start(self) -> None:
        """Connect to etcd, bind the server and start campaigning. Raises EtcdError or ListenError."""
        await self.etcd.connect()
        servers_before = server_ids()
        server = grpc.aio.server(
            # Undecodable requests to any service below are INVALID_ARGUMENT, not UNKNOWN with a traceback.
            interceptors=[DecodingInterceptor(calls=self.overload.calls), *tracing.server_interceptors()],
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                # One bound instead of gRPC's random early drops between 1,000 and 3,000 calls: under
                # load the overload check (server/overload.py) answers them first, clearly.
                ("grpc.server.max_pending_requests", self.config.max_pending_calls),
                ("grpc.server.max_pending_requests_hard_limit", self.config.max_pending_calls),
            ],
        )
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(CoordinatorServicer(self), server)
        lock_pb2_grpc.add_LockServiceServicer_to_server(LockServicer(self.etcd, self.prefix, self.limits), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        enable_reflection(
            server,
            (SERVICE_NAME, LOCK_SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
            self.reflection.catalog,
        )
        try:
            self.port = server.add_insecure_port(self.config.listen)
        except RuntimeError as exc:
            await self.etcd.close()
            raise ListenError(f"cannot listen on {self.config.listen}: {exc}") from exc
        if self.port == 0:
            await self.etcd.close()
            raise ListenError(f"cannot listen on {self.config.listen}: the address is in use or invalid")
        await server.start()
        self._server = server
        self.overload.watch_server(servers_before)
        self.overload.start()
        self.forwarder.own_address = self.address
        await self._set_health()
        me = membership.Member(self.replica_id, self.address, self.started, _version())
        self._membership = membership.Membership(
            self.etcd, self.prefix, me, self.config.lease.ttl, lambda _: self._set_health(), self._reconnect
        )
        self._loop_task = asyncio.create_task(self._lead_loop(), name="herder-election")

    async def _set_health(self) -> None:
        """Health: the process ("") is SERVING while up (liveness); the coordinator service while this replica
        leads or, as a follower, reaches etcd (is registered), so it can answer or redirect (readiness)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        ready = self.leader is not None or (self._membership is not None and self._membership.registered)
        status = serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await _maybe_await(self._health.set("", serving))
        await _maybe_await(self._health.set(LOCK_SERVICE_NAME, serving))
        await _maybe_await(self._health.set(SERVICE_NAME, status))

    def _observe(self, holder: election.LeaderInfo | None) -> None:
        self._leader_address = holder.address if holder else ""

    async def _lead_loop(self) -> None:
        """Campaign, lead until leadership ends, step down, campaign again: until stop.

        Supervised: an unexpected error in one round is logged with its traceback and the
        replica campaigns again with fresh state, so it never stays up without leading.
        """
        while not self._stop.is_set():
            try:
                await self._lead_once()
            except EtcdError as exc:
                log.warning("election: %s; reconnecting", exc)
                await self._reconnect()
            except Exception:
                log.exception("coordinator %s: leading failed; campaigning again", self.replica_id)
                self.leader = None
                await self._set_health()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)

    async def _lead_once(self) -> None:
        hold = await self._membership.hold(self._stop) if self._membership is not None else None
        if hold is None:
            return
        leadership = await election.campaign(
            self.etcd,
            keys.leader(self.prefix),
            self.replica_id,
            self.address,
            hold,
            self.config.lease,
            self._stop,
            self._observe,
        )
        if leadership is None:
            return
        try:
            await self._lead(leadership)
        finally:
            if not await leadership.resign():
                await self._resign_elsewhere(leadership)

    async def _resign_elsewhere(self, leadership: election.Leadership) -> None:
        """Delete the leader key through another etcd member, retrying while an etcd election settles,
        until the lease would have ended anyway: the member we talk to went away with our leadership, and
        without this every replica waits out the lease (TTL seconds without a leader) for a key nobody holds."""
        log.warning("could not delete the leader key; trying through another etcd member")
        deadline = time.monotonic() + self.config.lease.ttl
        while not self._stop.is_set() and time.monotonic() < deadline:
            await self._reconnect()
            if await leadership.resign():
                log.info("leader key deleted through etcd at %s", self.etcd.endpoint)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.2)

    async def _lead(self, leadership: election.Leadership) -> None:
        leader = NamespaceLeader(
            self.etcd, self.config.namespace, leadership, self.config.leader, TaskTypeRegistry(), self.limits
        )
        try:
            try:
                await leader.start()
            except EtcdError as exc:
                log.error("could not rebuild state from etcd: %s", exc)
                return
            try:
                await self._register_declared(leader)
            except EtcdError as exc:
                log.error("could not register the declared task types: %s", exc)
                return
            self.leader = leader
            self._leader_address = self.address
            if metrics.instruments is not None:
                metrics.instruments.leader_changes.add(self.config.namespace)
            await self._set_health()
            log.info("coordinator %s leads namespace %s at %s", self.replica_id, self.config.namespace, self.address)
            waits = [
                asyncio.create_task(leadership.lost.wait()),
                asyncio.create_task(leader.committer.failed.wait()),
                asyncio.create_task(leader.failed.wait()),
                asyncio.create_task(self._stop.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if not self._stop.is_set():
                log.error("coordinator %s lost leadership; stepping down", self.replica_id)
        finally:
            self.leader = None
            self._leader_address = ""
            await self._set_health()
            await leader.stop()

    async def _register_declared(self, leader: NamespaceLeader) -> None:
        """Register the config file's task types, before workers are served, unless etcd already holds
        the same contract (a restart or a new leader then writes nothing)."""
        for declared in self.config.task_types:
            stored = leader.registry.get(declared.name)
            if stored is not None and _same_contract(stored, declared):
                continue
            task_type = task_pb2.TaskType()
            task_type.CopyFrom(declared)
            try:
                await leader.register_type(task_type, registered_by="the coordinator's config file")
            except errors.HerderError as exc:  # e.g. refused as an incompatible change: say so, serve the rest
                log.error("declared task type %s was not registered: %s", declared.name, exc)
                continue
            log.info("registered declared task type %s", declared.name)

    async def _reconnect(self) -> None:
        """Connect again, to the next etcd endpoint first; waits a moment when none answers."""
        try:
            await self.etcd.reconnect()
            log.info("connected to etcd at %s", self.etcd.endpoint)
        except EtcdError as exc:
            log.warning("%s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    async def cluster_status(self) -> coordinator_pb2.GetClusterStatusResponse:
        status = coordinator_pb2.GetClusterStatusResponse(
            namespace=self.config.namespace, etcd_endpoints=list(self.config.etcd)
        )
        holder = await election.current_leader(self.etcd, keys.leader(self.prefix))
        if holder is not None:
            status.leader_id = holder.replica_id
            status.leader_address = holder.address
            status.leader_revision = holder.revision
        for member in await membership.members(self.etcd, self.prefix):
            replica = status.replicas.add(
                id=member.id,
                address=member.address,
                leader=holder is not None and holder.replica_id == member.id,
                version=member.version,
            )
            # Another replica wrote it: clamped like every time the coordinator sets.
            set_timestamp(replica.started, member.started)
        etcd_status = await self.etcd.status()
        status.etcd_version = etcd_status.version
        status.etcd_revision = etcd_status.revision
        status.etcd_db_size_bytes = etcd_status.db_size
        for etcd_member in await self.etcd.members():
            status.etcd_members.add(
                id=etcd_member.id,
                name=etcd_member.name,
                client_urls=etcd_member.client_urls,
                version=etcd_member.version,
                leader=etcd_member.is_leader,
                healthy=not etcd_member.error,
                error=etcd_member.error,
            )
        self.fill_counts(status)
        return status

    def fill_counts(self, status: coordinator_pb2.GetClusterStatusResponse) -> None:
        """Sessions and task counts: the leader's memory (nothing on a follower)."""
        leader = self.leader
        if leader is not None:
            status.sessions = len(leader.workers.sessions)
            counts = leader.counts()
            status.tasks_pending = counts.get(task_pb2.TASK_STATE_PENDING, 0)
            status.tasks_queued = counts.get(task_pb2.TASK_STATE_QUEUED, 0)
            status.tasks_running = counts.get(task_pb2.TASK_STATE_RUNNING, 0) + counts.get(
                task_pb2.TASK_STATE_ASSIGNED, 0
            )

    async def stop(self, grace: float = 2.0) -> None:
        """Step down (releasing the leader key at once), end sessions and stop serving."""
        self._stop.set()
        self.overload.stop()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._membership is not None:
            await self._membership.close()
            self._membership = None
        # Watch streams end UNAVAILABLE, naming the revision to resume from, before the server stops.
        await self.feed.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        await self.forwarder.close()
        await self.etcd.close()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _same_contract(stored: task_pb2.TaskType, declared: task_pb2.TaskType) -> bool:
    return (
        stored.input_type == declared.input_type
        and stored.output_type == declared.output_type
        and stored.description == declared.description
        and stored.descriptors == declared.descriptors
    )


def _version() -> str:
    try:
        return importlib.metadata.version("herder")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _maybe_await(value: object) -> None:
    if asyncio.iscoroutine(value):
        await value


async def serve(config: CoordinatorConfig) -> None:
    """Run a coordinator until SIGINT or SIGTERM. Raises MetricsError before starting when --metrics
    cannot be served."""
    endpoint = metrics_setup.serve(config.metrics, "herder-coordinator") if config.metrics else None
    coordinator = Coordinator(config)
    if endpoint is not None:
        metrics.install(coordinator)
    try:
        await _serve(coordinator, config)
    finally:
        metrics.uninstall()
        if endpoint is not None:
            endpoint.close()


async def _serve(coordinator: Coordinator, config: CoordinatorConfig) -> None:
    await coordinator.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, coordinator.request_stop)
    print(f"herder coordinator listening on {coordinator.address} (namespace {config.namespace})", flush=True)
    try:
        await coordinator.wait_stopped()
    finally:
        await coordinator.stop()
