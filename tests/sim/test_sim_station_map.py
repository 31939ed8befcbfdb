"""``[arrivals].station_map`` maps ACN station ids to this site's chargers: a charger the site
does not have is an error at load naming the entry (it was kept, and every session of that
station quietly went to the first free charger instead)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from evcore.sim.scenario import ScenarioError, parse_scenario
from sim_testkit import one_charger_site


def _text(station_map: str) -> str:
    return (
        """[scenario]
name = "map"
duration_h = 4

"""
        + one_charger_site("map")
        + f"""
[arrivals]
model = "acn"
file = "acn.json"
station_map = {station_map}

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
"""
    )


def test_station_map_to_an_unknown_charger_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "acn.json").write_text('{"_items": []}')
    with pytest.raises(ScenarioError) as e:
        parse_scenario(
            tomllib.loads(_text('{ "CA-303" = "cp-1", "CA-304" = "cp-9" }')),
            path=tmp_path / "s.toml",
        )
    assert str(e.value) == ("[arrivals].station_map.CA-304: unknown charger 'cp-9' (site: cp-1)")


def test_station_map_to_known_chargers_loads(tmp_path: Path) -> None:
    (tmp_path / "acn.json").write_text('{"_items": []}')
    sc = parse_scenario(tomllib.loads(_text('{ "CA-303" = "cp-1" }')), path=tmp_path / "s.toml")
    assert sc.arrivals.station_map == {"CA-303": "cp-1"}
