"""Forwarding a read to the leader: how a follower answers for state only the leader holds in memory.

ListQueues and ListNodes describe the leader's scheduler and worker sessions, which no other
replica has. A follower passes such a call on to the current leader and hands back its answer
or its status unchanged. A forwarded call carries `herder-forwarded: 1`; a replica that gets
one and does not lead refuses it (UNAVAILABLE) rather than forwarding again, so a call crosses
at most one hop whatever the replicas believe about who leads.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from herder.clients import errors, tracing
from herder.clients.proto.v1 import coordinator_pb2

FORWARDED_METADATA_KEY = "herder-forwarded"
# Caller metadata worth carrying to the leader: the trace context, so the hop shows in the trace.
_PASSED_ON = ("traceparent", "tracestate")
_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
# The most a forwarded call may take when the caller set no deadline.
DEFAULT_TIMEOUT = 5.0
# How long calls still in flight on a former leader's channel may finish before it is closed.
_CLOSE_GRACE = 1.0

# A leader's answer is as large as it may send to any client (ListNodes with many labelled sessions).
_OPTIONS = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]

M = TypeVar("M", bound=Message)


def is_forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """True when another replica forwarded this call (it must not be forwarded again)."""
    return any(key == FORWARDED_METADATA_KEY for key, _ in context.invocation_metadata() or ())


class Forwarder:
    """One cached channel to the current leader; channels to former leaders are closed as it changes.

    `close()` closes every channel (calls in flight end CANCELLED); safe to call twice.
    """

    def __init__(self, own_address: str = "") -> None:
        self.own_address = own_address
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def forward(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        context: grpc.aio.ServicerContext[Any, Any],
        leader_address: str,
    ) -> M:
        """The leader's answer to `method(request)`, within the caller's remaining deadline (or DEFAULT_TIMEOUT).

        Raises NotLeaderError when no leader is known, the leader is this replica's own address or
        the call was forwarded already. A status from the leader (or from failing to reach it) ends
        the caller's call with that status via `context.abort`.
        """
        if is_forwarded(context):
            raise errors.NotLeaderError(
                "this coordinator does not lead and does not forward a call forwarded to it",
                leader_address=leader_address if leader_address != self.own_address else "",
            )
        if not leader_address or leader_address == self.own_address:
            # Our own address with no leadership here: a predecessor's key not yet expired.
            raise errors.NotLeaderError(f"no leader to forward {method} to; retry shortly")
        remaining = context.time_remaining()
        timeout = DEFAULT_TIMEOUT if remaining is None else max(remaining, 0.0)
        try:
            return await self._call(method, request, response_type, context, leader_address, timeout)
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            trailing = tuple(exc.trailing_metadata() or ())
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not any(
                key == errors.LEADER_METADATA_KEY for key, _ in trailing
            ):
                # Not the leader's own answer but failing to reach it: say which hop failed.
                details = f"the leader at {leader_address} did not answer {method}: {details}"
            await context.abort(exc.code(), details, trailing)
            raise AssertionError("unreachable") from exc

    async def ask(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        context: grpc.aio.ServicerContext[Any, Any],
        leader_address: str,
        timeout: float,
    ) -> M | None:
        """The leader's answer, or None when there is no other leader or it did not answer within
        `timeout` (for what a follower adds to its own answer when it can)."""
        if is_forwarded(context) or not leader_address or leader_address == self.own_address:
            return None
        try:
            return await self._call(method, request, response_type, context, leader_address, timeout)
        except grpc.aio.AioRpcError:
            return None

    async def _call(
        self,
        method: str,
        request: Message,
        response_type: type[M],
        context: grpc.aio.ServicerContext[Any, Any],
        leader_address: str,
        timeout: float,
    ) -> M:
        metadata = [(FORWARDED_METADATA_KEY, "1")]
        metadata += [(k, v) for k, v in context.invocation_metadata() or () if k in _PASSED_ON and isinstance(v, str)]
        call = self._channel(leader_address).unary_unary(
            f"/{_SERVICE}/{method}",
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        response: M = await call(request, timeout=timeout, metadata=metadata)
        return response

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            # Leadership changed: the former leader's channel is of no further use.
            for old in self._channels.values():
                closing = asyncio.create_task(old.close(_CLOSE_GRACE))
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
            self._channels = {
                address: grpc.aio.insecure_channel(
                    address, options=_OPTIONS, interceptors=tracing.client_interceptors()
                )
            }
            channel = self._channels[address]
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)
        for closing in list(self._closing):
            with contextlib.suppress(asyncio.CancelledError):
                await closing


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
