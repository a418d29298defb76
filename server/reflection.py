"""The coordinator's server reflection: Herder's files plus the registered task types', from etcd.

grpcurl resolves the `Any` payloads and results in replies, and `describe` of a task type's
message, through reflection. Task types live in etcd and change at run time, so every replica,
leader or follower, reads them from there: the catalog is rebuilt when the types' keys or
revisions changed, checked at most every `refresh` seconds (a registration on this replica
invalidates it at once). When etcd cannot be read, the last catalog is served.

Two types may carry different versions of the same .proto file: the newest registration
(highest etcd mod_revision) wins a file name or a symbol; Herder's own files win over any
task type's copy of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import DecodeError

from herder.clients.proto.v1 import task_pb2
from herder.clients.reflection import Catalog, base_files
from herder.server import keys
from herder.server._etcd import Etcd, EtcdError, KeyValue, prefix_end

log = logging.getLogger(__name__)


class ContractReflection:
    """The reflection catalog of one namespace; `catalog()` is the source `enable_reflection` awaits."""

    def __init__(self, etcd: Etcd, prefix: bytes, refresh: float = 0.5, timeout: float = 2.0) -> None:
        self._etcd = etcd
        self._types = keys.types_prefix(prefix)
        self._refresh = refresh
        # How long a reflection request waits for etcd before it is answered from the last catalog.
        self._timeout = timeout
        self._base = base_files()
        self._catalog = self._build([])
        # (key, mod_revision) of the stored types the catalog was built from.
        self._built_from: tuple[tuple[bytes, int], ...] = ()
        self._checked = float("-inf")
        self._lock = asyncio.Lock()
        self._failing = False

    def invalidate(self) -> None:
        """The next request reads the types again (a type was registered here)."""
        self._checked = float("-inf")

    async def catalog(self) -> Catalog:
        """The current catalog; never raises (on an etcd error, the last one built)."""
        if time.monotonic() - self._checked < self._refresh:
            return self._catalog
        async with self._lock:
            if time.monotonic() - self._checked >= self._refresh:
                try:
                    await self._update()
                except EtcdError as exc:
                    # One line when it starts failing and one when it recovers, not one per request.
                    if not self._failing:
                        log.warning("reflection serves the task types read before: etcd: %s", exc)
                    self._failing = True
                else:
                    if self._failing:
                        log.info("reflection reads the task types from etcd again")
                    self._failing = False
                # Checked even on failure, so a down etcd costs one attempt per `refresh`, not per request.
                self._checked = time.monotonic()
        return self._catalog

    async def _update(self) -> None:
        # Keys only first: the common case, nothing changed, reads no descriptors.
        end = prefix_end(self._types)
        stored, _, revision = await self._etcd.range(self._types, end, keys_only=True, timeout=self._timeout)
        if _versions(stored) == self._built_from:
            return
        kvs, _, _ = await self._etcd.range(self._types, end, revision=revision, timeout=self._timeout)
        types: list[tuple[int, task_pb2.TaskType]] = []
        for kv in kvs:
            # A record that does not parse only costs reflection of that type.
            with contextlib.suppress(DecodeError):
                types.append((kv.mod_revision, task_pb2.TaskType.FromString(kv.value)))
        # Newest registration first: it wins a file name or symbol several types define.
        types.sort(key=lambda item: item[0], reverse=True)
        self._catalog = self._build([task_type for _, task_type in types])
        self._built_from = _versions(kvs)

    def _build(self, types: list[task_pb2.TaskType]) -> Catalog:
        catalog = Catalog()
        catalog.add_all(self._base)
        for task_type in types:
            catalog.add_all(task_type.descriptors.file)
        return catalog


def _versions(kvs: list[KeyValue]) -> tuple[tuple[bytes, int], ...]:
    return tuple((kv.key, kv.mod_revision) for kv in kvs)
