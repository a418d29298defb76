"""The task feed: every committed task change, read from one etcd watch, fanned out to WatchTasks streams.

Each replica, leader or follower, runs its own feed, so a watch survives leader changes: the
changes come from etcd, not from the leader's memory. The invariant: `revision` is the highest
etcd revision whose changes have all been published to the hub (etcd never splits a revision
across watch responses), and a subscription made when `revision` is F receives every later
change, so a caller that reads the state at F or later misses nothing.

The feed runs while somebody watches: the first subscription starts it at the current etcd
revision, and it stops `FeedSettings.linger` seconds after the last one leaves, so an unwatched
namespace costs nothing. A broken etcd watch is re-opened from `revision + 1` on the connection's
current endpoint (the election loop reconnects it); if that revision has been compacted, changes
were lost, so every subscription is ended (its stream ends UNAVAILABLE and its client resumes
from the last revision it saw, or gets a fresh snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from herder.clients.backoff import Backoff
from herder.clients.proto.v1 import task_pb2
from herder.server import keys
from herder.server._etcd import CompactedError, Etcd, EtcdError, WatchBatch, prefix_end
from herder.server.watchers import Subscription, TaskFilter, WatchHub, WatchSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """linger: seconds the etcd watch stays open after the last watcher leaves (a client that
    reconnects at once finds it running). retry: waits between attempts to re-open a broken watch."""

    linger: float = 30.0
    retry: Backoff = field(default_factory=lambda: Backoff(initial=0.2, max=2.0))


class Feed:
    """The replica's task feed. `subscribe` and `unsubscribe` from the event loop; `close` on shutdown."""

    def __init__(self, etcd: Etcd, ns: bytes, settings: FeedSettings | None = None) -> None:
        self._etcd = etcd
        self._prefix = keys.tasks_prefix(ns)
        self._settings = settings or FeedSettings()
        self.hub = WatchHub()
        self.revision = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._idle: asyncio.TimerHandle | None = None
        self._starting = asyncio.Lock()
        self._closed = False
        # Why the last subscriptions were ended by the feed rather than by their own stream.
        self.ended_reason = ""

    async def subscribe(
        self, task_filter: TaskFilter, settings: WatchSettings, name: str = ""
    ) -> tuple[Subscription, int]:
        """A subscription to every change after the returned revision that matches the filter.

        Starts the feed when it is not running (raises EtcdError when etcd does not answer).
        """
        async with self._starting:
            if self._closed:
                raise EtcdError("the coordinator is shutting down")
            if self._task is None or self._task.done():
                # Read the current revision, then watch from the next: nothing falls in between.
                self.revision = await self.etcd_revision()
                self._task = asyncio.create_task(self._run(), name="herder-task-feed")
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            # No await between these two: the revision is exactly where the subscription starts.
            return self.hub.subscribe(task_filter, settings, name), self.revision

    async def etcd_revision(self) -> int:
        """etcd's current revision, as a one-key read of the tasks prefix tells it. Raises EtcdError."""
        _, _, revision = await self._etcd.range(self._prefix, prefix_end(self._prefix), limit=1, keys_only=True)
        return int(revision)

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget the subscription; the last one to leave starts the linger timer."""
        self.hub.unsubscribe(sub)
        if not len(self.hub) and self._task is not None and self._idle is None and not self._closed:
            self._idle = asyncio.get_running_loop().call_later(self._settings.linger, self._stop_if_idle)

    def _stop_if_idle(self) -> None:
        self._idle = None
        if not len(self.hub) and self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            # Kept until it has unwound (its etcd watch cancelled), so close() can wait for it too.
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """Stop the feed and end every subscription. Safe to call twice."""
        self._closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        tasks = [*self._stopping, *([self._task] if self._task is not None else [])]
        self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._end_all("the coordinator is shutting down")

    def _end_all(self, reason: str) -> None:
        self.ended_reason = reason
        self.hub.close_all()

    async def _run(self) -> None:
        failures = 0
        prefix, end = self._prefix, prefix_end(self._prefix)
        while True:
            try:
                batches = self._etcd.watch_batches(prefix, end, start_revision=self.revision + 1, prev_kv=True)
                async with contextlib.aclosing(batches) as opened:
                    async for batch in opened:
                        failures = 0
                        self._publish(batch)
                raise EtcdError("the watch ended")
            except CompactedError as exc:
                log.warning("task feed: %s; ending every watch so each resumes or starts again", exc)
                self._end_all(f"changes after revision {self.revision} were compacted away in etcd")
                return
            except EtcdError as exc:
                failures += 1
                delay = self._settings.retry.delay(failures)
                log.warning("task feed: %s; re-opening from revision %d in %.1fs", exc, self.revision + 1, delay)
                await asyncio.sleep(delay)
            except Exception:
                # A bug or an undecodable record: watchers must not wait for changes that never come.
                log.exception("task feed failed at revision %d; ending every watch", self.revision)
                self._end_all(f"the task feed failed after revision {self.revision}")
                return

    def _publish(self, batch: WatchBatch) -> None:
        hub = self.hub
        if len(hub):
            for event in batch.events:
                # Deletes are retention removing finished tasks: not a change of state.
                if event.deleted:
                    continue
                if not hub.may_want(event.key[len(self._prefix) :].decode()):
                    continue
                data = event.value
                task = task_pb2.Task.FromString(data)
                if not hub.wants(task.id, task.spec.queue, task.spec.type):
                    continue
                hub.publish(task, data, event.prev_value, event.mod_revision)
        self.revision = max(self.revision, batch.revision)
