"""Undecodable requests: bytes that are not the method's request message end the call as INVALID_ARGUMENT.

The invariant: on every method of every service the coordinator serves (CoordinatorService, Health,
reflection), a request that does not parse as the method's message, including a later message on a
stream, ends the call with INVALID_ARGUMENT "the request is not a valid <message>: <reason>". It never
reaches a servicer as a message, never logs a traceback, and logs at most one line per caller host per
`interval`, so garbage cannot flood the log. Left to grpc, each one is UNKNOWN "Unexpected <class
'DecodeError'>" with a traceback.

`DecodingInterceptor` holds it for every handler. grpc parses a unary request before it calls the
behaviour, so there the deserializer returns the error and the wrapped behaviour aborts before the
servicer runs. A streamed request is parsed inside `context.read()` or the request iterator, in the
servicer's own code, so there the deserializer raises `UndecodableRequestError`: servicers let it
propagate (after their own cleanup) and the wrapped behaviour aborts.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc

from herder.clients import errors
from herder.server.overload import Calls

log = logging.getLogger(__name__)

# Not subscriptable at run time; the stubs make it generic.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context = grpc.aio.ServicerContext[Any, Any]

_MAX_REASON = 200


class UndecodableRequestError(Exception):
    """A request's bytes are not the method's request message; its text is the status message."""


@dataclass(slots=True)
class _Lines:
    logged_at: float
    suppressed: int = 0


class LogLimiter:
    """At most one line per key per `interval` seconds. It remembers the `max_keys` keys logged
    last; beyond that the oldest is forgotten, so memory stays bounded whatever callers do."""

    def __init__(self, interval: float = 60.0, max_keys: int = 1024) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._lines: dict[str, _Lines] = {}

    def allow(self, key: str, now: float) -> int | None:
        """None when a line for `key` must be dropped; otherwise how many were dropped since its last line."""
        lines = self._lines.get(key)
        if lines is not None and now - lines.logged_at < self.interval:
            lines.suppressed += 1
            return None
        # Re-inserted so the dict stays ordered by when each key last logged.
        self._lines.pop(key, None)
        self._lines[key] = _Lines(now)
        if len(self._lines) > self.max_keys:
            del self._lines[next(iter(self._lines))]
        return lines.suppressed if lines is not None else 0


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler so an undecodable request is INVALID_ARGUMENT (see the module docstring).

    Handlers are wrapped once per method and reused: the hot path adds one try/except around
    FromString and one isinstance check per call. Sync (non-asyncio) behaviours are left as grpc runs them.
    """

    def __init__(self, limiter: LogLimiter | None = None, calls: Calls | None = None) -> None:
        self._limiter = limiter or LogLimiter()
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        # Calls the wrapped handlers hold now (the overload check tells them from calls still waiting).
        self._calls = calls or Calls()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        # Keyed by methods that have a handler, so bounded by what the server serves.
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: Handler) -> Handler:
        parse = handler.request_deserializer
        if parse is None:
            return handler
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        behaviour = getattr(handler, kind)
        if inspect.isasyncgenfunction(behaviour):
            checked: Callable[..., Any] = self._check_stream(method, behaviour)
        elif inspect.iscoroutinefunction(behaviour):
            checked = self._check(method, behaviour)
        else:
            return handler
        what = _message_name(parse) or f"request for {method}"
        deserializer = _raising(parse, what) if handler.request_streaming else _returning(parse, what)
        # grpc's RpcMethodHandler is a namedtuple; the stubs do not say so.
        replaced: Handler = cast(Any, handler)._replace(request_deserializer=deserializer, **{kind: checked})
        return replaced

    def _check(
        self, method: str, behaviour: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        calls = self._calls

        async def checked(request: Any, context: Context) -> Any:
            calls.open += 1
            try:
                if isinstance(request, UndecodableRequestError):
                    await self._reject(method, request, context)
                return await behaviour(request, context)
            except UndecodableRequestError as exc:
                await self._reject(method, exc, context)
            finally:
                calls.open -= 1

        return checked

    def _check_stream(
        self, method: str, behaviour: Callable[[Any, Context], AsyncGenerator[Any, None]]
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        calls = self._calls

        async def checked(request: Any, context: Context) -> AsyncIterator[Any]:
            calls.open += 1
            try:
                if isinstance(request, UndecodableRequestError):
                    await self._reject(method, request, context)
                # aclosing: when grpc closes this generator, the servicer's closes at once too.
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except UndecodableRequestError as exc:
                await self._reject(method, exc, context)
            finally:
                calls.open -= 1

        return checked

    async def _reject(self, method: str, error: UndecodableRequestError, context: Context) -> None:
        peer = context.peer() or "unknown"
        # By host: every new connection from the same host has a new port.
        host = peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
        suppressed = self._limiter.allow(host, time.monotonic())
        if suppressed is not None:
            more = f"; {suppressed} more from {host} since the last such line" if suppressed else ""
            log.warning(
                "undecodable request to %s from %s: %s (one line per host per %.0fs%s)",
                method,
                peer,
                error,
                self._limiter.interval,
                more,
            )
        await context.abort_with_status(errors.to_status(errors.InvalidArgumentError(str(error))))


def _message_name(parse: Callable[[bytes], Any]) -> str:
    """The protobuf message's full name when the deserializer is its FromString."""
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", "")
    return name if isinstance(name, str) else ""


def _error(what: str, exc: Exception) -> UndecodableRequestError:
    reason = str(exc).removeprefix(f"Error parsing message with type '{what}': ") or type(exc).__name__
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "..."
    return UndecodableRequestError(f"the request is not a valid {what}: {reason}")


# Whatever the deserializer raises means the bytes are not the message; DecodeError is the usual case.
def _returning(parse: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return _error(what, exc)

    return deserialize


def _raising(parse: Callable[[bytes], Any], what: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            raise _error(what, exc) from None

    return deserialize


__all__ = ["DecodingInterceptor", "LogLimiter", "UndecodableRequestError"]
