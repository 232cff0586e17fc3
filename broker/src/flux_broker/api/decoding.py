"""Request bodies that do not decode as their method's message: INVALID_ARGUMENT, nothing else.

grpc.aio parses each request before the handler sees it. Left alone, bytes that are not the
expected protobuf message (reliability-plan §6.19: valid gRPC framing, garbage payload; or a
string field that is not UTF-8) end a unary call with UNKNOWN and the parser's exception class
in the status text, and log a traceback at ERROR for every such request -- a log flood anyone
who can connect can cause; in a streaming call the failure surfaces inside the handler as an
unexpected error (INTERNAL, with a traceback too).

:class:`UndecodableRequests`, a server interceptor, wraps every method so that such a request
ends the call with INVALID_ARGUMENT (reason ``invalid-argument``) and a message naming what
the parser found, before any handler code runs; for a streaming request it ends the call at
the first bad message, after the good ones before it were handled. The broker logs it at
debug level only. The wrapped handlers are built once per method.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import grpc

from flux_broker.api.status import FluxStatus, abort

__all__ = ["PROBLEM_MAX_CHARS", "Undecodable", "UndecodableRequests"]

_logger = logging.getLogger(__name__)

#: Most characters of the parser's own description a status shows.
PROBLEM_MAX_CHARS: Final = 200

# Generic in the type stubs only.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request whose bytes did not decode.

    Attributes:
        problem: What the parser said, cut to :data:`PROBLEM_MAX_CHARS`.
    """

    problem: str

    def status(self) -> FluxStatus:
        """The INVALID_ARGUMENT status that ends the call."""
        return FluxStatus.from_entry(
            "INVALID_ARGUMENT", f"the request is not a valid protobuf message: {self.problem}"
        )


class UndecodableRequests(grpc.aio.ServerInterceptor):
    """Answer requests that do not decode with INVALID_ARGUMENT (see the module docstring)."""

    def __init__(self) -> None:
        """Start with no method wrapped yet."""
        self._wrapped: dict[str, _Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """The method's handler, wrapped (once per method)."""
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = _wrap(handler)
            self._wrapped[method] = wrapped
        return wrapped


def _wrap(handler: _Handler) -> _Handler:
    """``handler`` with a tolerant deserializer and a behaviour that refuses the marker."""
    deserialize = handler.request_deserializer
    if deserialize is None:  # raw bytes reach the handler; nothing can fail to decode
        return handler
    decode = _tolerant(deserialize)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), decode, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_unary(handler.unary_stream), decode, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _streaming(handler.stream_unary), decode, serialize
        )
    assert handler.stream_stream is not None, handler
    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream), decode, serialize
    )


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:  # noqa: ANN401 -- the method's request type, or the marker
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 -- any parse failure is the client's
            problem = str(error)[:PROBLEM_MAX_CHARS]
            _logger.debug("refusing a request that does not decode: %s", problem)
            return Undecodable(problem)

    return decode


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the behaviour of a method with one request (unary or server-streaming response)."""
    if inspect.isasyncgenfunction(behavior):

        async def responses(request: Any, context: _Context) -> AsyncIterator[Any]:  # noqa: ANN401
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in behavior(request, context):
                yield response

        return responses

    async def respond(request: Any, context: _Context) -> Any:  # noqa: ANN401
        if isinstance(request, Undecodable):
            await _refuse(context, request)
        result = behavior(request, context)
        return await result if inspect.isawaitable(result) else result

    return respond


def _streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the behaviour of a method with a request stream: the marker raises its status."""
    if inspect.isasyncgenfunction(behavior):

        async def responses(requests: AsyncIterator[Any], context: _Context) -> AsyncIterator[Any]:
            async for response in behavior(_checked(requests), context):
                yield response

        return responses

    async def respond(requests: AsyncIterator[Any], context: _Context) -> Any:  # noqa: ANN401
        result = behavior(_checked(requests), context)
        return await result if inspect.isawaitable(result) else result

    return respond


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The requests, until one did not decode: its status is raised (handlers end with it)."""
    async for request in requests:
        if isinstance(request, Undecodable):
            raise request.status()
        yield request


async def _refuse(context: _Context, request: Undecodable) -> None:
    status = request.status()
    await abort(context, status.entry, status.message)
