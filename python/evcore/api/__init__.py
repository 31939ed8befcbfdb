"""The edge's operator API: ``EdgeApi`` over grpc.aio with bearer-token/mTLS roles (docs/api.md).

    api = EdgeApiServer(facade, ApiConfig.from_section(site.sections.get("api"), base_dir),
                        site_id=site.id, clock=clock, store=store)
    await api.start(); …; await api.stop(grace_s=2.0)

The API reads and steers only through :class:`EdgeFacade`; it never decides a setpoint.
"""

from __future__ import annotations

from evcore.api.auth import (
    GRID_OPERATOR,
    OPERATOR,
    VIEWER,
    AuthConfigError,
    Credentials,
    Principal,
    token_sha256,
)
from evcore.api.facade import EdgeFacade, FacadeError, NotApplicable, UnknownTarget
from evcore.api.server import ApiConfig, ApiConfigError, EdgeApiServer, EdgeApiService, TlsConfig

__all__ = [
    "GRID_OPERATOR",
    "OPERATOR",
    "VIEWER",
    "ApiConfig",
    "ApiConfigError",
    "AuthConfigError",
    "Credentials",
    "EdgeApiServer",
    "EdgeApiService",
    "EdgeFacade",
    "FacadeError",
    "NotApplicable",
    "Principal",
    "TlsConfig",
    "UnknownTarget",
    "token_sha256",
]
