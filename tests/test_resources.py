"""Node resources: sampled by the Worker and the supervisor, carried in heartbeats, shown by ListNodes,
`herder status` and the supervisor's admin API; nonsense samples are dropped, not fatal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from _cluster import Coordinator
from _helpers import process_group
from _raw_worker import RawWorker
from _timing import eventually
from test_supervisor import HANDLER, supervisor

from herder.clients.backoff import Backoff
from herder.clients.client import Client
from herder.clients.embedded_etcd import free_port
from herder.clients.examples import build_example_worker
from herder.clients.proto.v1 import coordinator_pb2, supervisor_pb2, supervisor_pb2_grpc
from herder.clients.resources import ResourceSampler, ResourceSettings
from herder.clients.worker import WorkerSettings
from herder.supervisor.admin import MAX_RESOURCE_WATCHERS, AdminServer, Status

pytestmark = pytest.mark.timeout(40)

# Samples every 0.2 s, so a refresh shows within a second.
FAST = WorkerSettings(backoff=Backoff(initial=0.05, max=0.3), connect_timeout=5.0, resource_interval=0.2)


async def _node(client: Client, worker_id: str | None = None) -> coordinator_pb2.Node | None:
    for node in await client.nodes():
        if (worker_id is None or node.worker_id == worker_id) and node.HasField("resources"):
            return node
    return None


async def test_worker_node_carries_a_plausible_sample_that_refreshes(coordinator: Coordinator) -> None:
    worker = build_example_worker(coordinator.address, settings=FAST)
    async with worker, Client(coordinator.address) as client:
        first = await eventually(lambda: _node(client), "a node with resources")
        r = first.resources
        assert r.memory_total_bytes == psutil.virtual_memory().total
        assert 0 < r.memory_used_bytes <= r.memory_total_bytes
        assert 0 < r.disk_used_bytes <= r.disk_total_bytes
        assert r.cpu_count == psutil.cpu_count()
        assert 0 <= r.cpu_percent <= 100 and math.isfinite(r.load_average_1m)
        # The Worker is its own handler: this process.
        assert r.handler_pid == os.getpid() and r.handler_rss_bytes > 0

        async def newer() -> bool:
            node = await _node(client)
            return node is not None and node.resources.sample_time.ToNanoseconds() > r.sample_time.ToNanoseconds()

        await eventually(newer, "a newer sample", timeout=5)


async def test_supervisor_reports_handler_rss_and_streams_samples(coordinator: Coordinator) -> None:
    port, admin = free_port(), f"127.0.0.1:{free_port()}"
    handler_args = [sys.executable, HANDLER, "--port", str(port), "--mode", "echo"]
    with process_group(handler_args) as handler_process:
        handler_pid = handler_process.pid
        args = ("--listen", admin, "--node-id", "sidecar-res", "--handler-pid", str(handler_pid))
        with supervisor(coordinator, port, *args, "--resource-interval", "0.2"):
            async with Client(coordinator.address) as client:
                node = await eventually(lambda: _node(client, "sidecar-res"), "the supervisor's sample")
            assert node.resources.handler_pid == handler_pid
            assert node.resources.handler_rss_bytes > 1_000_000  # a Python process: megabytes at least
            async with grpc.aio.insecure_channel(admin) as channel:
                stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
                status = await stub.GetStatus(supervisor_pb2.GetStatusRequest(), timeout=5)
                assert status.resources.memory_total_bytes == psutil.virtual_memory().total
                samples: list[supervisor_pb2.ResourceSample] = []
                call = stub.WatchResources(supervisor_pb2.WatchResourcesRequest(), timeout=10)
                async for response in call:
                    samples.append(response.sample)
                    if len(samples) == 2:
                        call.cancel()
                        break
    assert samples[1].sample_time.ToNanoseconds() > samples[0].sample_time.ToNanoseconds()
    assert samples[1].handler_pid == handler_pid


@pytest.mark.parametrize(
    "bad",
    [
        supervisor_pb2.ResourceSample(cpu_percent=math.nan, cpu_count=2),
        supervisor_pb2.ResourceSample(cpu_percent=-5, cpu_count=2),
        supervisor_pb2.ResourceSample(cpu_percent=1e12, cpu_count=2),
        supervisor_pb2.ResourceSample(cpu_count=2, memory_used_bytes=2**60, memory_total_bytes=2**30),
    ],
    ids=["nan", "negative", "huge", "used-above-total"],
)
async def test_nonsense_sample_is_dropped_and_the_session_survives(
    coordinator: Coordinator, bad: supervisor_pb2.ResourceSample
) -> None:
    bad.sample_time.GetCurrentTime()
    async with RawWorker(coordinator.address, "raw-res", ["examples.echo"]) as raw, Client(coordinator.address) as c:
        for _ in range(3):
            await raw.send(heartbeat=coordinator_pb2.Heartbeat(resources=bad))
        warned = "resource sample dropped"

        async def logged() -> bool:
            return warned in coordinator.log_tail(20_000)

        await eventually(logged, "the warning")
        await asyncio.sleep(0.5)  # heartbeats go on: the session must outlive a few more
        nodes = await c.nodes()
        assert [n.worker_id for n in nodes] == ["raw-res"] and not nodes[0].HasField("resources")
        assert raw.error is None and not raw.closed.is_set()
    assert coordinator.log_tail(20_000).count(warned) == 1


async def test_status_json_shows_resources(coordinator: Coordinator) -> None:
    worker = build_example_worker(coordinator.address, worker_id="cli-res", settings=FAST)
    async with worker, Client(coordinator.address) as client:
        await eventually(lambda: _node(client, "cli-res"), "a node with resources")
        for command in ("status", "nodes"):
            process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "herder"),
                "--coordinator",
                coordinator.address,
                "--output",
                "json",
                command,
                stdout=asyncio.subprocess.PIPE,
            )
            with contextlib.suppress(TimeoutError):
                out, _ = await asyncio.wait_for(process.communicate(), 20)
            assert process.returncode == 0
            document = json.loads(out)
            nodes = document["nodes"] if command == "status" else document
            resources = nodes[0]["resources"]
            assert int(resources["memory_total_bytes"]) == psutil.virtual_memory().total
            assert int(resources["disk_total_bytes"]) > 0 and resources["handler_pid"] == os.getpid()


async def test_watch_resources_streams_are_capped() -> None:
    # The admin server alone, on port 0, with a sampler taking samples: no coordinator needed.
    sampler = ResourceSampler(ResourceSettings(interval=0.1))
    status = Status("w", "", "", False, False, 1, 0, (), False)

    async def drain() -> int:
        return 0

    admin = AdminServer("127.0.0.1:0", lambda: status, drain, sampler=sampler)
    sampling = asyncio.create_task(sampler.run())
    await admin.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{admin.port}") as channel:
            stub = supervisor_pb2_grpc.SupervisorServiceStub(channel)
            calls = [stub.WatchResources(supervisor_pb2.WatchResourcesRequest()) for _ in range(MAX_RESOURCE_WATCHERS)]
            for call in calls:
                await asyncio.wait_for(call.read(), 5)  # each stream is open and has its first sample
            extra = stub.WatchResources(supervisor_pb2.WatchResourcesRequest())
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(extra.read(), 5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            calls[0].cancel()

            async def admitted() -> bool:
                call = stub.WatchResources(supervisor_pb2.WatchResourcesRequest())
                try:
                    return isinstance(await asyncio.wait_for(call.read(), 5), supervisor_pb2.WatchResourcesResponse)
                except grpc.aio.AioRpcError:
                    return False
                finally:
                    call.cancel()

            await eventually(admitted, "a stream admitted once another closed", timeout=5)
            for call in calls:
                call.cancel()
    finally:
        await admin.stop(0)
        sampling.cancel()
        await asyncio.wait({sampling})
