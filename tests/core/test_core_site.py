"""The site file: every load-time error names the node (or charger) and the field; TOML and dict
loading agree; ``evcore site check`` through the real console script."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from evcore.errors import EvcoreError, SiteConfigError
from evcore.site import load_site

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "edge" / "site.example.toml"


def base() -> dict[str, Any]:
    return {
        "site": {"id": "s"},
        "nodes": [
            {"id": "grid", "kind": "grid", "phase_limit_a": 100.0},
            {"id": "F1", "parent": "grid", "kind": "feeder", "phase_limit_a": [63.0, 63.0, 0.0]},
        ],
        "chargers": [
            {
                "id": "cp1",
                "parent": "F1",
                "wiring": "line_to_neutral",
                "phases": ["L1"],
                "voltage_v": 230.0,
                "max_a": 32.0,
            }
        ],
    }


def node(site: dict[str, Any], node_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(n for n in site["nodes"] if n["id"] == node_id)
    return found


def expect(site: dict[str, Any], where: str, field: str) -> SiteConfigError:
    with pytest.raises(SiteConfigError) as info:
        load_site(site)
    e = info.value
    assert (e.node, e.field) == (where, field), str(e)
    assert f"{where}.{field}" in str(e)
    assert isinstance(e, ValueError) and isinstance(e, EvcoreError)
    return e


def test_valid_site_loads_with_normalised_limits() -> None:
    s = load_site(base())
    assert s.node_ids == ["grid", "F1"] and s.charger_ids == ["cp1"]
    assert s.node("F1").phase_limit_a == (63.0, 63.0, 0.0)
    assert s.charger("cp1").min_a == 6.0  # IEC 61851 default


def test_breaker_rating_is_derated_to_a_continuous_limit() -> None:
    site = base()
    grid = node(site, "grid")
    del grid["phase_limit_a"]
    grid |= {"breaker_rating_a": 250.0, "continuous_derating": 0.8}
    s = load_site(site)
    assert s.node("grid").phase_limit_a == (200.0, 200.0, 200.0)
    assert s.node("grid").breaker_rating_a == (250.0, 250.0, 250.0)


def test_unknown_parent_names_node_and_field() -> None:
    site = base()
    node(site, "F1")["parent"] = "nowhere"
    e = expect(site, "F1", "parent")
    assert "nowhere" in str(e)
    site = base()
    site["chargers"][0]["parent"] = "F9"
    expect(site, "cp1", "parent")


def test_cycle_is_rejected() -> None:
    site = base()
    site["nodes"] += [
        {"id": "A", "parent": "B", "phase_limit_a": 10.0},
        {"id": "B", "parent": "A", "phase_limit_a": 10.0},
    ]
    e = expect(site, "A", "parent")
    assert "cycle" in str(e)


def test_duplicate_ids_are_rejected() -> None:
    site = base()
    site["nodes"].append({"id": "F1", "parent": "grid", "phase_limit_a": 10.0})
    expect(site, "F1", "id")
    site = base()
    site["chargers"].append(dict(site["chargers"][0]))
    expect(site, "cp1", "id")
    site = base()
    site["chargers"][0]["id"] = "F1"  # a charger named like a node
    e = expect(site, "F1", "id")
    assert "node" in str(e)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -5.0])
def test_non_finite_or_negative_limits_are_rejected(bad: float) -> None:
    site = base()
    node(site, "F1")["phase_limit_a"] = [63.0, bad, 0.0]
    expect(site, "F1", "phase_limit_a")
    site = base()
    node(site, "grid")["power_limit_kw"] = bad
    expect(site, "grid", "power_limit_kw")
    site = base()
    site["chargers"][0]["max_a"] = bad
    expect(site, "cp1", "max_a")


def test_min_above_max_is_rejected() -> None:
    site = base()
    site["chargers"][0] |= {"min_a": 20.0, "max_a": 16.0}
    expect(site, "cp1", "min_a")
    site = base()
    site["chargers"][0]["min_a"] = 3.0  # below the IEC 61851 6 A
    expect(site, "cp1", "min_a")


def test_wiring_on_a_phase_the_parent_lacks_is_rejected() -> None:
    site = base()
    site["chargers"][0]["phases"] = ["L3"]  # F1 has 0 A on L3
    e = expect(site, "F1", "phase_limit_a")
    assert "cp1" in str(e) and "L3" in str(e)


def test_child_limit_that_can_never_be_used_is_rejected() -> None:
    site = base()
    node(site, "F1")["phase_limit_a"] = [4.0, 63.0, 0.0]  # below the charger's 6 A minimum
    expect(site, "F1", "phase_limit_a")
    site = base()
    node(site, "grid")["power_limit_kw"] = 0.0
    expect(site, "grid", "power_limit_kw")


@pytest.mark.parametrize(
    ("charger", "cap"),
    [
        # One phase at its 6 A minimum unbalances the phases by 6 A.
        ({"wiring": "line_to_neutral", "phases": ["L1"]}, 5.9),
        # Across L1-L2: 6 A on both lines, 0 on L3.
        ({"wiring": "line_to_line", "phases": ["L1", "L2"], "voltage_v": 400.0}, 5.9),
        # A single-phase car on a three-phase charger draws its 6 A on L1 alone.
        ({"wiring": "three_phase", "phases": ["L1", "L2", "L3"], "single_phase_car": True}, 2.0),
    ],
)
def test_unbalance_cap_below_a_chargers_own_minimum_unbalance_is_rejected(
    charger: dict[str, Any], cap: float
) -> None:
    site = base()
    node(site, "F1")["phase_limit_a"] = 63.0
    site["chargers"][0] |= charger
    node(site, "F1")["unbalance_limit_a"] = cap
    e = expect(site, "F1", "unbalance_limit_a")
    assert "cp1" in str(e)
    node(site, "F1")["unbalance_limit_a"] = 6.0  # exactly its minimum: it can run
    load_site(site)


def test_a_three_phase_charger_without_single_phase_cars_fits_any_unbalance_cap() -> None:
    site = base()
    node(site, "F1")["phase_limit_a"] = 63.0
    site["chargers"][0] |= {
        "wiring": "three_phase",
        "phases": ["L1", "L2", "L3"],
        "single_phase_car": False,
    }
    node(site, "F1")["unbalance_limit_a"] = 0.5
    load_site(site)


def test_dc_minimum_power_above_a_phase_limit_is_rejected() -> None:
    """20 kW DC minimum at 95 % and 200 W auxiliary is (20000/0.95 + 200)/690 = 30.8 A of line
    current: a 10 A feeder can never carry it."""
    site = base()
    node(site, "F1")["phase_limit_a"] = 10.0
    site["chargers"][0] = {
        "id": "dc1",
        "parent": "F1",
        "kind": "dc",
        "wiring": "three_phase",
        "phases": ["L1", "L2", "L3"],
        "voltage_v": 230.0,
        "max_w": 50_000.0,
        "min_w": 20_000.0,
        "efficiency": 0.95,
        "aux_w": 200.0,
    }
    e = expect(site, "F1", "phase_limit_a")
    assert "dc1" in str(e) and "30.8" in str(e)
    node(site, "F1")["phase_limit_a"] = 31.0
    assert load_site(site).charger("dc1").dc_line_a(20_000.0) == pytest.approx(
        (20_000.0 / 0.95 + 200.0) / 690.0
    )


@pytest.mark.parametrize("steps", [[8.0, 32.0], [3.0, 8.0]])
def test_allowed_steps_outside_the_chargers_range_are_rejected(steps: list[float]) -> None:
    site = base()
    site["chargers"][0] |= {"max_a": 16.0, "steps_a": steps}
    e = expect(site, "cp1", "steps_a")
    assert "[6, 16]" in str(e)


def test_other_field_errors_name_the_field() -> None:
    site = base()
    site["chargers"][0]["wiring"] = "delta"
    expect(site, "cp1", "wiring")
    site = base()
    site["chargers"][0]["phases"] = ["L1", "L2"]  # line-to-neutral takes one phase
    expect(site, "cp1", "phases")
    site = base()
    node(site, "F1")["colour"] = "red"
    expect(site, "F1", "colour")


def test_three_phase_voltage_must_be_the_site_line_to_neutral_voltage() -> None:
    """A DC or three-phase charger given the line-to-line voltage (400 V on a 230 V site) would
    count its line current and kW sqrt(3) low: an error naming charger and field."""
    site = base()
    site["nodes"][1]["phase_limit_a"] = 63.0
    site["chargers"].append(
        {
            "id": "dc1",
            "parent": "F1",
            "kind": "dc",
            "wiring": "three_phase",
            "voltage_v": 400.0,
            "max_w": 22000.0,
        }
    )
    e = expect(site, "dc1", "voltage_v")
    assert "voltage_ln_v" in str(e)
    site["chargers"][1]["voltage_v"] = 230.0
    site["chargers"][1]["kind"] = "ac"
    del site["chargers"][1]["max_w"]
    site["chargers"][1]["max_a"] = 16.0
    site["chargers"][1]["voltage_v"] = 400.0
    expect(site, "dc1", "voltage_v")
    # Left out, it is the site's own line-to-neutral voltage.
    del site["chargers"][1]["voltage_v"]
    site["site"]["voltage_ln_v"] = 220.0
    site["chargers"][0]["voltage_v"] = 220.0
    loaded = load_site(site)
    assert loaded.chargers[1].voltage_v == 220.0


def test_toml_file_loads_like_the_dict(tmp_path: Path) -> None:
    s = load_site(EXAMPLE)
    assert s.path == EXAMPLE and len(s.chargers) >= 3
    # The same tables given as a dict give the same site, node by node and charger by charger.
    with EXAMPLE.open("rb") as f:
        from_dict = load_site(tomllib.load(f))
    assert from_dict.node_ids == s.node_ids and from_dict.charger_ids == s.charger_ids
    assert from_dict.nodes == s.nodes and from_dict.chargers == s.chargers
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nid = 1\n")
    e = expect_file(bad)
    assert (e.node, e.field) == ("site", "file")
    e = expect_file(tmp_path / "missing.toml")
    assert "not found" in str(e)


def expect_file(path: Path) -> SiteConfigError:
    with pytest.raises(SiteConfigError) as info:
        load_site(path)
    return info.value


def _evcore() -> list[str]:
    exe = shutil.which("evcore")
    return [exe] if exe else [sys.executable, "-m", "evcore"]


def test_site_check_cli_prints_the_tree_and_fails_with_node_and_field(tmp_path: Path) -> None:
    ok = subprocess.run(
        [*_evcore(), "site", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "breaker 250 A × 0.8" in ok.stdout and "ok:" in ok.stdout
    bad = tmp_path / "site.toml"
    bad.write_text(
        '[site]\nid = "x"\n[[nodes]]\nid = "grid"\nphase_limit_a = 100.0\n'
        '[[chargers]]\nid = "cp1"\nparent = "grid"\nwiring = "three_phase"\n'
        "voltage_v = 230.0\nmin_a = 20.0\nmax_a = 16.0\n"
    )
    res = subprocess.run(
        [*_evcore(), "site", "check", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2  # a bad site file: 2, as evcore edge (dab6e11)
    assert "cp1.min_a" in res.stderr
