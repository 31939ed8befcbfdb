"""Running a check before a gRPC handler, for the edge API's and the cloud's auth interceptors.

:class:`CheckingInterceptor` leaves health checks (and unknown methods) alone and wraps every other
handler so that its ``check`` runs first, in the call's own task and context: a context variable it
sets reaches the handler, and a ``context.abort`` it raises means the handler never runs. What to
check is the subclass's; this module never decides who may call what.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

#: Methods anyone may call (load balancers, orchestrators).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: ``check(context, request)``; ``request`` is ``None`` for a streamed request.
Check = Callable[[Any, Any], Awaitable[object]]


class CheckingInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Runs :meth:`check` before the handler of every method not in :data:`OPEN_METHODS`."""

    async def check(self, method: str, metadata: Any, context: Any, request: Any) -> object:
        """Abort the call (``await context.abort(...)``) to keep its handler from running."""
        raise NotImplementedError

    def aborted(self, method: str, code: grpc.StatusCode | None) -> None:
        """A call of ``method`` was aborted with ``code`` (by ``check`` or its handler)."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        metadata = handler_call_details.invocation_metadata

        def check(context: Any, request: Any) -> Awaitable[object]:
            return self.check(method, metadata, context, request)

        def aborted(context: Any) -> None:
            self.aborted(method, _code_of(context))

        return wrap_handler(handler, check, aborted)


def _code_of(context: Any) -> grpc.StatusCode | None:
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    # (grpc.aio may give the code's number.)
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)


class BadRequest:
    """What a request that does not decode as its message turns into (instead of gRPC's bare
    UNKNOWN "Unexpected DecodeError"): the handler aborts it with INVALID_ARGUMENT."""

    __slots__ = ("why",)

    def __init__(self, why: str) -> None:
        self.why = why


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever a custom deserializer raises
            return BadRequest(f"the request is not a valid message ({len(data)} bytes): {exc}")

    return decode


async def _refuse(context: Any, request: Any) -> None:
    if isinstance(request, BadRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.why)


async def _checked_items(request_iterator: Any, context: Any) -> Any:
    async for item in request_iterator:
        await _refuse(context, item)
        yield item


def wrap_handler(handler: Any, check: Check, aborted: Callable[[Any], None] | None = None) -> Any:
    """The same handler with ``check`` run first, in the call's own task (so a context variable it
    sets reaches the handler). Unary requests are shown to ``check``; streamed ones are not. A
    request (or streamed item) that does not decode is INVALID_ARGUMENT, after ``check``.
    ``aborted(context)`` is told of every abort (``check``'s or the handler's)."""
    wrapped = _checked(handler, check)
    return wrapped if aborted is None else _telling_aborts(wrapped, aborted)


def _checked(handler: Any, check: Check) -> Any:
    kw = {
        "request_deserializer": _lenient(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await check(context, None if isinstance(request, BadRequest) else request)
            await _refuse(context, request)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await check(context, None if isinstance(request, BadRequest) else request)
            await _refuse(context, request)
            async for item in _stream(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            await check(context, None)
            return await inner_su(_checked_items(request_iterator, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator: Any, context: Any) -> Any:
        await check(context, None)
        async for item in _stream(inner_ss(_checked_items(request_iterator, context), context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


def _telling_aborts(handler: Any, aborted: Callable[[Any], None]) -> Any:
    """``handler`` whose behaviours call ``aborted(context)`` when they abort the call."""

    def unary(fn: Any) -> Any:
        async def run(request: Any, context: Any) -> Any:
            try:
                return await fn(request, context)
            except grpc.aio.AbortError:
                aborted(context)
                raise

        return run

    def streaming(fn: Any) -> Any:
        async def run(request: Any, context: Any) -> Any:
            try:
                async for item in _stream(fn(request, context)):
                    yield item
            except grpc.aio.AbortError:
                aborted(context)
                raise

        return run

    # (grpc's RpcMethodHandler is a named tuple.)
    return handler._replace(
        unary_unary=handler.unary_unary and unary(handler.unary_unary),
        stream_unary=handler.stream_unary and unary(handler.stream_unary),
        unary_stream=handler.unary_stream and streaming(handler.unary_stream),
        stream_stream=handler.stream_stream and streaming(handler.stream_stream),
    )


async def _stream(result: Any) -> Any:
    """Yield from an async-generator handler; await a handler that writes with ``context.write``."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
