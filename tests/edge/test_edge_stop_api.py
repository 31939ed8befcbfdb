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
from edge_testkit import until
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
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
