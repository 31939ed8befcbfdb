"""The edge's local planner puts energy first, as the twin's does: a car that must charge within a
few hours is planned its energy and charged, however high the demand charge it raises (through
real sockets: the rig's OCPP chargers), and the demand windows the plan starts from are the ones
the chargers' energy registers show."""

from __future__ import annotations

import pytest
from edge_testkit import planner_cfg
from evcore.edge.config import EdgeConfig
from evcore.edge.planning import DemandWindows
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.edge.state import ChargerState
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(150)


def _cfg(policy: str) -> EdgeConfig:
    return planner_cfg(policy)


@pytest.mark.parametrize(
    ("policy", "demand_charge_per_kw"), [("planner_peak", 0.0), ("planner_cost", 40.0)]
)
async def test_a_car_leaving_in_two_hours_is_planned_its_energy_and_charged(
    policy: str, demand_charge_per_kw: float
) -> None:
    table = depot_table(2, per_feeder=2)
    table["planner"] = {"demand_charge_per_kw": demand_charge_per_kw}
    rig = EdgeRig(table, cfg=_cfg(policy), apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        now = rig.clock.now()
        cid = rig.fleet.charger_ids[0]
        rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id, 15, "a session")
        ctrl.set_session(cid, energy_requested_kwh=10.0, departure=now + 2 * 3600.0)
        await rig.wait_for(lambda: planner.plans >= 1, 30, "a local plan")
        plan = ctrl.local_plan
        assert plan is not None and planner.last_status == "optimal"
        # Before: 0 kWh planned (non-delivery at 10 per kWh against 50 per kW of peak), 0 A held.
        kwh = sum(t * 3 * 230.0 * d / 3.6e6 for rows in plan.rows.values() for _, d, t in rows)
        assert kwh >= 10.0 - 1e-6
        await rig.wait_for(lambda: rig.limit_at(cid) >= 6.0, 15, "the car charging")
        assert rig.core is not None and rig.core.last_codes.get(cid) in ("plan", "node_phase")


def _charging(tx: str, wh: float) -> ChargerState:
    c = ChargerState("cp-1", "cp-1", False, 6.0, 32.0)
    c.transaction_id = tx
    c.session_energy_wh = wh
    return c


def test_demand_windows_count_the_energy_registers_per_window_and_keep_the_months_peak() -> None:
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 900.0
    w = DemandWindows(900.0)
    w.sample(t0 + 10.0, {"cp-1": _charging("1", 5000.0)})  # energy before the first read: not ours
    assert w.window_kwh() == 0.0
    w.sample(t0 + 300.0, {"cp-1": _charging("1", 7000.0)})
    assert w.window_kwh() == pytest.approx(2.0)
    w.sample(t0 + 900.0 + 30.0, {"cp-1": _charging("1", 7500.0)})  # the next window
    assert w.peak_kw == pytest.approx(8.0)  # 2 kWh in 15 min
    assert w.window_kwh() == pytest.approx(0.5)
    # A new session on the charger counts from its start, not from the old register.
    w.sample(t0 + 960.0, {"cp-1": _charging("2", 300.0)})
    assert w.window_kwh() == pytest.approx(0.8)
