"""Session steering over a real gRPC socket against a real edge controller (Rust core, stepped
clock, ``ControllerFacade``): a departure applies to the session the request was meant for and
is refused, with what was wrong named, when that session is gone or the departure is already past.
The gap an asynchronous facade leaves between the API's look-up and the change is shown with the
API tests' store facade over a real SQLite store (the in-process facade has none: plain calls).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from edge_testkit import FAST, ToldGateway, settle, stepped_controller
from edge_testkit import controller_tx as _tx
from evcore.api import ApiConfig, EdgeApiServer
from evcore.api.convert import iso, timestamp
from evcore.clock import StepClock
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table
from evcore.store import SessionRecord, open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from test_api_edge import serving

OPERATOR = "operator-token-0123456789"
MD = (("authorization", f"Bearer {OPERATOR}"),)


@dataclass
class Steered:
    ctrl: EdgeController
    clock: StepClock
    stub: pb_grpc.EdgeApiStub
    a: str
    b: str


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


async def test_a_request_for_a_session_that_ended_names_it_and_changes_nothing() -> None:
    """The car at A left (A1 ended) and the next one came (A2): a departure meant for A1 is
    refused naming both and A2 keeps its own; once nobody is there, one meant for A1 is refused
    naming A1 and nothing lands on the empty charger (it would be the next car's). Before, the
    last was refused as "no session at charger 'cp-0001'", without the transaction it was for."""
    async with steered() as s:
        ca = s.ctrl.state.chargers[s.a]
        s.ctrl.on_event(_tx(s.ctrl, s.a, "A1", "ended"))
        s.ctrl.on_event(_tx(s.ctrl, s.a, "A2", "started"))
        meant = _departure(s.a, s.clock.now() + 3600, 10.0, tx="A1")
        err = await _refused(s.stub.SetSessionDeparture(meant, metadata=MD))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "'A1'" in (err.details() or "") and "'A2'" in (err.details() or ""), err.details()
        assert (ca.departure, ca.energy_requested_kwh) == (None, None)
        s.ctrl.on_event(_tx(s.ctrl, s.a, "A2", "ended"))
        for request in (meant, _departure(s.a, s.clock.now() + 3600, 10.0)):
            err = await _refused(s.stub.SetSessionDeparture(request, metadata=MD))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            assert f"no session at charger {s.a!r}" in (err.details() or ""), err.details()
        err = await _refused(s.stub.SetSessionDeparture(meant, metadata=MD))
        assert "transaction 'A1'" in (err.details() or ""), err.details()
        assert (ca.departure, ca.energy_requested_kwh, ca.demand_set_at) == (None, None, None)
        priority = pb.SetSessionPriorityRequest(charger_id=s.a, transaction_id="A1", priority=5.0)
        err = await _refused(s.stub.SetSessionPriority(priority, metadata=MD))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "transaction 'A1'" in (err.details() or ""), err.details()
        assert ca.priority == 1.0


async def test_a_session_that_ends_while_the_api_looks_it_up_is_not_steered(
    tmp_path: Path,
) -> None:
    """A facade that reads asynchronously (here the API tests' store facade, over a real SQLite
    store) leaves a gap between the API's look-up of the session and its change: the car leaves
    and the next one comes meanwhile. Before, the departure meant for T1 landed on the next
    session, T2 (OK answered), and so did the priority meant for T2 on T3; now the API hands the
    facade the transaction it looked up and the facade refuses, in the same step as the change,
    naming both (FAILED_PRECONDITION), and the new session keeps its own demand."""
    async with serving(open_store({"path": str(tmp_path / "store")}, tmp_path), tmp_path) as e:
        read = e.facade.sessions
        arrivals = iter(range(2, 10))

        async def sessions_then_the_next_car_comes() -> Any:
            rows = await read()
            (gone,) = await e.store.list_open_sessions("C1")
            await e.store.upsert_session(replace(gone, ended_at_s=e.clock.now()))
            n = next(arrivals)
            await e.store.upsert_session(
                SessionRecord(f"S1.{n}", "C1", e.clock.now(), transaction_id=f"T{n}", priority=1.0)
            )
            return rows

        e.facade.sessions = sessions_then_the_next_car_comes  # type: ignore[method-assign]
        departure = _departure("C1", e.clock.now() + 3600, 10.0)
        err = await _refused(e.stub.SetSessionDeparture(departure, metadata=MD))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "'T1'" in (err.details() or "") and "'T2'" in (err.details() or ""), err.details()
        priority = pb.SetSessionPriorityRequest(charger_id="C1", priority=5.0)
        err = await _refused(e.stub.SetSessionPriority(priority, metadata=MD))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "'T2'" in (err.details() or "") and "'T3'" in (err.details() or ""), err.details()
        for sid in ("S1.2", "S1.3"):
            s = await e.store.get_session(sid)
            assert s is not None
            assert (s.departure_s, s.energy_requested_kwh, s.priority) == (None, None, 1.0), s
