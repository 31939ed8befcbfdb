"""Which status code an error under a cloud handler (``CloudApi``, ``FleetApi``) reaches its caller
as, once the handler's own refusals are mapped.

Only the cloud's deliberate refusals are the caller's mistake, and each service maps those itself:
``CloudApi`` aborts in place (a refused audit record or telemetry batch, a topology the core
refuses, no plan), ``FleetApi`` by exception type (``FleetInputError``, ``FleetNotFound``,
``FleetInfeasible``, ``FleetRevisionConflict``). Everything else comes here: a store that cannot
be reached is UNAVAILABLE naming the store (an outage: clients retry, every upload is
idempotent), a site's bus that cannot take a fleet signal UNAVAILABLE naming the site and its
outbox, anything else a bug, INTERNAL with its traceback in the log. This module must never
take a plain ``ValueError``, ``KeyError`` or ``LookupError`` for bad input: one raised by a bug
was answered INVALID_ARGUMENT (or NOT_FOUND) and logged nowhere.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc

from evcore.cloud.sitebuses import SiteBusUnavailable
from evcore.store.base import StoreUnavailable


async def abort_for(context: Any, where: str, exc: Exception, log: logging.Logger) -> NoReturn:
    """End the call for ``exc``, which no refusal of the handler's caught: UNAVAILABLE
    ``"<where>: store unavailable: <the store's message naming it>"`` for a store that cannot be
    reached and ``"<where>: bus of site '<site>' unavailable: <outbox> ..."`` for a site's bus
    (each a warning, no traceback), else INTERNAL ``"<where> failed: <repr>"`` with the
    traceback logged (instead of gRPC's bare UNKNOWN)."""
    if isinstance(exc, StoreUnavailable):
        log.warning("cloud: %s: store unavailable: %s", where, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{where}: store unavailable: {exc}")
    elif isinstance(exc, SiteBusUnavailable):
        log.warning("cloud: %s: %s", where, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{where}: {exc}")
    else:
        log.error("cloud: %s failed", where, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"{where} failed: {exc!r}")
    raise AssertionError("unreachable: abort raises") from exc
