"""The edge API is no longer served, healthy or steering, once the controller stops (review of
the edge room, 2026-12-06): ``EdgeApp.run`` stopped controller and planner first (the planner
waits for a plan mid-solve up to ``plan_budget_s`` + 2 s), then the cloud link and metrics, and
the API last; in that window a lever was answered OK and applied to a state no decision would
read again, and health reported SERVING. Real ``EdgeApp`` (controller on the Rust core, central
system, local planner) and its API on a real gRPC socket; the planner's stop is held back (as a
plan mid-solve holds it) to keep the window open."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from edge_testkit import fleet_on, until
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.site import load_site
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.timeout(120)

OPERATOR = "operator-token-0123456789"
MD = (("authorization", f"Bearer {OPERATOR}"),)


async def _health(channel: grpc.aio.Channel) -> str:
    """The API's health: SERVING / NOT_SERVING, or the status code when nothing answers."""
    try:
        res = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="evcore.v1.EdgeApi"), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        return str(exc.code())
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(res.status))


async def test_no_lever_is_taken_and_health_is_not_serving_once_the_controller_stops(
    tmp_path: Path,
) -> None:
    table: dict[str, Any] = depot_table(2, per_feeder=2, site_id="stop")
    table["edge"] = {
        "policy": "planner_cost",
        "tick_s": 0.5,
        "settle_s": 2.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "replan_every_s": 3600.0,
    }
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [{"name": "alice", "token": OPERATOR, "roles": ["operator"]}],
    }
    app = EdgeApp(load_site(table), table, clock=WallClock())
    ctrl = app.controller
    cid = next(iter(ctrl.state.chargers))
    # The window: the controller stopped, the planner's stop held (a plan mid-solve).
    controller_stopped = asyncio.Event()
    stop_controller, stop_planner = ctrl.stop, app.planner.stop

    def ctrl_stop() -> None:
        stop_controller()
        controller_stopped.set()

    ctrl.stop = ctrl_stop  # type: ignore[method-assign]
    app.planner.stop = lambda: None  # type: ignore[method-assign]
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
            stub = pb_grpc.EdgeApiStub(channel)
            assert await _health(channel) == "SERVING"
            app.stop()
            await asyncio.wait_for(controller_stopped.wait(), 10)
            await until(lambda: ctrl._stopping, 5, "the controller stopping")
            health = await _health(channel)
            lever = stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id=cid, available=False), metadata=MD
            )
            try:
                res = await lever
                answered = f"OK: {res.detail}"
            except grpc.aio.AioRpcError as exc:
                answered = f"{exc.code()}: {exc.details()}"
            # Nothing taken that no decision would read.
            available = ctrl.state.chargers[cid].available
            assert (health, answered.split(":")[0], available) == (
                health if health != "SERVING" else "not SERVING",
                "StatusCode.UNAVAILABLE",
                True,
            ), answered
    finally:
        stop_planner()
        app.stop()
        await asyncio.wait_for(runner, 30)


async def test_a_lever_answered_ok_before_the_stop_is_decided_before_the_controller_ends(
    tmp_path: Path,
) -> None:
    """A lever answered OK while a decision is in progress (its audit record on its way to the
    store), then the stop: the API stops first, then the controller, whose loop ended after the
    decision in progress without deciding again. The operator was told OK and charger A went
    on charging (SetChargerAvailability false: A is to be held at 0 A)."""
    table: dict[str, Any] = depot_table(2, per_feeder=2, site_id="stoplever")
    table["edge"] = {
        "tick_s": 0.5,
        "settle_s": 2.0,
        "min_on_s": 0.0,
        "min_off_s": 0.0,
        "audit_timeout_s": 20.0,  # the held record below must not time out
    }
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [{"name": "alice", "token": OPERATOR, "roles": ["operator"]}],
    }
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    app = EdgeApp(load_site(table), table, clock=WallClock(), store=store)
    ctrl = app.controller
    runner = asyncio.create_task(app.run())
    rig: EdgeRig | None = None
    try:
        rig = await fleet_on(app, table)
        a, b = rig.fleet.charger_ids
        ca = ctrl.state.chargers[a]
        await rig.wait_for(ctrl.failsafe_is_plain, 30, "the final failsafe levels")
        cb = ctrl.state.chargers[b]
        for cid in (a, b):
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(
                c.transaction_id is not None and c.accepted and (c.sent or 0.0) > 6.0
                for c in (ca, cb)
            ),
            30,
            "A and B charging",
        )
        # The next decision's record waits (a slow store write) until released.
        append = ctrl.audit.append  # type: ignore[union-attr]
        held = asyncio.Event()
        released = asyncio.Event()

        async def slow_append(record: Any) -> None:
            if not released.is_set():
                held.set()
                await released.wait()
            await append(record)

        ctrl.audit.append = slow_append  # type: ignore[union-attr]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
            stub = pb_grpc.EdgeApiStub(channel)
            # B held at 0 A: its decision is in progress, its record on its way.
            await stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id=b, available=False), metadata=MD
            )
            await asyncio.wait_for(held.wait(), 10)
            await stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id=a, available=False), metadata=MD
            )
        app.stop()
        await until(lambda: ctrl._stopping, 10, "the controller stopping")
        released.set()
        await asyncio.wait_for(runner, 30)
        # Told OK: decided (and recorded) before the controller ended.
        decided = [
            d
            for d in app.facade.recent_decisions(charger_id=a)
            if "operator" in d["trigger"]
            and any(s["charger_id"] == a and s["new"] == 0.0 for s in d["setpoints"])
        ]
        assert ca.sent == 0.0 and decided, (
            f"SetChargerAvailability({a}, false) answered OK, A left at {ca.sent!r} A; "
            f"decisions {[(d['decision'], d['trigger']) for d in app.facade.recent_decisions()]}"
        )
        # And it reached A's station before the central system closed.
        sim, evse = rig.fleet.station(a)
        held = [*sim.profiles, *(q for _, q in sim._pending_profiles)]
        assert any(p.purpose == "tx" and p.evse == evse and p.periods[0][1] == 0.0 for p in held), [
            (p.purpose, p.evse, p.periods, p.tx_id) for p in held
        ]
    finally:
        if rig is not None:
            await rig.stop()
        app.stop()
        if not runner.done():
            await asyncio.wait_for(runner, 30)
