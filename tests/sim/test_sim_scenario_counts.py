"""Counts in a scenario file are whole numbers: a fraction is an error at load that names the
section and the field. ``[demand_charge].window_min = 0.5`` loaded as a 0-minute window and
the run died in the meter with ZeroDivisionError; ``window_min = 7.5`` billed 7-minute windows;
``[arrivals].sessions_per_charger = 0.5`` generated no session at all; a vehicle's
``phases = 1.5`` became a single-phase car."""

from __future__ import annotations

import tomllib

import pytest
from evcore.sim.scenario import Scenario, ScenarioError, parse_scenario
from sim_testkit import one_charger_site

BASE = (
    """
[scenario]
name = "counts"
start = "2026-01-05T00:00:00Z"
duration_h = 1
policies = ["fair_share"]

"""
    + one_charger_site("counts")
    + """
[arrivals]
sessions_per_charger = {sessions}

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
phases = {phases}

[demand_charge]
window_min = {window}
"""
)


def _load(*, sessions: str = "1", phases: str = "3", window: str = "15") -> Scenario:
    text = BASE.format(sessions=sessions, phases=phases, window=window)
    return parse_scenario(tomllib.loads(text))


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"window": "0.5"}, "[demand_charge].window_min: must be a whole number >= 1, got 0.5"),
        ({"window": "7.5"}, "[demand_charge].window_min: must be a whole number >= 1, got 7.5"),
        (
            {"sessions": "0.5"},
            "[arrivals].sessions_per_charger: must be a whole number >= 1, got 0.5",
        ),
        ({"phases": "1.5"}, "[[arrivals.vehicles]][0].phases: must be 1 or 3, got 1.5"),
    ],
)
def test_a_fractional_count_is_an_error_naming_the_field(kwargs: dict[str, str], said: str) -> None:
    with pytest.raises(ScenarioError) as e:
        _load(**kwargs)
    assert str(e.value) == said


def test_whole_counts_load_as_given() -> None:
    sc = _load(sessions="2", phases="1", window="30.0")
    assert sc.demand_charge.window_min == 30
    assert sc.arrivals.sessions_per_charger == 2
    assert sc.arrivals.vehicles[0].phases == 1
