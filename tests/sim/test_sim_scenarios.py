"""Scenario files and session imports: every shipped scenario loads, bad input names its field,
ACN-Data JSON and CSV sessions come in with the right times and energies, arrivals are seeded."""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from evcore.sim.arrivals import generate
from evcore.sim.scenario import ScenarioError, load_scenario, parse_scenario

SHIPPED = sorted(
    p.name.removesuffix(".toml")
    for p in (resources.files("evcore.sim") / "scenarios").iterdir()
    if p.name.endswith(".toml")
)

SMALL_SITE = """
[scenario]
name = "small"
start = "2026-01-05T00:00:00Z"
duration_h = 6
seed = 3

[site]
id = "small"
phase_names = ["L1", "L2", "L3"]
voltage_ln_v = 230.0

[[nodes]]
id = "grid"
kind = "grid"
phase_limit_a = 63.0
power_limit_kw = 40.0

[[chargers]]
id = "cp-1"
parent = "grid"
wiring = "three_phase"
phases = ["L1", "L2", "L3"]
voltage_v = 230.0
min_a = 6.0
max_a = 32.0

[[chargers]]
id = "cp-2"
parent = "grid"
wiring = "line_to_neutral"
phases = ["L2"]
voltage_v = 230.0
min_a = 6.0
max_a = 32.0

[arrivals]
model = "statistical"
arrival_mean_h = 1.0
stay_mean_h = 4.0
energy_mean_kwh = 20.0

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
max_a = 32.0
phases = 3
"""


def _doc(extra: str = "") -> dict[str, Any]:
    return tomllib.loads(SMALL_SITE + extra)


def test_sim_shipped_scenarios_are_the_three_of_the_issue() -> None:
    assert {"depot", "eu-three-phase", "workplace-208v"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_sim_each_shipped_scenario_loads_and_has_sessions(name: str) -> None:
    sc = load_scenario(name)
    assert sc.name == name
    assert sc.site.chargers and sc.duration_s > 0
    arr = generate(sc)
    assert len(arr.sessions) >= 5
    for s in arr.sessions:
        assert 0.0 <= s.arrival_s < s.departure_s <= sc.duration_s
        assert s.energy_kwh > 0
        sc.site.charger(s.charger_id)  # every session sits on a charger of the site


def test_sim_shipped_scenarios_cover_the_issue_cases() -> None:
    depot = load_scenario("depot")
    assert all(c.kind == "dc" for c in depot.site.chargers)
    assert depot.demand_charge.price_per_kw > 0
    wp = load_scenario("workplace-208v")
    assert all(c.wiring == "line_to_line" for c in wp.site.chargers)
    assert {tuple(c.phases) for c in wp.site.chargers} == {(0, 1), (1, 2), (2, 0)}
    eu = load_scenario("eu-three-phase")
    assert eu.grid_signals, "the EU scenario carries a curtailment event"
    assert {c.wiring for c in eu.site.chargers} == {"three_phase", "line_to_neutral"}
    assert {tuple(c.phases) for c in eu.site.chargers if c.wiring == "three_phase"} == {
        (0, 1, 2),
        (1, 2, 0),
        (2, 0, 1),
    }
    assert any(v.phases == 1 for v in eu.arrivals.vehicles)


def test_sim_arrivals_are_determined_by_the_seed() -> None:
    sc = load_scenario("depot")
    a, b = generate(sc, 5), generate(sc, 5)
    assert a == b
    assert generate(sc, 6) != a


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (
            '\n[[grid_signals]]\nnode = "nowhere"\nstart_h = 1\nend_h = 2\nlimit_kw = 5\n',
            "[[grid_signals]][0].node",
        ),
        ("\n[[grid_signals]]\nstart_h = 2\nend_h = 1\nlimit_kw = 5\n", "[[grid_signals]][0]"),
        (
            '\n[[faults]]\nkind = "charger_offline"\ncharger = "cp-9"\nat_h = 1\n',
            "[[faults]][0].charger",
        ),
        ('\n[[faults]]\nkind = "gremlins"\nat_h = 1\n', "[[faults]][0].kind"),
        (
            '\n[[faults]]\nkind = "edge_restart"\nat_h = 1\nduration_min = -5\n',
            "[[faults]][0].duration_min",
        ),
        (
            "\n[tariff]\n[[tariff.periods]]\nstart_h = 25\nend_h = 3\nprice_per_kwh = 0.1\n",
            "[[tariff.periods]][0]",
        ),
        ("\n[demand_charge]\nprice_per_kw = -1\n", "[demand_charge].price_per_kw"),
        ('\n[edge]\npolicy = "fair_share"\n', "[edge].policy"),
    ],
)
def test_sim_scenario_errors_name_the_field(extra: str, field: str) -> None:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(_doc(extra))
    assert field in str(ei.value)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("duration_h = 6", "duration_h = -6", "[scenario].duration_h"),
        ("duration_h = 6", 'duration_h = "six"', "[scenario].duration_h"),
        ("seed = 3", 'seed = 3\npolicies = ["fair_share", "magic"]', "[scenario].policies"),
        ('model = "statistical"', 'model = "oracle"', "[arrivals].model"),
        ('model = "statistical"', 'model = "acn"\nfile = "nope.json"', "[arrivals].file"),
        ('start = "2026-01-05T00:00:00Z"', 'start = "yesterday"', "[scenario].start"),
    ],
)
def test_sim_scenario_errors_in_core_sections_name_the_field(
    old: str, new: str, field: str
) -> None:
    text = SMALL_SITE.replace(old, new, 1)
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(tomllib.loads(text), path=Path("/nonexistent/scenario.toml"))
    assert field in str(ei.value)


def test_sim_missing_scenario_names_it() -> None:
    with pytest.raises(ScenarioError, match="no-such-scenario"):
        load_scenario("no-such-scenario")


def _acn_item(sid: str, station: str, t0: str, t1: str, **kw: Any) -> dict[str, Any]:
    return {
        "sessionID": sid,
        "stationID": station,
        "connectionTime": t0,
        "disconnectTime": t1,
        **kw,
    }


def test_sim_acn_json_sessions_import(tmp_path: Path) -> None:
    # ACN-Data API format: RFC 1123 times in GMT, kWhDelivered, optional userInputs.
    items = [
        _acn_item(
            "a1",
            "CA-303",
            "Wed, 05 Sep 2018 02:00:00 GMT",
            "Wed, 05 Sep 2018 05:30:00 GMT",
            kWhDelivered=11.5,
        ),
        _acn_item(
            "a2",
            "CA-304",
            "Wed, 05 Sep 2018 01:00:00 GMT",
            "Wed, 05 Sep 2018 04:00:00 GMT",
            kWhDelivered=7.0,
            userInputs=[{"kWhRequested": 9.0}],
        ),
    ]
    (tmp_path / "acn.json").write_text(json.dumps({"_items": items}))
    doc = _doc().copy()
    doc["arrivals"] = {
        **doc["arrivals"],
        "model": "acn",
        "file": "acn.json",
        "station_map": {"CA-303": "cp-2", "CA-304": "cp-1"},
    }
    sc = parse_scenario(doc, path=tmp_path / "s.toml")
    arr = generate(sc)
    by = {s.id: s for s in arr.sessions}
    assert set(by) == {"a1", "a2"}
    # The time of day is kept on the scenario's day (start 00:00 UTC).
    assert by["a1"].arrival_s == pytest.approx(2 * 3600.0)
    assert by["a1"].departure_s == pytest.approx(5.5 * 3600.0)
    assert by["a1"].charger_id == "cp-2"  # station_map
    assert by["a1"].energy_kwh == pytest.approx(11.5)
    assert by["a2"].energy_kwh == pytest.approx(9.0)  # the driver's request wins over delivered
    assert by["a2"].charger_id == "cp-1"


def test_sim_acn_json_errors_name_the_item(tmp_path: Path) -> None:
    items = [
        _acn_item(
            "a1",
            "CA-1",
            "Wed, 05 Sep 2018 02:00:00 GMT",
            "Wed, 05 Sep 2018 01:00:00 GMT",
            kWhDelivered=3.0,
        )
    ]
    (tmp_path / "acn.json").write_text(json.dumps({"_items": items}))
    doc = _doc()
    doc["arrivals"] = {**doc["arrivals"], "model": "acn", "file": "acn.json"}
    sc = parse_scenario(doc, path=tmp_path / "s.toml")
    with pytest.raises(ScenarioError, match=r"_items\[0\]"):
        generate(sc)


def test_sim_csv_sessions_import(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text(
        "id,charger,arrival_h,departure_h,energy_kwh\n"
        "x1,cp-2,0.5,3.0,8.0\n"
        "x2,,1.0,4.0,12.0\n"
        "x3,cp-2,1.0,2.0,5.0\n"  # cp-2 is taken and x2 took cp-1: no charger free
    )
    doc = _doc()
    doc["arrivals"] = {**doc["arrivals"], "model": "csv", "file": "s.csv"}
    arr = generate(parse_scenario(doc, path=tmp_path / "s.toml"))
    by = {s.id: s for s in arr.sessions}
    assert by["x1"].charger_id == "cp-2"
    assert by["x1"].arrival_s == pytest.approx(1800.0)
    assert by["x1"].departure_s == pytest.approx(3 * 3600.0)
    assert by["x1"].energy_kwh == pytest.approx(8.0)
    assert by["x2"].charger_id == "cp-1"  # no charger named: the first free one
    assert "x3" not in by and arr.dropped == 1


def test_sim_csv_errors_name_row_and_column(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text("arrival_h,departure_h,energy_kwh\n0.5,3.0,lots\n")
    doc = _doc()
    doc["arrivals"] = {**doc["arrivals"], "model": "csv", "file": "s.csv"}
    sc = parse_scenario(doc, path=tmp_path / "s.toml")
    with pytest.raises(ScenarioError, match=r"row 2\.energy_kwh"):
        generate(sc)
