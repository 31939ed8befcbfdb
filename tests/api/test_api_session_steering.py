"""Session steering over a real gRPC socket against a real edge controller (Rust core, stepped
clock, ``ControllerFacade``): a departure applies to the session the request was meant for and
is refused, with what was wrong named, when that session is gone or the departure is already past.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from edge_testkit import FAST, ToldGateway, settle, stepped_controller
from evcore.api import ApiConfig, EdgeApiServer
from evcore.api.convert import iso, timestamp
from evcore.clock import StepClock
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import TransactionEvent
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc

OPERATOR = "operator-token-0123456789"
MD = (("authorization", f"Bearer {OPERATOR}"),)


@dataclass
class Steered:
    ctrl: EdgeController
    clock: StepClock
    stub: pb_grpc.EdgeApiStub
    a: str
    b: str


def _tx(ctrl: EdgeController, cid: str, tx: str, kind: str) -> TransactionEvent:
    return TransactionEvent(
        charger_id=cid,
        ocpp_id=ctrl.state.chargers[cid].ocpp_id,
        transaction_id=tx,
        kind=kind,  # type: ignore[arg-type]
        at=ctrl.clock.now(),
        id_tag=None,
        meter_start_wh=0.0,
        meter_now_wh=0.0,
        session_energy_wh=0.0,
    )


@contextlib.asynccontextmanager
async def steered(policy: str = "fair_share") -> AsyncIterator[Steered]:
    """Two 32 A chargers on one 32 A feeder (equal weights: 16 / 16), sessions A1 and B1, and
    the edge API over their controller on 127.0.0.1."""
    ctrl, clock = stepped_controller(
        depot_table(2, per_feeder=2, grid_share=1.0),
        ToldGateway(),
        cfg=EdgeConfig(**{**FAST, "policy": policy}),
    )
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    ctrl.on_event(_tx(ctrl, a, "A1", "started"))
    ctrl.on_event(_tx(ctrl, b, "B1", "started"))
    await settle(ctrl, clock, 4)
    config = ApiConfig.from_section(
        {
            "listen": "127.0.0.1:0",
            "tokens": [{"name": "alice", "token": OPERATOR, "roles": ["operator"]}],
        },
        ".",
    )
    server = EdgeApiServer(ControllerFacade(ctrl), config, site_id="depot", clock=clock)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Steered(ctrl, clock, pb_grpc.EdgeApiStub(channel), a, b)
    finally:
        await server.stop(0.5)


def _departure(charger_id: str, at_s: float, kwh: float, tx: str = "") -> Any:
    req = pb.SetSessionDepartureRequest(
        charger_id=charger_id, transaction_id=tx, energy_requested_kwh=kwh
    )
    req.departure.CopyFrom(timestamp(at_s))
    return req


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_a_departure_already_past_is_refused_naming_it() -> None:
    """Before: OK, and the session at A took a departure 10 minutes past: under least_laxity the
    most urgent car on the site (top weight), 26 A beside its neighbour's 6 A."""
    async with steered("least_laxity") as s:
        now = s.clock.now()
        await s.stub.SetSessionDeparture(_departure(s.b, now + 4 * 3600, 20.0), metadata=MD)
        past = _departure(s.a, now - 600, 10.0, tx="A1")
        err = await _refused(s.stub.SetSessionDeparture(past, metadata=MD))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        details = err.details() or ""
        assert f"departure {iso(now - 600)} is not after now ({iso(now)})" in details, details
        ca = s.ctrl.state.chargers[s.a]
        assert (ca.departure, ca.energy_requested_kwh) == (None, None)  # nothing taken
        await settle(s.ctrl, s.clock, 6)
        assert (ca.sent, s.ctrl.state.chargers[s.b].sent) == (16.0, 16.0)
        # "Now" itself is not after now either; a second later is taken.
        now = s.clock.now()
        err = await _refused(s.stub.SetSessionDeparture(_departure(s.a, now, 10.0), metadata=MD))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        await s.stub.SetSessionDeparture(_departure(s.a, now + 1, 10.0), metadata=MD)
        assert (ca.departure, ca.energy_requested_kwh) == (now + 1, 10.0)
