"""A CSV session file whose numeric column holds no usable number is refused with a ScenarioError
naming the file, the row and the column (it ended in a ValueError traceback for soc_arrival)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from evcore.sim.arrivals import Arrivals, generate
from evcore.sim.scenario import ScenarioError, parse_scenario
from sim_testkit import one_charger_site

SCENARIO = (
    """
[scenario]
name = "csv"
start = "2026-01-05T00:00:00Z"
duration_h = 6
seed = 3

"""
    + one_charger_site("csv")
    + """
[arrivals]
model = "csv"
file = "sessions.csv"
soc_arrival_mean = 0.45

[[arrivals.vehicles]]
name = "car"
battery_kwh = 60.0
max_a = 32.0
phases = 3
"""
)

HEADER = "id,charger,arrival_h,departure_h,energy_kwh,soc_arrival\n"
GOOD = "a,cp-1,0.5,3.0,8.0,0.3\n"


def _generate(tmp_path: Path, rows: str) -> Arrivals:
    (tmp_path / "sessions.csv").write_text(HEADER + GOOD + rows)
    sc = parse_scenario(tomllib.loads(SCENARIO), path=tmp_path / "scenario.toml")
    return generate(sc)


@pytest.mark.parametrize(
    ("row", "column", "said"),
    [
        ("b,cp-1,3.5,5.0,8.0,lots", "soc_arrival", "not a number, got 'lots'"),
        ("b,cp-1,3.5,5.0,8.0,nan", "soc_arrival", "must be a finite number, got 'nan'"),
        ("b,cp-1,3.5,5.0,8.0,1.5", "soc_arrival", "must be within [0, 1], got '1.5'"),
        ("b,cp-1,3.5,5.0,8.0,-0.1", "soc_arrival", "must be within [0, 1], got '-0.1'"),
        ("b,cp-1,3.5,5.0,inf,0.3", "energy_kwh", "must be a finite number, got 'inf'"),
        ("b,cp-1,3.5,5.0,-2,0.3", "energy_kwh", "must be >= 0, got '-2'"),
        ("b,cp-1,3.5,5.0,lots,0.3", "energy_kwh", "not a number, got 'lots'"),
        ("b,cp-1,3.5,5.0,,0.3", "energy_kwh", "missing"),
        ("b,cp-1,soon,5.0,8.0,0.3", "arrival_h", "not a number, got 'soon'"),
        ("b,cp-1,3.5,nan,8.0,0.3", "departure_h", "must be a finite number, got 'nan'"),
        ("b,cp-1,-inf,5.0,8.0,0.3", "arrival_h", "must be a finite number, got '-inf'"),
    ],
)
def test_csv_numeric_column_errors_name_file_row_and_column(
    tmp_path: Path, row: str, column: str, said: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        _generate(tmp_path, row + "\n")
    assert str(err.value) == f"sessions.csv row 3.{column}: {said}"


def test_csv_soc_arrival_is_read_and_an_empty_one_takes_the_mean(tmp_path: Path) -> None:
    arr = _generate(tmp_path, "b,cp-1,3.5,5.0,8.0,\n")
    socs = {s.id: s.soc_arrival for s in arr.sessions}
    assert socs["a"] == pytest.approx(0.3)
    assert socs["b"] == pytest.approx(0.45)  # [arrivals].soc_arrival_mean


def test_csv_session_id_listed_twice_is_an_error_naming_both_rows(tmp_path: Path) -> None:
    """The twin keys each session's delivered energy by its id: two sessions with one id shared
    one figure (the later one's), so both were met or both missed, and the delivered total
    counted it twice."""
    with pytest.raises(ScenarioError) as err:
        _generate(tmp_path, "a,cp-1,3.5,5.0,8.0,0.3\n")
    assert str(err.value) == "sessions.csv row 3.id: 'a' is listed twice (row 2)"
