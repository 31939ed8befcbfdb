"""The simulated car's DC taper ends: it falls to ``dc_taper_floor`` of the car's power (10 %, as
the in-process twin's), not towards zero, so a DC car reaches its target. Before, the accepted
power fell in proportion to the energy still missing and the car never got there (the depot's
DC buses ended 0.06-0.35 kWh short of their request, counted as missed)."""

from __future__ import annotations

import pytest
from evcore.sim.ev import EV


def _charge(ev: EV, offered_w: float, dt_s: float, limit_s: float) -> float:
    """Seconds until the battery is at its target (as the simulated charger feeds it: at most
    what fills it in the last step), or ``limit_s`` if it is not by then."""
    t = 0.0
    while not ev.full and t < limit_s:
        wh = min(ev.dc_draw_w(offered_w) * dt_s / 3600.0, ev.room_wh)
        ev.add_energy(wh)
        t += dt_s
    return t


def test_a_dc_car_reaches_its_target_through_the_taper() -> None:
    ev = EV(capacity_kwh=300.0, soc=0.8, target_soc=0.95, max_dc_power_w=150_000.0)
    # 45 kWh from 80 %: the taper's floor is 15 kW, so at most 3 h; it finishes well before.
    took = _charge(ev, 150_000.0, 5.0, 4 * 3600.0)
    assert ev.full and ev.soc == pytest.approx(0.95, abs=1e-9)
    assert took < 3 * 3600.0
    # At the floor just before the target, the car takes 10 % of its power, not ~0.
    near = EV(capacity_kwh=300.0, soc=0.9499, target_soc=0.95, max_dc_power_w=150_000.0)
    assert near.dc_draw_w(150_000.0) == pytest.approx(15_000.0)
    # The floor never takes more than is offered, and a full car takes nothing.
    assert near.dc_draw_w(5_000.0) == 5_000.0
    assert ev.dc_draw_w(150_000.0) == 0.0
