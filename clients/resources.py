"""The node's resources, sampled with psutil: what heartbeats carry and the supervisor streams.

One ResourceSampler per worker process takes a ResourceSample every `interval` seconds: the node's
CPU (since the previous sample), memory, the disk holding `disk_path`, the 1-minute load average,
and the handler process's CPU and RSS when its pid is known. Nothing here blocks: CPU percentages
are deltas since the previous call (psutil's interval=None), the rest are single syscalls. One
sample costs well under a millisecond of CPU (see README "Node resources").

Watchers get the latest sample only: one that reads slowly skips samples, nothing queues up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psutil

from herder.clients.proto.v1 import supervisor_pb2

_log = logging.getLogger(__name__)

# Sampling more often than this costs CPU for no use; less often than this leaves nodes stale.
MIN_INTERVAL = 0.1
MAX_INTERVAL = 60.0

# What validate() accepts beyond which a sample is nonsense (no node has these).
MAX_CPU_COUNT = 65_536
MAX_LOAD_AVERAGE = 1e6


@dataclass(frozen=True, slots=True)
class ResourceSettings:
    """What is sampled and how often.

    - `interval`: seconds between samples, MIN_INTERVAL..MAX_INTERVAL (1).
    - `disk_path`: the filesystem whose use is reported is the one holding this path ("." = the
      working directory's).
    - `handler_pid`: the process whose CPU and RSS are reported; None for none.
    """

    interval: float = 1.0
    disk_path: str = "."
    handler_pid: int | None = None

    def __post_init__(self) -> None:
        if not MIN_INTERVAL <= self.interval <= MAX_INTERVAL:
            raise ValueError(
                f"resource sampling interval must be {MIN_INTERVAL:g} to {MAX_INTERVAL:g} seconds, got {self.interval}"
            )
        if self.handler_pid is not None and self.handler_pid < 1:
            raise ValueError(f"handler pid must be >= 1, got {self.handler_pid}")


class ResourceSampler:
    """Takes samples every settings.interval while run() runs; `latest` is the newest (None before the first)."""

    def __init__(self, settings: ResourceSettings | None = None) -> None:
        self.settings = settings or ResourceSettings()
        self._disk_path = os.path.abspath(self.settings.disk_path)
        self._handler: psutil.Process | None = None
        self._handler_pid = self.settings.handler_pid
        self._handler_gone_logged = False
        self._latest: supervisor_pb2.ResourceSample | None = None
        self._changed = asyncio.Event()
        # The first cpu_percent(interval=None) calls measure since nothing: prime them now.
        psutil.cpu_percent(interval=None)
        self._attach_handler()

    @property
    def latest(self) -> supervisor_pb2.ResourceSample | None:
        return self._latest

    def sample(self) -> supervisor_pb2.ResourceSample:
        """Take one sample now, make it `latest` and wake watchers. Does not block on I/O beyond statvfs."""
        sample = supervisor_pb2.ResourceSample(
            cpu_percent=psutil.cpu_percent(interval=None),
            cpu_count=psutil.cpu_count() or 1,
        )
        sample.sample_time.GetCurrentTime()
        memory = psutil.virtual_memory()
        sample.memory_total_bytes = memory.total
        sample.memory_used_bytes = max(memory.total - memory.available, 0)
        try:
            disk = psutil.disk_usage(self._disk_path)
            sample.disk_total_bytes = disk.total
            sample.disk_used_bytes = disk.used
        except OSError as exc:  # the path went away: report no disk rather than stop sampling
            _log.debug("disk usage of %s: %s", self._disk_path, exc)
        with contextlib.suppress(AttributeError, OSError):  # no load average on this platform
            sample.load_average_1m = os.getloadavg()[0]
        self._sample_handler(sample)
        self._latest = sample
        # Wake every watcher and arm a new event for the next sample.
        self._changed.set()
        self._changed = asyncio.Event()
        return sample

    async def run(self) -> None:
        """Sample until cancelled. A failing sample is logged and skipped; the loop goes on."""
        while True:
            try:
                self.sample()
            except Exception:
                _log.exception("resource sample failed")
            await asyncio.sleep(self.settings.interval)

    async def watch(self) -> AsyncIterator[supervisor_pb2.ResourceSample]:
        """The latest sample at once (when there is one), then each newer one a reader is ready for.

        A slow reader gets the newest sample when it comes back, never a backlog. Ends only when
        the caller stops iterating (or is cancelled).
        """
        sent: supervisor_pb2.ResourceSample | None = None
        while True:
            if self._latest is None or self._latest is sent:
                await self._changed.wait()
            sent = self._latest
            assert sent is not None
            yield sent

    @property
    def handler_pid(self) -> int | None:
        return self._handler_pid

    def follow_handler(self, pid: int | None) -> None:
        """Report the process `pid` as the handler from the next sample on (None: no handler process)."""
        if pid is not None and pid < 1:
            raise ValueError(f"handler pid must be >= 1, got {pid}")
        if pid == self._handler_pid:
            return
        self._handler_pid = pid
        self._handler = None
        self._handler_gone_logged = False
        self._attach_handler()

    def _attach_handler(self) -> None:
        pid = self._handler_pid
        if pid is None:
            return
        try:
            self._handler = psutil.Process(pid)
            self._handler.cpu_percent(interval=None)  # prime: the next call measures from here
            self._handler_gone_logged = False
        except psutil.Error:
            self._handler = None
            if not self._handler_gone_logged:
                _log.warning("handler process %d not found: its resources are not reported", pid)
                self._handler_gone_logged = True

    def _sample_handler(self, sample: supervisor_pb2.ResourceSample) -> None:
        if self._handler is None:
            self._attach_handler()  # it may have started since: the supervisor can start first
            return
        try:
            with self._handler.oneshot():
                cpu = self._handler.cpu_percent(interval=None)
                rss = self._handler.memory_info().rss
        except psutil.Error:
            self._handler = None
            return
        sample.handler_pid = self._handler.pid
        sample.handler_cpu_percent = cpu
        sample.handler_rss_bytes = rss


def validate(sample: supervisor_pb2.ResourceSample) -> str:
    """Why the sample is impossible ("" when it is plausible); bounds, not an exact check."""
    cpus = sample.cpu_count
    if not 1 <= cpus <= MAX_CPU_COUNT:
        return f"cpu_count {cpus} is not 1 to {MAX_CPU_COUNT}"
    for name, value, most in (
        ("cpu_percent", sample.cpu_percent, 100.0),
        ("handler_cpu_percent", sample.handler_cpu_percent, 100.0 * cpus),
        ("load_average_1m", sample.load_average_1m, MAX_LOAD_AVERAGE),
    ):
        if not math.isfinite(value) or not 0.0 <= value <= most:
            return f"{name} {value} is not 0 to {most:g}"
    if sample.memory_used_bytes > sample.memory_total_bytes:
        return "memory_used_bytes exceeds memory_total_bytes"
    if sample.disk_used_bytes > sample.disk_total_bytes:
        return "disk_used_bytes exceeds disk_total_bytes"
    if sample.handler_rss_bytes and sample.memory_total_bytes and sample.handler_rss_bytes > sample.memory_total_bytes:
        return "handler_rss_bytes exceeds memory_total_bytes"
    if not sample.HasField("sample_time"):
        return "sample_time is not set"
    # Negative seconds, or absurdly far off (a clock out by a day is broken, not skewed).
    if abs(sample.sample_time.seconds - time.time()) > 86_400:
        return "sample_time is more than a day off"
    return ""


__all__ = ["MAX_INTERVAL", "MIN_INTERVAL", "ResourceSampler", "ResourceSettings", "validate"]
