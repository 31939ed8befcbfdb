"""``least_laxity`` judges a session's laxity by the rate its charger can really give it.

The time a session needs at full rate was computed as if every AC charger drew its maximum at
230 V on three phases: a single-phase charger (or a 208 V site's) was taken to charge three times
faster than it can, so its car looked far more lax than it was, and a car that needed every
minute to its departure got the lowest weight beside three-phase ones.
"""

from __future__ import annotations

import pytest
from evcore.edge.coreio import LAXITY_DOUBLING_S, _priority_from_laxity
from evcore.edge.state import ChargerState


def test_a_single_phase_charger_needs_three_times_as_long() -> None:
    now = 1_000_000.0
    three = ChargerState("three", "three", False, 6.0, 32.0)  # 3 x 230 V x 32 A = 22.08 kW
    single = ChargerState("single", "single", False, 6.0, 32.0)
    single.ac_w_per_a, single.ac_phases = 230.0, 1  # 7.36 kW
    for c in (three, single):
        # 7.36 kWh wanted, leaving in 2 h: 20 min at 22.08 kW, 60 min at 7.36 kW.
        c.energy_requested_kwh, c.departure = 7.36, now + 7200.0
    w = _priority_from_laxity([three, single], now)
    assert w["three"] == 1.0
    # The single-phase session has 40 min less laxity: 2 ** (2400 / 1800) its weight.
    assert w["single"] == pytest.approx(2.0 ** (2400.0 / LAXITY_DOUBLING_S))  # before: 1.0
