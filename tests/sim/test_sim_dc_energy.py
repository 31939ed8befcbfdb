"""DC chargers in the twin: what the grid sees is the AC input (the DC output over the efficiency,
plus the auxiliary load while charging), and what the battery gets is the DC output.

Both backends price the AC input; the stack's simulated charger credits the battery with the input
less the auxiliary load, times the efficiency, and meters both: the energy into the car on its
outlet register (what the central system takes for the session's energy), the AC input on its
inlet register; the session ends on the battery's target; the in-process reference controllers
count the auxiliary load against kW caps too, and plan DC energy as the battery takes it."""

from __future__ import annotations

import asyncio
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from evcore.sim import stack
from evcore.sim.arrivals import generate
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.controllers import ReferenceController, make_controller
from evcore.sim.ev import EV
from evcore.sim.scenario import Scenario, parse_scenario
from evcore.sim.twin import SiteView, run_policy

EFF = 0.9
AUX_W = 1000.0

# One 50 kW DC charger at 90 % with 1 kW of auxiliary load; price 1 per kWh, no building load.
DC_SITE = """
[scenario]
name = "dc"
start = "2026-01-05T12:00:00Z"
duration_h = {hours}
seed = 1
meter_interval_s = 60
control_interval_s = 30
policies = ["{policy}"]

[site]
id = "dc"
phase_names = ["L1", "L2", "L3"]
voltage_ln_v = 230.0

[[nodes]]
id = "grid"
kind = "transformer"
phase_limit_a = 1000.0
{node_extra}

[[chargers]]
id = "dc1"
parent = "grid"
kind = "dc"
wiring = "three_phase"
phases = ["L1", "L2", "L3"]
voltage_v = 230.0
max_w = 50000.0
min_w = 5000.0
efficiency = 0.90
aux_w = 1000.0

[arrivals]
model = "csv"
file = "dc.csv"

[[arrivals.vehicles]]
name = "car"
battery_kwh = 200.0
max_a = 32.0
phases = 3
max_dc_kw = {max_dc_kw}

[tariff]
currency = "EUR"
default_price_per_kwh = 1.0
"""


def dc_scenario(
    tmp_path: Path,
    *,
    hours: float = 0.5,
    policy: str = "uncontrolled",
    energy_kwh: float = 100.0,
    max_dc_kw: float = 50.0,
    node_extra: str = "",
) -> Scenario:
    (tmp_path / "dc.csv").write_text(
        "id,charger,arrival_h,departure_h,energy_kwh,vehicle,soc_arrival\n"
        f"a,dc1,0,{hours},{energy_kwh},car,0.2\n"
    )
    text = (
        DC_SITE.replace("{hours}", str(hours))
        .replace("{policy}", policy)
        .replace("{max_dc_kw}", str(max_dc_kw))
        .replace("{node_extra}", node_extra)
    )
    return parse_scenario(tomllib.loads(text), path=tmp_path / "dc.toml")


# ---------------------------------------------------------------------------------------------
# In-process: the energy cost is the grid's
# ---------------------------------------------------------------------------------------------
def test_in_process_dc_energy_cost_is_the_ac_input_with_the_auxiliary_load(
    tmp_path: Path,
) -> None:
    sc = dc_scenario(tmp_path)
    r = run_policy(sc, "uncontrolled", make_controller("uncontrolled", sc))
    battery_kwh = r.energy_delivered_kwh
    hours_charging = battery_kwh / 50.0  # the car takes 50 kW, no taper below 80 %
    grid_kwh = battery_kwh / EFF + AUX_W / 1000.0 * hours_charging
    assert battery_kwh == pytest.approx(21.25, abs=0.01)
    # The energy cost counts what the grid delivered: output / efficiency + auxiliary load.
    assert r.energy_cost == pytest.approx(grid_kwh, rel=1e-6)  # was 21.25: the DC output
    # Peak and instant load were the grid's already (LineModel): the first 15-min window is full.
    assert r.peak_instant_kw == pytest.approx(50.0 / EFF + AUX_W / 1000.0, rel=1e-6)
    assert r.peak_kw == pytest.approx(50.0 / EFF + AUX_W / 1000.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# In-process reference controllers: the kW cap counts the auxiliary load; DC plans in battery kWh
# ---------------------------------------------------------------------------------------------
def test_in_process_fair_share_keeps_a_dc_site_under_its_kw_cap_with_the_auxiliary_load(
    tmp_path: Path,
) -> None:
    # 20 kW cap: the allocator may give the charger 19 kW of AC input, 17.1 kW of DC output.
    sc = dc_scenario(tmp_path, policy="fair_share", node_extra="power_limit_kw = 20.0")
    r = run_policy(sc, "fair_share", make_controller("fair_share", sc))
    assert r.violations_kw == 0  # was 17,980 samples at 21 kW: the kW row left out aux_w
    assert r.peak_instant_kw <= 20.0 + 1e-6
    assert r.peak_instant_kw == pytest.approx(20.0, abs=0.01)  # and it uses the room it has


def test_reference_plan_delivers_a_dc_sessions_energy_into_the_battery(tmp_path: Path) -> None:
    pytest.importorskip("cvxpy")
    sc = dc_scenario(tmp_path, hours=4.0, policy="planner_cost", energy_kwh=40.0)
    ctl = ReferenceController("planner_cost", sc)
    now = sc.start
    view = SiteView(
        now=now,
        connected=np.array([True]),
        session_ids=["a"],
        energy_requested_kwh=np.array([40.0]),
        energy_delivered_kwh=np.array([0.0]),
        departure=np.array([now + 4 * 3600.0]),
        arrival=np.array([now]),
        measured=np.array([0.0]),
        measured_age_s=np.array([math.inf]),
        last_setpoint=np.array([-1.0]),
        node_power_limit_kw={},
        curtailments=[],
    )
    active, remaining, _ = ctl._demand(view)
    plan = ctl._solve(view, active, remaining)
    # A DC setpoint is the DC output (W): the battery gets its kW, not kW / efficiency.
    planned_battery_kwh = float(plan["rates"][0].sum()) * plan["step_s"] / 3600.0 / 1000.0
    assert planned_battery_kwh == pytest.approx(40.0, rel=1e-3)  # was 36.0 (40 × 0.9)


# ---------------------------------------------------------------------------------------------
# The stack's simulated charger and the edge's session
# ---------------------------------------------------------------------------------------------
def test_sim_dc_charger_credits_the_battery_without_the_auxiliary_load() -> None:
    c = SimConnector(kind="dc", max_w=50_000.0, efficiency=EFF, aux_w=AUX_W)
    c.ev = EV(capacity_kwh=200.0, soc=0.2, max_dc_power_w=10_000.0)
    c.tx_active = True
    cp = SimChargePoint.__new__(SimChargePoint)
    cp.limit_at = lambda evse, now: 50_000.0  # type: ignore[method-assign]
    cp.tick_s = 1.0  # the step _advance is called at
    reg0, inlet0, soc0 = c.register_wh, c.inlet_register_wh, c.ev.soc
    SimChargePoint._advance(cp, c, 0.0, 0.0)
    for i in range(1, 3601):
        SimChargePoint._advance(cp, c, float(i), 1.0)
    assert c.power_w == pytest.approx(10_000.0 / EFF + AUX_W)
    # The AC input meter (the inlet register).
    metered_kwh = (c.inlet_register_wh - inlet0) / 1000.0
    battery_kwh = (c.ev.soc - soc0) * 200.0
    assert metered_kwh == pytest.approx(10.0 / EFF + 1.0, rel=1e-9)
    assert battery_kwh == pytest.approx(10.0, rel=1e-9)  # was 10.9: aux_w × efficiency credited
    assert battery_kwh == pytest.approx((metered_kwh - AUX_W / 1000.0) * EFF, rel=1e-9)
    # The outlet register counts what the battery took (it counted the AC input, 12.1 kWh,
    # reported as the outlet's: the central system took it for the car's).
    assert (c.register_wh - reg0) / 1000.0 == pytest.approx(battery_kwh, rel=1e-9)


ok, why = stack.available()


@pytest.mark.skipif(not ok, reason=f"stack backend unavailable: {why}")
def test_stack_dc_session_ends_on_the_batterys_target(tmp_path: Path) -> None:
    """A 10 kW car wants 20 kWh in 3 h: 2 h of charging, 2 kWh of auxiliary load on the AC
    input meter. The edge counts the session on the outlet register, the energy into the car, and
    does not pause the car before its battery has its 20 kWh; once it has them, the edge is told
    the session's energy so far. The twin asks for the battery's energy (sim/stack.py
    ``_metered_request_kwh``), as a driver's app would."""
    sc = dc_scenario(tmp_path, hours=3.0, policy="fair_share", energy_kwh=20.0, max_dc_kw=10.0)
    seen: dict[str, float] = {}

    def probe(run: stack.StackRun) -> None:
        c = run._fleet.connector("dc1")
        seen["requested_kwh"] = float(
            run._app.controller.state.chargers["dc1"].energy_requested_kwh
        )
        seen["metered_kwh"] = (c.register_wh - c.tx_start_register_wh) / 1000.0
        seen["inlet_kwh"] = (c.inlet_register_wh - 1_000_000.0) / 1000.0
        seen["soc"] = float(c.ev.soc)

    run = stack.StackRun(sc, "fair_share", generate(sc), probes=[(2.75 * 3600.0, probe)])
    # Asked for the battery's 20 kWh (it was 20 / 0.9 + 3 h of auxiliary load: 25.2 kWh).
    assert run._metered_request_kwh(run.arr.sessions[0]) == pytest.approx(20.0)
    asyncio.run(run.run())
    res = run.result(0.0)
    assert res.violations == 0 and res.violations_kw == 0
    assert res.energy_delivered_kwh == pytest.approx(20.0, abs=0.05)  # met
    assert res.sessions_met == 1
    # The battery's target was reached and the car stopped: the edge was told the session energy.
    assert seen["soc"] == pytest.approx(0.3, abs=1e-3)
    assert seen["requested_kwh"] == pytest.approx(seen["metered_kwh"], abs=1e-6)
    # The outlet register: the energy into the car (it counted the AC input, 22.2 kWh and more).
    assert seen["metered_kwh"] == pytest.approx(20.0, abs=0.05)
    # The AC input meter: 20 kWh / 0.9 plus at least 2 h × 1 kW of auxiliary load.
    assert seen["inlet_kwh"] >= 20.0 / EFF + 2.0 - 0.05  # was 22.2: no auxiliary energy
    # The site meter priced all of it.
    assert res.energy_cost == pytest.approx(seen["inlet_kwh"], abs=0.05)
