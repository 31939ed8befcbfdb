"""Scenario text the twin's tests share."""

from __future__ import annotations

import tomllib
from pathlib import Path

from evcore.sim.scenario import Scenario, parse_scenario


def one_charger_site(
    site_id: str, *, power_limit_kw: float | None = None, charger_extra: str = ""
) -> str:
    """A scenario's ``[site]``: one 63 A grid connection (optionally a kW cap) and one 32 A
    three-phase charger ``cp-1`` at 230 V, as TOML text; ``charger_extra``: TOML lines added to
    the charger's table (``steps_a = [...]``)."""
    cap = f"power_limit_kw = {power_limit_kw}\n" if power_limit_kw is not None else ""
    return f"""[site]
id = "{site_id}"
phase_names = ["L1", "L2", "L3"]
voltage_ln_v = 230.0

[[nodes]]
id = "grid"
phase_limit_a = 63.0
{cap}
[[chargers]]
id = "cp-1"
parent = "grid"
wiring = "three_phase"
phases = ["L1", "L2", "L3"]
voltage_v = 230.0
min_a = 6.0
max_a = 32.0
{charger_extra}"""


def one_car_scenario(
    tmp_path: Path,
    name: str,
    *,
    duration_h: float,
    policy: str,
    departure_h: float | None = None,
    soc_arrival: float = 0.2,
    power_limit_kw: float | None = None,
    extra: str = "",
    start: str = "2026-01-05T12:00:00Z",
    charger_extra: str = "",
) -> Scenario:
    """A scenario on :func:`one_charger_site`: one 100 kWh three-phase 32 A car (``car``) on
    ``cp-1`` from the start to ``departure_h`` (default: the end), asking for 40 kWh, from a CSV
    file written to ``tmp_path``; one ``policy``, seed 1, starting at ``start`` (UTC).
    ``extra``: TOML appended (faults, tariff, grid signals); ``charger_extra``: TOML lines for
    ``cp-1``'s table."""
    dep = duration_h if departure_h is None else departure_h
    (tmp_path / "s.csv").write_text(
        "id,charger,arrival_h,departure_h,energy_kwh,vehicle,soc_arrival\n"
        f"a,cp-1,0,{dep},40,car,{soc_arrival}\n"
    )
    text = (
        f"""[scenario]
name = "{name}"
start = "{start}"
duration_h = {duration_h}
seed = 1
policies = ["{policy}"]

"""
        + one_charger_site(name, power_limit_kw=power_limit_kw, charger_extra=charger_extra)
        + """
[arrivals]
model = "csv"
file = "s.csv"

[[arrivals.vehicles]]
name = "car"
battery_kwh = 100.0
max_a = 32.0
phases = 3

"""
        + extra
    )
    return parse_scenario(tomllib.loads(text), path=tmp_path / "s.toml")


#: A time-of-use tariff for runs starting 2026-01-05T12:00:00Z: 0.10 per kWh until 12:03:20 UTC,
#: 0.50 after (a change 200 s in, away from a 5-minute step's midpoint).
TARIFF_UP_AT_200_S = f"""[tariff]
default_price_per_kwh = 0.10
[[tariff.periods]]
start_h = {12.0 + 200.0 / 3600.0!r}
end_h = 24.0
price_per_kwh = 0.50
"""
