"""Which site is calling: the common name of its client certificate (mTLS), checked by a
``grpc.aio.ServerInterceptor`` before any handler runs, as the edge API does (evcore.api.auth).

A site may only touch its own records: the interceptor puts the caller's site in
:data:`current_site` for the handlers (uploads are stored under it; ``AuditRecord`` and
``MeterSampleBatch`` carry no site id) and refuses a request naming another ``site_id``
(PERMISSION_DENIED) before the handler sees it. Health checks need no identity.

``insecure`` (local development only) takes the site from the ``x-evcore-site-id`` header of a
plaintext connection: anyone who can reach the port can then write as any site.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

log = logging.getLogger("evcore.cloud.auth")

SITE_HEADER = "x-evcore-site-id"
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})

#: The calling site of the RPC being handled (set by the interceptor).
current_site: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "evcore_cloud_site", default=None
)


def caller_site() -> str:
    site = current_site.get()
    if not site:  # only reachable if a handler were served without the interceptor
        raise RuntimeError("no authenticated site for this call")
    return site


class SiteAuthInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates the calling site and keeps it to its own ``site_id``."""

    def __init__(self, *, insecure: bool = False) -> None:
        self._insecure = insecure
        self.unauthenticated = 0
        self.denied = 0

    def _site(self, metadata: Any, context: Any) -> tuple[str | None, str]:
        if self._insecure:
            for key, value in metadata or ():
                if key.lower() == SITE_HEADER:
                    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                    return (text.strip() or None), f"empty {SITE_HEADER} header"
            return None, f"insecure mode: send the site id in the {SITE_HEADER} header"
        names = context.auth_context().get("x509_common_name") or []
        if len(names) != 1:
            return None, "a client certificate with one common name (the site id) is required"
        raw = names[0]
        cn = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return (cn or None), "the client certificate's common name is empty"

    async def _check(self, method: str, metadata: Any, context: Any, request: Any) -> None:
        site, why = self._site(metadata, context)
        if site is None:
            self.unauthenticated += 1
            log.info("cloud: %s refused: %s", method, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            raise AssertionError("unreachable: abort raises")
        named = getattr(request, "site_id", None)
        if isinstance(named, str):
            if not named:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "site_id is required")
            if named != site:
                self.denied += 1
                log.warning("cloud: %s by site %r for site %r denied", method, site, named)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"site {site!r} may not touch site {named!r}",
                )
        current_site.set(site)

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

        def check(context: Any, request: Any = None) -> Awaitable[None]:
            return self._check(method, metadata, context, request)

        return _wrap(handler, check)


def _wrap(handler: Any, check: Callable[..., Awaitable[None]]) -> Any:
    """The same handler with ``check`` run first, in the call's own task (so the context variable
    reaches the handler). Unary requests are shown to ``check`` for their ``site_id``."""
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            await check(context, request)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> Any:
            await check(context, request)
            async for item in _stream(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(request_iterator: Any, context: Any) -> Any:
            await check(context)
            return await inner_su(request_iterator, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner_ss = handler.stream_stream

    async def stream_stream(request_iterator: Any, context: Any) -> Any:
        await check(context)
        async for item in _stream(inner_ss(request_iterator, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


async def _stream(result: Any) -> Any:
    """Yield from an async-generator handler; await one that writes with ``context.write``."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    elif inspect.isawaitable(result):
        await result
