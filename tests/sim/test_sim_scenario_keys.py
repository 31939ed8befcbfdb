"""Scenario files: a misspelt key or a bad ``[edge]`` override is an error at load that names
the section and the key (review 67: ``stay_sdd_h``, ``durration_h``, ``meter_intervall_s`` and
``peak_flor_kw`` were accepted with the defaults in force; ``ignore_threshold_a = -6`` and
``bogus_key`` in ``[edge]`` loaded and then killed ``evcore sim`` with a traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.sim.scenario import ScenarioError, load_scenario
from sim_testkit import one_charger_site

BASE = (
    """
[scenario]
name = "keys"
start = "2026-01-05T00:00:00Z"
duration_h = 6
seed = 3
meter_interval_s = 60

"""
    + one_charger_site("keys", power_limit_kw=40.0)
    + """
[arrivals]
model = "statistical"
stay_mean_h = 4.0
stay_sd_h = 1.0

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
phases = 3

[tariff]
currency = "EUR"

[[tariff.periods]]
start_h = 16.0
end_h = 21.0
price_per_kwh = 0.3

[demand_charge]
price_per_kw = 10.0
peak_floor_kw = 0.0

[[grid_signals]]
start_h = 1
end_h = 2
limit_kw = 10

[[faults]]
kind = "edge_restart"
at_h = 1
"""
)


def _load(tmp_path: Path, text: str) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    load_scenario(path)


def test_sim_the_base_scenario_with_every_section_loads(tmp_path: Path) -> None:
    _load(tmp_path, BASE + "\n[edge]\nignore_threshold_a = 6.0\n[ocpp]\nwhole_amperes = true\n")


@pytest.mark.parametrize(
    ("after", "typo", "named"),
    [
        ("duration_h = 6", "durration_h = 8", "[scenario].durration_h: unknown key"),
        ("meter_interval_s = 60", "meter_intervall_s = 10", "[scenario].meter_intervall_s"),
        ("stay_sd_h = 1.0", "stay_sdd_h = 3", "[arrivals].stay_sdd_h: unknown key"),
        ("phases = 3", "max_dc_k = 50", "[[arrivals.vehicles]][0].max_dc_k: unknown key"),
        ('currency = "EUR"', "default_price = 0.2", "[tariff].default_price: unknown key"),
        ("price_per_kwh = 0.3", "end = 3", "[[tariff.periods]][0].end: unknown key"),
        ("peak_floor_kw = 0.0", "peak_flor_kw = 90", "[demand_charge].peak_flor_kw: unknown key"),
        ("limit_kw = 10", "limit_kva = 8", "[[grid_signals]][0].limit_kva: unknown key"),
        ("at_h = 1", "duration_m = 5", "[[faults]][0].duration_m: unknown key"),
    ],
)
def test_sim_an_unknown_key_is_an_error_naming_section_and_key(
    tmp_path: Path, after: str, typo: str, named: str
) -> None:
    assert after in BASE
    with pytest.raises(ScenarioError) as ei:
        _load(tmp_path, BASE.replace(after, f"{after}\n{typo}", 1))
    assert named in str(ei.value)
    assert "known keys:" in str(ei.value)


def test_sim_an_unknown_section_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"^tarrif: unknown key.*docs/twin.md"):
        _load(tmp_path, BASE + "\n[tarrif]\ncurrency = 'EUR'\n")


@pytest.mark.parametrize(
    ("edge", "named"),
    [
        ("ignore_threshold_a = -6", "[edge].ignore_threshold_a must be a number >= 0, got -6"),
        ("bogus_key = 1", "[edge].bogus_key: unknown key"),
        ('tick_s = "fast"', "[edge].tick_s must be a number >= 0.05"),
        # Checked with the twin's own defaults (failsafe_after_s = 600 s).
        ("refresh_lead_s = 700", "[edge].refresh_lead_s: must be below failsafe_after_s (600.0)"),
    ],
)
def test_sim_edge_overrides_are_checked_at_load(tmp_path: Path, edge: str, named: str) -> None:
    with pytest.raises(ScenarioError) as ei:
        _load(tmp_path, f"{BASE}\n[edge]\n{edge}\n")
    assert named in str(ei.value)


def test_sim_an_unknown_report_charger_names_the_field(tmp_path: Path) -> None:
    text = BASE.replace("seed = 3", 'seed = 3\nreport_charger = "nope"', 1)
    with pytest.raises(
        ScenarioError, match=r"^\[scenario\]\.report_charger: unknown charger 'nope'"
    ):
        _load(tmp_path, text)
