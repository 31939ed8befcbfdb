"""The HTML report names the scenario's own demand window, not a fixed 15 minutes."""

from __future__ import annotations

import tomllib

import pytest
from evcore.sim import report
from evcore.sim.controllers import make_controller
from evcore.sim.scenario import parse_scenario
from evcore.sim.twin import compare
from sim_testkit import one_charger_site

SCENARIO = (
    """
[scenario]
name = "window"
start = "2026-01-05T12:00:00Z"
duration_h = 0.5
seed = 1
policies = ["uncontrolled"]

"""
    + one_charger_site("window")
    + """
[arrivals]
arrival_mean_h = 0.0
arrival_sd_h = 0.0
stay_min_h = 0.4

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
max_a = 32.0
phases = 3

[tariff]
default_price_per_kwh = 0.2
"""
)


@pytest.mark.parametrize("window_min", [30, 15, 60])
def test_report_header_names_the_scenarios_demand_window(window_min: int) -> None:
    doc = tomllib.loads(
        SCENARIO + f"\n[demand_charge]\nprice_per_kw = 1.0\nwindow_min = {window_min}\n"
    )
    sc = parse_scenario(doc)
    html = report.html_report(compare(sc, make_controller))
    assert f"<th>peak kW ({window_min} min)</th>" in html
    others = {15, 30, 60} - {window_min}
    assert not any(f"peak kW ({m} min)" in html for m in others)
