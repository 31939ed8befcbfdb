"""What the cloud service exposes to Prometheus: its calls, what the uploads stored, the sites.

What this module owns: ``CloudMetrics`` — a ``grpc.aio`` server interceptor that counts every
call by method and status code, the items each upload stored or found repeated (from its
``UploadAck``, or from the trailing metadata of a refused stream), and when each site last
uploaded; plus the site-auth interceptor's own refusal counters, read at scrape time. Every
name is in docs/metrics.md.

What it must never do: change a call's outcome. It only looks at the status code and the answer
a handler produced; an exception goes on unchanged. Labels are bounded: methods are the served
ones, codes gRPC's, sites those that authenticated (the fleet).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from evcore.clock import Clock
from evcore.metrics.exposition import MetricFamily, Registry

__all__ = ["CloudMetrics"]

#: Upload methods and what one item of theirs is.
_UPLOADS = {"UploadAudit": "audit", "UploadTelemetry": "telemetry", "PutTopology": "topology"}


class CloudMetrics:
    """Counters of one ``CloudApiServer``; ``interceptor`` goes after the site-auth interceptor
    (so a call it refuses is counted there, and the site of every call counted here is known)."""

    def __init__(self, clock: Clock, *, auth: Any = None) -> None:
        self.clock = clock
        self.registry = Registry()
        self.calls = self.registry.counter(
            "evcore_cloud_calls_total",
            "Calls answered, by method and gRPC status code (INVALID_ARGUMENT on an upload: "
            "refused, e.g. a broken audit chain).",
            ["method", "code"],
        )
        self.items = self.registry.counter(
            "evcore_cloud_upload_items_total",
            "Items the uploads carried: audit records, telemetry batches, topologies; "
            "outcome stored (new) or duplicate (already held).",
            ["kind", "outcome"],
        )
        #: site id -> wall time of its last upload the service answered OK.
        self.last_upload: dict[str, float] = {}
        self.auth = auth
        self.registry.register(self._families)
        self.interceptor = _Interceptor(self)

    def _families(self) -> list[MetricFamily]:
        last = MetricFamily(
            "evcore_cloud_site_last_upload_timestamp_seconds",
            "gauge",
            "When each site's last successful upload (audit, telemetry or topology) was "
            "answered, Unix time: time() - this is how long a site has been silent.",
        )
        for site, at in sorted(self.last_upload.items()):
            last.add(at, {"site_id": site})
        out = [
            last,
            MetricFamily(
                "evcore_cloud_sites_seen",
                "gauge",
                "Sites that uploaded successfully since the service started.",
            ).add(len(self.last_upload)),
        ]
        if self.auth is not None:
            out.append(
                MetricFamily(
                    "evcore_cloud_auth_unauthenticated_total",
                    "counter",
                    "Calls refused as UNAUTHENTICATED (no usable identity).",
                ).add(int(getattr(self.auth, "unauthenticated", 0)))
            )
            out.append(
                MetricFamily(
                    "evcore_cloud_auth_denied_total",
                    "counter",
                    "Calls refused as PERMISSION_DENIED: a site acting for another, a "
                    "certificate of the wrong kind or issuer, an operator unknown or without "
                    "the role.",
                ).add(int(getattr(self.auth, "denied", 0)))
            )
        return out

    def finished(
        self,
        method: str,
        context: Any,
        response: Any,
        site: str | None,
        raised: BaseException | None = None,
    ) -> None:
        """Count one call that ended (``response`` None when it raised or was aborted)."""
        code = context.code()
        if code is not None:
            name = str(getattr(code, "name", code))
        elif raised is None:
            name = "OK"
        else:  # not an abort: gRPC answers CANCELLED or UNKNOWN
            name = "CANCELLED" if isinstance(raised, asyncio.CancelledError) else "UNKNOWN"
        self.calls.inc(method=method, code=name)
        kind = _UPLOADS.get(method)
        if kind is None:
            return
        stored = duplicates = 0
        if response is not None:
            stored = int(getattr(response, "stored_count", 0))
            duplicates = int(getattr(response, "duplicate_count", 0))
        else:
            # A refused stream says in its trailing metadata what it stored before the refusal.
            for key, value in context.trailing_metadata() or ():
                if key == "evcore-stored-count" and str(value).isdigit():
                    stored = int(value)
                elif key == "evcore-duplicate-count" and str(value).isdigit():
                    duplicates = int(value)
        if stored:
            self.items.inc(stored, kind=kind, outcome="stored")
        if duplicates:
            self.items.inc(duplicates, kind=kind, outcome="duplicate")
        if response is not None and name == "OK" and site:
            self.last_upload[site] = self.clock.now()


def _site() -> str | None:
    from evcore.cloud.auth import current_site

    return current_site.get()


class _Interceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: CloudMetrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        m = self._m
        kw = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }

        async def unary(behaviour: Any, request: Any, context: Any) -> Any:
            response = raised = None
            try:
                response = await behaviour(request, context)
                return response
            except BaseException as exc:
                raised = exc
                raise
            finally:
                m.finished(method, context, response, _site(), raised)

        async def streamed(behaviour: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            raised = None
            try:
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):
                    await result
            except BaseException as exc:
                raised = exc
                raise
            finally:
                m.finished(method, context, None, _site(), raised)

        if handler.unary_unary is not None:
            uu = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(lambda req, ctx: unary(uu, req, ctx), **kw)
        if handler.stream_unary is not None:
            su = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(lambda req, ctx: unary(su, req, ctx), **kw)
        if handler.unary_stream is not None:
            us = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: streamed(us, req, ctx), **kw
            )
        ss = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(lambda req, ctx: streamed(ss, req, ctx), **kw)
