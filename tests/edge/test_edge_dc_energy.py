"""A DC session's energy at the edge: what the car took, and what the grid gave for it.

The edge plans a DC charger in W of its output (into the car) and counts a session's energy still
wanted as ``energy_requested_kwh`` less the session energy the central system reports. That is the
energy into the car (the register at the charger's outlet, docs/ocpp.md). The demand windows are
about the grid: they count a DC session's energy as the grid gave it, over the efficiency plus the
auxiliary load while it charged (``DemandWindows.sample``).

Before (review, 2026-12): the simulated DC charger reported its AC input as the outlet register and
the central system took any register for the outlet's, so the edge took the grid's energy for the
car's: a DC session's remaining energy was understated by the losses (it was planned short).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from edge_testkit import FAST, until
from evcore.clock import WallClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.coreio import RustCore
from evcore.edge.planning import DemandWindows, LocalPlanner
from evcore.edge.state import ChargerState
from evcore.ocpp import CentralSystem
from evcore.sim.ev import EV
from evcore.sim.fleet import Fleet
from evcore.site import load_site

pytestmark = pytest.mark.timeout(60)

EFF = 0.9
AUX_W = 1000.0


def dc_table() -> dict[str, Any]:
    """One 50 kW DC charger (efficiency 0.9, 1 kW of auxiliary load) under a grid connection."""
    return {
        "site": {"id": "dc-edge", "phase_names": ["L1", "L2", "L3"], "voltage_ln_v": 230.0},
        "nodes": [{"id": "grid", "kind": "grid", "phase_limit_a": 400.0}],
        "chargers": [
            {
                "id": "dc-1",
                "ocpp_id": "DC1",
                "parent": "grid",
                "kind": "dc",
                "wiring": "three_phase",
                "phases": ["L1", "L2", "L3"],
                "voltage_v": 230.0,
                "min_w": 5_000.0,
                "max_w": 50_000.0,
                "efficiency": EFF,
                "aux_w": AUX_W,
            }
        ],
        "ocpp": {"host": "127.0.0.1", "port": 0, "security_profile": 0, "sample_interval_s": 1},
    }


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_a_dc_sessions_remaining_energy_is_what_its_car_still_needs(version: str) -> None:
    """End to end: the simulated DC station over real OCPP, the central system and the edge's
    controller and planner. A car asks for 0.2 kWh and charges at 50 kW (no profile: the
    control loop is not running) for about 4 s, then stops. The energy the edge plans for it
    is what its battery still needs (before: less by the losses, 0.2 - 0.062 against 0.2 -
    0.055 kWh); the demand windows count what the station's AC input meter counted."""
    table = dc_table()
    site = load_site(table)
    clock = WallClock()
    cs = CentralSystem(site, clock=clock)
    ctrl = build_controller(
        table, core=RustCore(site, table), gateway=cs, clock=clock, cfg=EdgeConfig(**FAST)
    )
    cs.add_listener(ctrl.on_event)
    await cs.start()
    fleet = Fleet(
        site,
        url=f"ws://127.0.0.1:{cs.port}/ocpp",
        clock=clock,
        version=version,
        apply_delay_s=0.1,
        tick_s=0.05,
        sample_interval_s=1.0,
        reconnect_delay_s=0.2,
    )
    planner = LocalPlanner(site, ctrl)
    windows = DemandWindows(1e9)  # one window for the whole test
    c = ctrl.state.chargers["dc-1"]
    try:
        await fleet.start()
        await fleet.wait_connected()
        windows.sample(clock.now(), ctrl.state.chargers)
        ev = EV(capacity_kwh=1000.0, soc=0.2, max_dc_power_w=50_000.0)
        fleet.plug_in("dc-1", ev)
        await until(lambda: c.transaction_id is not None, 10, "the session at the edge")
        ctrl.set_session("dc-1", energy_requested_kwh=0.2, departure=clock.now() + 3600.0)
        sim = fleet.connector("dc-1")
        for _ in range(8):
            await asyncio.sleep(0.5)
            windows.sample(clock.now(), ctrl.state.chargers)
        ev.target_soc = ev.soc  # the car stops taking energy
        battery_kwh = (ev.soc - 0.2) * 1000.0
        await until(
            lambda: c.session_energy_wh >= 1000.0 * battery_kwh * 0.999,
            5,
            "the last register at the edge",
        )
        await asyncio.sleep(1.2)  # a reading after the car stopped
        windows.sample(clock.now(), ctrl.state.chargers)
        assert battery_kwh > 0.04  # about 14 Wh a second
        req = planner.request(clock.now())
        assert req is not None
        [planned] = req.sessions
        needs_kwh = 0.2 - battery_kwh
        assert planned.energy_requested_kwh == pytest.approx(needs_kwh, abs=0.001)
        # The grid side: the station's AC input meter (its Inlet register) since the start.
        grid_kwh = (sim.inlet_register_wh - 1_000_000.0) / 1000.0
        assert grid_kwh > battery_kwh / EFF
        assert windows.window_kwh() == pytest.approx(grid_kwh, rel=0.01)
    finally:
        await fleet.stop()
        await cs.stop()


def _dc_state() -> ChargerState:
    return ChargerState(
        charger_id="dc-1",
        ocpp_id="DC1",
        is_dc=True,
        min_value=5_000.0,
        max_value=50_000.0,
        dc_efficiency=EFF,
        dc_aux_w=AUX_W,
    )


def test_demand_windows_count_a_dc_sessions_energy_as_the_grid_gave_it() -> None:
    """The session energy of a DC charger is the car's: the window counts it over the
    efficiency, plus the auxiliary load over the time between the readings it grew in (not
    while it stood still: a paused charger)."""
    t0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    w = DemandWindows(86_400.0)
    c = _dc_state()
    chargers = {"dc-1": c}
    c.transaction_id, c.session_energy_wh, c.measured_at = "t1", 0.0, 100.0
    w.sample(t0, chargers)
    c.session_energy_wh, c.measured_at = 9_000.0, 100.0 + 1800.0  # 18 kW into the car, 30 min
    w.sample(t0 + 1800.0, chargers)
    assert w.window_kwh() == pytest.approx(9.0 / EFF + 0.5)  # was 9.0: the car's energy
    c.measured_at = 100.0 + 3600.0  # paused 30 min
    w.sample(t0 + 3600.0, chargers)
    assert w.window_kwh() == pytest.approx(9.0 / EFF + 0.5)
    # A session that started since the last reading: the auxiliary load from its start.
    c.transaction_id, c.session_energy_wh, c.measured_at = "t2", 900.0, 100.0 + 3900.0
    c.session_started_at = t0 + 3600.0
    w.sample(t0 + 3900.0, chargers)
    assert w.window_kwh() == pytest.approx((9.0 + 0.9) / EFF + 0.5 + 300.0 / 3600.0)


def test_demand_windows_count_an_ac_sessions_energy_as_it_is() -> None:
    t0 = 1_767_225_600.0
    w = DemandWindows(86_400.0)
    c = ChargerState(charger_id="ac-1", ocpp_id="AC1", is_dc=False, min_value=6.0, max_value=32.0)
    c.transaction_id, c.session_energy_wh, c.measured_at = "t1", 0.0, 0.0
    w.sample(t0, {"ac-1": c})
    c.session_energy_wh, c.measured_at = 5_000.0, 1800.0
    w.sample(t0 + 1800.0, {"ac-1": c})
    assert w.window_kwh() == pytest.approx(5.0)
    assert math.isclose(w.window_kw(), 5.0 * 3600.0 / 86_400.0)
