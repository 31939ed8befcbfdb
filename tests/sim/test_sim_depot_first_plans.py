"""The depot's first cloud plans give the first bus the room the allocator has for it.

On the depot (24 x 90 kW DC chargers, 700 kW contract) the edge counts every idle charger at its
failsafe level (26,056 W DC, 27.44 kW AC each), and the cloud planner leaves that room free
(``held_outside_plan``). With the first bus plugged in, 23 idle chargers hold 631.2 kW and the
building is planned at its 41.4 kW maximum (the allocator, with the building metered at half
its maximum, grants the bus 48 kW). The twin's cloud planner took its 10 % kW margin of the
whole 700 kW cap (630 kW left) before that room was taken off, which left nothing: its first
four plans (17:40-17:58) planned 0 kWh for the whole night and held the bus at 0 W from 17:42
to 18:08. The margin is now taken of what the idle chargers leave: 0.9 x 68.8 kW = 61.9 kW, the
building's 41.4 kW off it, 20.5 kW AC for the bus."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from evcore.sim import stack
from evcore.sim.arrivals import generate
from evcore.sim.scenario import load_scenario, with_overrides

ok, why = stack.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")


def test_the_depots_first_cloud_plan_gives_the_first_bus_its_room() -> None:
    sc = load_scenario("depot")
    arr = generate(sc)  # the whole night's sessions; the run stops at 17:51
    first = min(arr.sessions, key=lambda s: s.arrival_s)
    others = [s.arrival_s for s in arr.sessions if s is not first]
    seen: dict[str, Any] = {}
    probe_s = first.arrival_s + 25 * 60.0  # after the first cloud plan (15 min + a re-plan)
    assert probe_s < min(others), "the probe must see the first bus alone"

    def probe(run: stack.StackRun) -> None:
        ctrl = run._app.controller
        seen["plan"] = ctrl.cloud_plan
        seen["sent_w"] = ctrl.state.chargers[first.charger_id].sent
        seen["now"] = run.clock.now()
        seen["plans"] = run.plans

    run = stack.StackRun(
        with_overrides(sc, duration_h=probe_s / 3600.0 + 0.01),
        "planner_cost",
        arr,
        probes=[(probe_s, probe)],
    )
    asyncio.run(run.run())

    assert seen["plans"] >= 1 and run.plan_failures == 0
    plan = seen["plan"]
    assert plan is not None and plan.source == "cloud"
    steps = plan.rows[first.charger_id]
    planned_kwh = sum(d * target for _, d, target in steps) / 3.6e6
    # 20.5 kW AC of room for hours (the other buses' room is held until they arrive): was 0.0.
    assert planned_kwh > 100.0, planned_kwh
    (target_w,) = plan.targets_at(seen["now"], None).values()
    # 20.5 kW AC less the 0.3 kW auxiliary load, x 0.96: 19.4 kW DC (was 0).
    assert target_w == pytest.approx(19_410.0, rel=0.02)
    assert seen["sent_w"] is not None and math.isclose(seen["sent_w"], target_w, rel_tol=0.02)
