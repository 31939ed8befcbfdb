"""Scenario text the twin's tests share."""

from __future__ import annotations


def one_charger_site(site_id: str, *, power_limit_kw: float | None = None) -> str:
    """A scenario's ``[site]``: one 63 A grid connection (optionally a kW cap) and one 32 A
    three-phase charger ``cp-1`` at 230 V, as TOML text."""
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
"""
