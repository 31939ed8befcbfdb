"""Energy is priced at the price in force at each instant, also when a time-of-use period or a
price series changes inside an interval the twin's meter records at once.

The meter split an interval only at demand-window edges and priced each piece at the price at
its start: in the in-process loop (intervals up to a meter interval long) a price change 32 s
past a minute was billed from the minute before."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.sim.controllers import make_controller
from evcore.sim.scenario import Scenario
from evcore.sim.twin import run_policy
from sim_testkit import one_car_scenario

KW = 32.0 * 230.0 * 3 / 1000.0  # the car draws 22.08 kW from the start until it has its energy


def _scenario(tmp_path: Path, tariff: str) -> Scenario:
    return one_car_scenario(
        tmp_path,
        "price-edges",
        duration_h=0.25,
        policy="uncontrolled",
        soc_arrival=0.1,
        extra=tariff,
    )


def test_a_time_of_use_change_inside_an_interval_is_priced_from_its_instant(
    tmp_path: Path,
) -> None:
    # Price 1 per kWh from 12:00:32 UTC (free before).
    sc = _scenario(
        tmp_path,
        f"""[tariff]
default_price_per_kwh = 0.0
[[tariff.periods]]
start_h = {12.0 + 32.0 / 3600.0!r}
end_h = 24.0
price_per_kwh = 1.0
""",
    )
    res = run_policy(sc, "uncontrolled", make_controller("uncontrolled", sc))
    energy_kwh = res.energy_delivered_kwh  # 4.692 kWh, in 765 s
    # was 4.324: billed from 12:01:00, the end of the interval the change fell in
    assert res.energy_cost == pytest.approx(energy_kwh - KW * 32.0 / 3600.0, rel=1e-6)


def test_a_price_series_change_inside_an_interval_is_priced_from_its_instant(
    tmp_path: Path,
) -> None:
    (tmp_path / "prices.csv").write_text(
        "time,price_per_kwh\n2026-01-05T11:00:00Z,0.0\n2026-01-05T12:05:17Z,2.0\n"
    )
    sc = _scenario(tmp_path, '[tariff]\nfile = "prices.csv"\n')
    res = run_policy(sc, "uncontrolled", make_controller("uncontrolled", sc))
    energy_kwh = res.energy_delivered_kwh
    # was 4.968: billed from 12:06:00
    assert res.energy_cost == pytest.approx(2.0 * (energy_kwh - KW * 317.0 / 3600.0), rel=1e-6)
