"""LockService: the gRPC edge of server/locks.py. Every replica serves it; etcd is the arbiter."""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf import duration_pb2

from herder.clients import errors
from herder.clients.proto.v1 import lock_pb2, lock_pb2_grpc
from herder.server import locks, validation
from herder.server._etcd import Etcd
from herder.server.unary import unary

# Time kept back from the caller's deadline so "still held" reaches it before the deadline does.
_DEADLINE_MARGIN = 0.25


class LockServicer(lock_pb2_grpc.LockServiceServicer):
    def __init__(self, etcd: Etcd, ns: bytes, limits: validation.Limits) -> None:
        self._etcd = etcd
        self._ns = ns
        self._limits = limits
        # Acquires waiting on this replica, against Limits.max_lock_waiters.
        self._waiting = 0

    @unary
    async def Acquire(
        self, request: lock_pb2.AcquireRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lock_pb2.AcquireResponse:
        validation.raise_if(validation.validate_acquire(request, self._limits), "invalid lock request")
        # etcd leases count whole seconds: a TTL is rounded up, never shortened.
        ttl = math.ceil(request.ttl.ToNanoseconds() / 1e9)
        wait = request.wait_timeout.ToNanoseconds() / 1e9
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(0.0, min(wait, remaining - _DEADLINE_MARGIN))
        if self._waiting >= self._limits.max_lock_waiters:
            raise errors.ResourceExhaustedError(f"{self._waiting} lock requests wait on this coordinator already")
        self._waiting += 1
        try:
            grant = await locks.acquire(self._etcd, self._ns, request.name, request.owner, ttl, wait)
        finally:
            self._waiting -= 1
        return lock_pb2.AcquireResponse(
            lease_id=f"{grant.lease:016x}", fencing_token=grant.token, ttl=duration_pb2.Duration(seconds=grant.ttl)
        )

    @unary
    async def Refresh(
        self, request: lock_pb2.RefreshRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lock_pb2.RefreshResponse:
        lease = self._lease(request.name, request.lease_id)
        left = await locks.refresh(self._etcd, self._ns, request.name, lease)
        return lock_pb2.RefreshResponse(ttl=duration_pb2.Duration(seconds=left))

    @unary
    async def Release(
        self, request: lock_pb2.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> lock_pb2.ReleaseResponse:
        lease = self._lease(request.name, request.lease_id)
        await locks.release(self._etcd, self._ns, request.name, lease)
        return lock_pb2.ReleaseResponse()

    def _lease(self, name: str, lease_id: str) -> int:
        validation.raise_if(validation.validate_lock_ref(name, lease_id, self._limits), "invalid lock reference")
        return int(lease_id, 16)
