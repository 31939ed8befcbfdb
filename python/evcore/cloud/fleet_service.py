"""The operators' ``FleetApi`` over ``grpc.aio`` (proto/evcore/v1/fleet_api.proto), served by the
cloud process beside ``CloudApi``: thin handlers over :class:`evcore.cloud.fleet.FleetCoordinator`.

Auth (an operator certificate with the method's role) runs in the interceptor before any handler
(evcore.cloud.auth). Only the coordinator's deliberate refusals are the caller's mistake, each
naming the field or id: ``FleetInputError`` (bad input, a site's figures that cannot be split)
INVALID_ARGUMENT, ``FleetNotFound`` (an unknown id or site) NOT_FOUND, ``FleetInfeasible``
(floors above a ``require_feasible`` limit) and ``FleetNotActive`` (a re-split of one cancelled
or ended) FAILED_PRECONDITION, ``FleetRevisionConflict`` (a concurrent split of the same id)
ABORTED. Anything else goes to
:func:`evcore.cloud.status.abort_for`: an unreachable database UNAVAILABLE naming the store, any
other error (a plain ``ValueError`` or ``KeyError`` included) a bug, INTERNAL with its traceback
logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from evcore.cloud.auth import caller_operator
from evcore.cloud.fleet import (
    FleetCoordinator,
    FleetInfeasible,
    FleetInputError,
    FleetNotActive,
    FleetNotFound,
)
from evcore.cloud.status import abort_for
from evcore.cloud.store import FleetRevisionConflict
from evcore.v1 import fleet_api_pb2 as fpb
from evcore.v1 import fleet_api_pb2_grpc as fpb_grpc

log = logging.getLogger("evcore.cloud.fleet")

FLEET_SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["FleetApi"].full_name

Req = TypeVar("Req")
Res = TypeVar("Res")


def _codes(
    method: Callable[[Any, Req, Any], Awaitable[Res]],
) -> Callable[[Any, Req, Any], Awaitable[Res]]:
    @functools.wraps(method)
    async def run(self: Any, request: Req, context: Any) -> Res:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except FleetInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except FleetNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (FleetInfeasible, FleetNotActive) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except FleetRevisionConflict as exc:
            await context.abort(grpc.StatusCode.ABORTED, f"{exc}; try again")
        except Exception as exc:
            await abort_for(context, method.__name__, exc, log)
        raise AssertionError("unreachable: abort raises")

    return run


class FleetApiService(fpb_grpc.FleetApiServicer):
    """The handlers; every one acts for the operator the interceptor authenticated."""

    def __init__(self, coordinator: FleetCoordinator) -> None:
        self.coordinator = coordinator

    @_codes
    async def Curtail(
        self, request: fpb.FleetCurtailment, context: Any
    ) -> fpb.FleetCurtailmentResult:
        who = caller_operator().name
        log.info("fleet: Curtail %r by operator %r", request.fleet_curtailment_id, who)
        return await self.coordinator.curtail(request)

    @_codes
    async def Resplit(
        self, request: fpb.FleetCurtailmentRef, context: Any
    ) -> fpb.FleetCurtailmentResult:
        who = caller_operator().name
        log.info("fleet: Resplit %r by operator %r", request.fleet_curtailment_id, who)
        return await self.coordinator.resplit(request.fleet_curtailment_id)

    @_codes
    async def Cancel(
        self, request: fpb.FleetCurtailmentRef, context: Any
    ) -> fpb.FleetCurtailmentResult:
        who = caller_operator().name
        log.info("fleet: Cancel %r by operator %r", request.fleet_curtailment_id, who)
        return await self.coordinator.cancel(request.fleet_curtailment_id)

    @_codes
    async def List(
        self, request: fpb.ListFleetCurtailmentsRequest, context: Any
    ) -> fpb.ListFleetCurtailmentsResponse:
        held = await self.coordinator.list(include_cancelled=request.include_cancelled)
        return fpb.ListFleetCurtailmentsResponse(curtailments=held)

    @_codes
    async def ListSites(self, request: fpb.ListSitesRequest, context: Any) -> fpb.ListSitesResponse:
        return await self.coordinator.site_statuses(list(request.site_ids))
