"""The in-process twin's chargers offer what the simulated OCPP stations offer under a limit: an
AC charger the highest of its allowed current steps at or below it (none below the 6 A pilot), a
DC charger nothing between 0 and its ``min_w`` (``evcore.sim.chargepoint.offer``).

The in-process plant handed the limit to the car as it was: a 14 A setpoint on a charger with
steps 13 A / 16 A was drawn at 14 A, a 3 kW setpoint on a DC charger with a 5 kW minimum at 3 kW,
where the stack's stations (and real chargers) draw 13 A and nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edge_testkit import held_profile
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.ev import EV
from evcore.sim.fleet import connector_for
from evcore.sim.twin import F64, SiteView, run_policy
from evcore.sim.vclock import VirtualClock
from sim_testkit import one_car_scenario
from test_sim_dc_energy import dc_scenario

STEPS = "steps_a = [6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 25.0, 32.0]\n"


class Setpoint:
    """A controller that asks every charger for one fixed setpoint (A per phase, or DC W), as a
    planner's row or an operator's limit may: between the charger's steps, under its minimum."""

    in_loop: tuple[str, ...] = ()

    def __init__(self, value: float) -> None:
        self.name = f"setpoint {value:g}"
        self.value = value

    def decide(self, view: SiteView) -> F64:
        return np.full(len(view.connected), self.value)


@pytest.mark.parametrize(("setpoint_a", "drawn_a"), [(14.0, 13.0), (7.9, 6.0), (32.0, 32.0)])
def test_an_ac_setpoint_between_steps_is_drawn_at_the_step_below(
    tmp_path: Path, setpoint_a: float, drawn_a: float
) -> None:
    sc = one_car_scenario(
        tmp_path, "steps", duration_h=0.25, policy="fair_share", charger_extra=STEPS
    )
    r = run_policy(sc, "fair_share", Setpoint(setpoint_a))
    # What the car drew once the setpoint was in force (the start holds 0 until it applies).
    assert max(r.series.chosen_measured) == drawn_a  # was 14.0 and 7.9: the setpoint itself
    # The same as a simulated OCPP station with this charger offers under that limit.
    conn = connector_for(sc.site.charger("cp-1"))
    assert _station_draw(conn, setpoint_a, "A") == drawn_a


@pytest.mark.parametrize(("setpoint_w", "drawn_w"), [(3_000.0, 0.0), (6_000.0, 6_000.0)])
def test_a_dc_setpoint_under_the_minimum_is_not_drawn(
    tmp_path: Path, setpoint_w: float, drawn_w: float
) -> None:
    sc = dc_scenario(tmp_path, hours=0.25)  # 50 kW, min_w 5 kW, 90 %, 1 kW auxiliary
    r = run_policy(sc, "fair_share", Setpoint(setpoint_w))
    assert max(r.series.chosen_measured) == drawn_w  # was 3,000 W under the 5 kW minimum
    if drawn_w == 0.0:
        assert r.energy_delivered_kwh == 0.0  # was 0.75 kWh
    conn = connector_for(sc.site.charger("dc1"))
    assert _station_draw(conn, setpoint_w, "W") == drawn_w


def _station_draw(conn: SimConnector, limit: float, unit: str) -> float:
    """What a simulated OCPP station with ``conn`` offers a car under a TxDefault of ``limit``
    (A per phase for AC, DC W)."""
    start = 1_767_614_400.0
    clock = VirtualClock(start)
    cp = SimChargePoint("cp", [conn], url="ws://127.0.0.1:9/ocpp/cp", clock=clock, tick_s=1.0)
    cp.plug_in(1, EV(capacity_kwh=300.0, soc=0.2, max_dc_power_w=50_000.0))
    cp.hold_profile(held_profile(start, 1, "default", limit, unit=unit))
    clock.set_time(start + 1.0)
    cp.step()
    return conn.offered
