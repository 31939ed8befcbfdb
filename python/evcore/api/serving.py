"""Starting and stopping a ``grpc.aio`` server the way the edge API and the cloud both do: health
(and optionally reflection) beside the services, a port bound with or without TLS, every service
SERVING once the server runs, NOT_SERVING before in-flight calls get their grace to finish.

What is served, who may call it and which certificates are trusted are the caller's; this module
never reads a configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection


def add_health(
    server: aio.Server,
    health: health_aio.HealthServicer,
    services: Sequence[str],
    *,
    reflection_on: bool,
) -> None:
    """Serve ``health`` on ``server``, and reflection of ``services``, health and itself."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if reflection_on:
        reflection.enable_server_reflection(
            (
                *services,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )


def bind(
    server: aio.Server,
    listen: str,
    credentials: Callable[[], grpc.ServerCredentials | None],
    *,
    error: Callable[[str], Exception],
    tls_section: str,
    where: str = "",
) -> int:
    """Bind ``listen``: with TLS when ``credentials()`` gives credentials, plaintext when it gives
    None. A certificate or key it cannot read, or an address that cannot be bound, raises
    ``error`` naming ``tls_section`` or ``where`` (a prefix such as ``"[api] "``)."""
    try:
        creds = credentials()
        if creds is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, creds)
    except OSError as exc:
        raise error(f"{tls_section}: cannot read certificate or key: {exc}") from exc
    except RuntimeError as exc:
        raise error(f"{where}cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise error(f"{where}cannot listen on {listen}")
    return int(port)


async def start_serving(
    server: aio.Server, health: health_aio.HealthServicer, services: Sequence[str]
) -> None:
    """Start ``server``; then the server as a whole and each of ``services`` report SERVING."""
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in services:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def stop_serving(
    server: aio.Server, health: health_aio.HealthServicer, grace_s: float | None
) -> None:
    """Health NOT_SERVING first (balancers stop sending), then in-flight calls get ``grace_s``."""
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
