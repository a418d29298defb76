"""The one place a unary RPC's Herder and etcd errors become gRPC statuses, for every service."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from herder.clients import errors
from herder.server._etcd import EtcdError

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


def unary(method: Handler[R]) -> Handler[R]:
    """Turn Herder and etcd errors into gRPC statuses (etcd failing is UNAVAILABLE)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        try:
            return await method(self, request, context)
        except errors.HerderError as exc:
            await context.abort_with_status(errors.to_status(exc))
        except EtcdError as exc:
            await context.abort_with_status(errors.to_status(errors.UnavailableError(str(exc))))
        raise AssertionError("unreachable")

    return wrapper
