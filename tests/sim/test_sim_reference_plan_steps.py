"""The in-process reference planner (``evcore.sim.controllers``, the numpy stand-in for builds
without the stack) prices and caps each plan step over its whole span.

It took the price and the curtailments at each step's midpoint (a price change or a short
curtailment away from it was missed), and of two curtailments on one node in force there the
one listed last, not the lower."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.sim.controllers import step_inputs
from sim_testkit import TARIFF_UP_AT_200_S, one_car_scenario


def test_each_step_is_priced_and_capped_over_its_whole_span(tmp_path: Path) -> None:
    sc = one_car_scenario(
        tmp_path, "reference-steps", duration_h=1.0, policy="planner_cost", extra=TARIFF_UP_AT_200_S
    )
    t0 = sc.start
    curtailments = [
        (t0 + 10.0, t0 + 60.0, "grid", 1.0),  # inside the first step, away from its midpoint
        (t0 + 400.0, t0 + 500.0, "grid", 3.0),  # the lower one in the second step
        (t0, t0 + 600.0, "grid", 5.0),
    ]
    prices, caps = step_inputs(sc, curtailments, t0, 300.0, 3)
    # The first step: 0.10 for 200 s, 0.50 for 100 s (was 0.10, the price at 150 s).
    assert list(prices) == pytest.approx([(200.0 * 0.10 + 100.0 * 0.50) / 300.0, 0.50, 0.50])
    # Was [{"grid": 5.0}, {"grid": 5.0}, {}]: at 150 s only the 5 kW one was in force, and at
    # 450 s the one listed last won.
    assert caps == [{"grid": 1.0}, {"grid": 3.0}, {}]
