"""The edge API against the real edge (``EdgeApp``: controller, Rust core, OCPP central system on a
loopback socket, simulated charge points, SQLite store), over a real gRPC socket: a viewer reads
state, sessions, setpoints, node utilisation and watches; an operator holds a charger at 0 A and
changes a session's priority and departure, each applied by the controller's next decision and
explained in the audit trail that ``ListDecisions`` returns; a denied steering call changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from edge_testkit import fleet_on
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.site import load_site
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from evcore.v1.grid_pb2 import Curtailment, GridSignal, PriceUpdate
from evcore.v1.tariff_pb2 import PriceInterval, Tariff

pytestmark = pytest.mark.timeout(150)

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"
GRID = "grid-operator-token-0123456789"


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class LiveEdge:
    app: EdgeApp
    rig: EdgeRig
    stub: pb_grpc.EdgeApiStub
    plugged: list[str]
    idle: list[str]


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveEdge]:
    table: dict[str, Any] = depot_table(4, per_feeder=2, site_id="live")
    table["edge"] = {"tick_s": 0.5, "settle_s": 3.0, "min_on_s": 0.0, "min_off_s": 0.0}
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [
            {"name": "noc", "token": VIEWER, "roles": ["viewer"]},
            {"name": "alice", "token": OPERATOR, "roles": ["operator"]},
            {"name": "dso", "token": GRID, "roles": ["grid_operator"]},
        ],
    }
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    app = EdgeApp(load_site(table), table, clock=WallClock(), store=store)
    runner = asyncio.create_task(app.run())
    rig: EdgeRig | None = None
    try:
        rig = await fleet_on(app, table)
        await rig.wait_for(rig.defaults_held, 30, "a TxDefaultProfile on every station")
        # The failsafe levels count a charger whose first TxDefault is not yet known applied at
        # its maximum (a car plugged in then may draw that): wait for the final levels.
        await rig.wait_for(app.controller.failsafe_is_plain, 30, "the final failsafe levels")
        ids = list(rig.fleet.charger_ids)
        plugged, idle = [ids[0], ids[2]], [ids[1], ids[3]]
        for cid in plugged:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(app.controller.state.chargers[c].transaction_id for c in plugged),
            30,
            "sessions on the chargers with a car",
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
            yield LiveEdge(app, rig, pb_grpc.EdgeApiStub(channel), plugged, idle)
    finally:
        if rig is not None:
            await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 30)


async def test_viewer_reads_the_live_edge(live: LiveEdge) -> None:
    md = auth(VIEWER)
    state = await live.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=md)
    assert state.site_id == "live"
    assert {c.charger_id for c in state.chargers} == set(live.plugged + live.idle)
    assert all(c.online for c in state.chargers)
    assert {f.charger_id for f in state.failsafe_levels} == set(live.plugged + live.idle)
    assert all(f.level_a >= 6.0 for f in state.failsafe_levels)

    sessions = await live.stub.ListSessions(pb.ListSessionsRequest(), metadata=md)
    assert sorted(s.charger_id for s in sessions.sessions) == sorted(live.plugged)
    assert all(s.transaction_id for s in sessions.sessions)

    setpoints = await live.stub.ListSetpoints(pb.ListSetpointsRequest(), metadata=md)
    assert {s.charger_id for s in setpoints.setpoints} == set(live.plugged + live.idle)
    assert all(s.failsafe_a >= 6.0 for s in setpoints.setpoints)

    nodes = await live.stub.GetNodeUtilisation(pb.GetNodeUtilisationRequest(), metadata=md)
    assert {n.node_id for n in nodes.nodes} >= {"grid"}
    grid = next(n for n in nodes.nodes if n.node_id == "grid")
    assert len(grid.phase_limit_a) == 3 and all(x > 0 for x in grid.phase_limit_a)
    assert 0.0 <= grid.utilisation_ratio <= 1.0 + 1e-6

    decisions = await live.stub.ListDecisions(pb.ListDecisionsRequest(limit=5), metadata=md)
    assert decisions.decisions  # the TxDefault decisions at start
    assert all(sp.reason for d in decisions.decisions for sp in d.setpoints)
    assert all(d.trigger and d.config_version for d in decisions.decisions)


async def test_operator_steers_the_live_edge(live: LiveEdge) -> None:
    target, other = live.plugged
    watch = live.stub.WatchChanges(pb.WatchChangesRequest(charger_id=target), metadata=auth(VIEWER))
    seen: list[pb.Change] = []

    async def read_watch() -> None:
        async for change in watch:
            seen.append(change)

    reader = asyncio.create_task(read_watch())
    try:
        await asyncio.sleep(0.5)  # let the stream attach
        await wait_charging(live, target)
        # A viewer may not steer: PERMISSION_DENIED, and the charger stays available.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id=target, available=False),
                metadata=auth(VIEWER),
            )
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await asyncio.sleep(1.5)  # three ticks: time for a wrongly applied change to show
        assert live.app.controller.state.chargers[target].available is True
        assert live.rig.limit_at(target) > 0.0

        # The operator holds it at 0 A: the next decision sends 0 A, recorded with its reason.
        res = await live.stub.SetChargerAvailability(
            pb.SetChargerAvailabilityRequest(charger_id=target, available=False, reason="cable"),
            metadata=auth(OPERATOR),
        )
        assert "alice" in res.detail and "cable" in res.detail
        await live.rig.wait_for(
            lambda: live.rig.limit_at(target) == 0.0, 30, "the charger to enforce 0 A"
        )
        await live.rig.wait_for(
            lambda: any(c.kind == "setpoint" and c.setpoint_a == 0.0 for c in seen),
            10,
            "the 0 A setpoint on the change stream",
        )
        assert any(c.kind == "availability" for c in seen)
        decisions = await live.stub.ListDecisions(
            pb.ListDecisionsRequest(charger_id=target, limit=10), metadata=auth(VIEWER)
        )
        zero = [
            sp
            for d in decisions.decisions
            for sp in d.setpoints
            if sp.charger_id == target and sp.HasField("setpoint_a") and sp.setpoint_a == 0.0
        ]
        assert zero and zero[0].reason, [d.setpoints for d in decisions.decisions]

        # Priority and departure of the other session.
        md = auth(OPERATOR)
        await live.stub.SetSessionPriority(
            pb.SetSessionPriorityRequest(charger_id=other, priority=3.0), metadata=md
        )
        dep = pb.SetSessionDepartureRequest(charger_id=other, energy_requested_kwh=20.0)
        departure_s = int(live.app.clock.now()) + 7200
        dep.departure.FromSeconds(departure_s)
        await live.stub.SetSessionDeparture(dep, metadata=md)
        sessions = await live.stub.ListSessions(
            pb.ListSessionsRequest(charger_id=other), metadata=auth(VIEWER)
        )
        (s,) = sessions.sessions
        assert s.priority == 3.0
        assert s.departure.seconds == departure_s and s.energy_requested_kwh == 20.0
        # The operator's change reaches the edge's store (a restart keeps it).
        stored: list[Any] = []
        for _ in range(200):
            stored = await live.app.store.list_open_sessions(other)
            if stored and stored[0].priority == 3.0 and stored[0].departure_s == departure_s:
                break
            await asyncio.sleep(0.05)
        assert len(stored) == 1, stored
        assert (stored[0].priority, stored[0].departure_s, stored[0].energy_requested_kwh) == (
            3.0,
            departure_s,
            20.0,
        )
    finally:
        watch.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader


async def wait_charging(live: LiveEdge, charger_id: str) -> None:
    """Precondition of a 'nothing changed' check: the edge's last decision for the charger
    leaves it above 0 A, on a TxProfile ("held at …") or on its TxDefault when that is its share
    (since the reclaim no longer caps a session still ramping up, a car that starts on its
    TxDefault at its share keeps it: docs/envelope.md), and the car draws current."""
    store = live.app.store
    last = ""
    for _ in range(600):
        records = await store.audit_records(charger_id=charger_id, newest_first=True, limit=1)
        mine = [sp for r in records for sp in r.setpoints if sp.charger_id == charger_id]
        last = mine[-1].reason if mine else ""
        measured = live.app.controller.state.chargers[charger_id].measured_max_a()
        if (
            mine
            and mine[-1].setpoint_a > 0.0
            and last.startswith(("held at ", "TxDefault"))
            and measured is not None
            and measured > 1.0
            and live.rig.limit_at(charger_id) > 0.0
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the car at {charger_id} never charged on a TxProfile (last: {last!r})")


def steering_state(live: LiveEdge) -> dict[str, tuple[Any, ...]]:
    """What a steering call or a grid signal could change on the real controller."""
    ctrl = live.app.controller
    out: dict[str, tuple[Any, ...]] = {
        cid: (c.available, c.priority, c.departure, c.energy_requested_kwh, c.faulted)
        for cid, c in ctrl.state.chargers.items()
    }
    out["grid"] = (
        tuple(sorted(c.signal_id for c in ctrl.curtailments)),
        tuple(ctrl.prices),
    )
    return out


async def test_every_denial_changes_nothing_on_the_live_edge(live: LiveEdge) -> None:
    target = live.plugged[0]
    now = int(live.app.clock.now())
    departure = pb.SetSessionDepartureRequest(charger_id=target, energy_requested_kwh=5.0)
    departure.departure.FromSeconds(now + 3600)
    signal = GridSignal(curtailment=Curtailment(curtailment_id="c1", node_id="grid", max_kw=1.0))
    signal.curtailment.start.FromSeconds(now)
    signal.curtailment.end.FromSeconds(now + 600)
    tariff = Tariff(tariff_id="t", prices=[PriceInterval(duration_s=3600, price_per_kwh=9.0)])
    tariff.prices[0].start.FromSeconds(now)
    prices = GridSignal(price_update=PriceUpdate(tariff=tariff))
    calls: list[tuple[str, Any, Any]] = []
    for token in (VIEWER, GRID):  # only an operator steers
        calls += [
            (
                token,
                live.stub.SetChargerAvailability,
                pb.SetChargerAvailabilityRequest(charger_id=target, available=False),
            ),
            (
                token,
                live.stub.SetSessionPriority,
                pb.SetSessionPriorityRequest(charger_id=target, priority=9.0),
            ),
            (token, live.stub.SetSessionDeparture, departure),
            (
                token,
                live.stub.ClearChargerFault,
                pb.ClearChargerFaultRequest(charger_id=target),
            ),
        ]
    for token in (VIEWER, OPERATOR):  # only a grid operator posts grid signals
        calls += [
            (token, live.stub.PostGridSignal, pb.PostGridSignalRequest(signal=signal)),
            (token, live.stub.PostGridSignal, pb.PostGridSignalRequest(signal=prices)),
        ]
    calls += [  # a grid operator reads nothing
        (GRID, live.stub.GetSiteState, pb.GetSiteStateRequest()),
        (GRID, live.stub.ListSessions, pb.ListSessionsRequest()),
        (GRID, live.stub.ListSetpoints, pb.ListSetpointsRequest()),
        (GRID, live.stub.GetNodeUtilisation, pb.GetNodeUtilisationRequest()),
        (GRID, live.stub.ListDecisions, pb.ListDecisionsRequest()),
    ]
    await wait_charging(live, target)
    before = steering_state(live)
    for token, method, request in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await method(request, metadata=auth(token))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (method, token)
    watch = live.stub.WatchChanges(pb.WatchChangesRequest(), metadata=auth(GRID))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await watch.read()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert live.app.api.auth.denied == len(calls) + 1
    assert steering_state(live) == before
    await asyncio.sleep(1.5)  # three ticks: time for a wrongly applied change to show
    assert steering_state(live) == before
    assert live.rig.limit_at(target) > 0.0  # still charging: not held at 0 A
    # A grid operator's curtailment of a node the site does not have is NOT_FOUND naming it (it
    # was INVALID_ARGUMENT on the real edge); one with a bad value is INVALID_ARGUMENT; neither
    # is booked.
    bad: list[tuple[str, float, grpc.StatusCode, str]] = [
        ("no-such-node", 1.0, grpc.StatusCode.NOT_FOUND, "unknown node_id 'no-such-node'"),
        ("grid", -1.0, grpc.StatusCode.INVALID_ARGUMENT, "max_kw"),
    ]
    for node_id, max_kw, code, text in bad:
        sig = GridSignal(
            curtailment=Curtailment(curtailment_id="c2", node_id=node_id, max_kw=max_kw)
        )
        sig.curtailment.start.FromSeconds(now)
        sig.curtailment.end.FromSeconds(now + 600)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await live.stub.PostGridSignal(
                pb.PostGridSignalRequest(signal=sig), metadata=auth(GRID)
            )
        assert err.value.code() == code and text in (err.value.details() or ""), err.value
    assert steering_state(live) == before


async def test_an_operator_clears_a_fault_and_the_charger_is_steered_again(
    live: LiveEdge,
) -> None:
    target = live.plugged[0]
    ctrl = live.app.controller
    await wait_charging(live, target)
    # The edge marked it faulted (tests/edge covers how): it is given 0 A and counted at max.
    c = ctrl.state.chargers[target]
    c.faulted, c.fault_reason = True, "ignores its profile: draws 30.0 A against an accepted 6.0 A"
    ctrl.notify("test")
    await live.rig.wait_for(lambda: live.rig.limit_at(target) == 0.0, 15, "the faulted one at 0 A")
    req = pb.ClearChargerFaultRequest(charger_id=target, reason="contactor replaced")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.stub.ClearChargerFault(req, metadata=auth(VIEWER))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and c.faulted
    res = await live.stub.ClearChargerFault(req, metadata=auth(OPERATOR))
    assert "alice" in res.detail and "contactor replaced" in res.detail
    assert "draws 30.0 A" in res.detail  # what it had been faulted for
    assert not c.faulted and not c.fault_reason
    state = await live.stub.GetSiteState(pb.GetSiteStateRequest(), metadata=auth(VIEWER))
    assert not next(x for x in state.chargers if x.charger_id == target).faulted
    # Steered again: the next decisions give it current.
    await live.rig.wait_for(lambda: live.rig.limit_at(target) > 0.0, 15, "steered again")
    with pytest.raises(grpc.aio.AioRpcError) as err:  # not faulted (any more)
        await live.stub.ClearChargerFault(req, metadata=auth(OPERATOR))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not faulted" in (err.value.details() or "")
