"""Meter values: units, multipliers, phase labels, site-phase mapping and timestamps."""

from __future__ import annotations

from typing import Any

import pytest
from evcore.ocpp import ConfigurationEvent, MeterSample
from evcore.ocpp.metering import MeterValueError, parse_meter_value, parse_timestamp, phase_map_for
from evcore.ocpp.server import chargers_of
from evcore.ocpp.v16 import iso
from evcore.site import load_site
from ocpp_testsite import DC_CHARGER, SITE, make_site, rig

pytestmark = pytest.mark.timeout(60)

TS = "2026-03-01T12:00:00Z"


def sv16(value: str, measurand: str, unit: str, phase: str | None = None) -> dict[str, Any]:
    out = {"value": value, "measurand": measurand, "unit": unit}
    if phase is not None:
        out["phase"] = phase
    return out


def sv201(
    value: float, measurand: str, unit: str, multiplier: int = 0, phase: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "value": value,
        "measurand": measurand,
        "unitOfMeasure": {"unit": unit, "multiplier": multiplier},
    }
    if phase is not None:
        out["phase"] = phase
    return out


def test_1_6_units_are_converted_to_si() -> None:
    mv = {
        "timestamp": TS,
        "sampledValue": [
            sv16("1234.5", "Energy.Active.Import.Register", "kWh"),
            sv16("7.4", "Power.Active.Import", "kW"),
            sv16("16.0", "Current.Import", "A", "L1-N"),
            sv16("15.5", "Current.Import", "A", "L2-N"),
            sv16("15.0", "Current.Import", "A", "L3-N"),
            sv16("32", "Current.Offered", "A"),
            # Measurands the control does not use are skipped, whatever their value.
            sv16("229.1", "Voltage", "V", "L1-N"),
        ],
    }
    r = parse_meter_value("1.6", mv, terminals=3)
    assert r.energy_register_wh == pytest.approx(1_234_500.0)
    assert r.power_w == pytest.approx(7_400.0)
    assert r.terminal_a == [16.0, 15.5, 15.0]
    assert r.offered_a == 32.0
    assert r.at == parse_timestamp(TS)
    # A sampledValue without measurand is the energy register (OCPP default), in Wh by default.
    plain = parse_meter_value(
        "1.6", {"timestamp": TS, "sampledValue": [{"value": "42"}]}, terminals=3
    )
    assert plain.energy_register_wh == 42.0


def test_2_0_1_multipliers_and_per_phase_power() -> None:
    mv = {
        "timestamp": "2026-03-01T13:00:00+01:00",
        "sampledValue": [
            sv201(12.5, "Energy.Active.Import.Register", "kWh", multiplier=0),
            sv201(2.3, "Power.Active.Import", "W", multiplier=3, phase="L1-N"),
            sv201(2.3, "Power.Active.Import", "W", multiplier=3, phase="L2-N"),
            sv201(2.4, "Power.Active.Import", "W", multiplier=3, phase="L3-N"),
            sv201(100.0, "Current.Import", "A", multiplier=-1, phase="L1"),
            sv201(99.0, "Current.Import", "A", multiplier=-1, phase="L2"),
            sv201(98.0, "Current.Import", "A", multiplier=-1, phase="L3"),
        ],
    }
    r = parse_meter_value("2.0.1", mv, terminals=3)
    assert r.energy_register_wh == pytest.approx(12_500.0)
    assert r.power_w == pytest.approx(7_000.0)  # the phases summed
    assert r.terminal_a == pytest.approx([10.0, 9.9, 9.8])
    assert r.at == parse_timestamp(TS)  # the same instant in another zone


def test_phaseless_current_on_single_and_three_phase_chargers() -> None:
    mv = {"timestamp": TS, "sampledValue": [sv16("12", "Current.Import", "A")]}
    assert parse_meter_value("1.6", mv, terminals=1).terminal_a == [12.0, None, None]
    assert parse_meter_value("1.6", mv, terminals=3).terminal_a == [12.0, 12.0, 12.0]


def test_single_terminal_chargers_take_any_phase_label() -> None:
    # The site file says where a one-terminal charger lands, whatever its meter calls the phase.
    for labels in (["L3-N"], ["L2"], ["L1", "L2", "L3"]):
        sampled = [
            sv16("0" if ph != labels[-1] else "13", "Current.Import", "A", ph) for ph in labels
        ]
        mv = {"timestamp": TS, "sampledValue": sampled}
        assert parse_meter_value("1.6", mv, terminals=1).terminal_a == [13.0, None, None], labels
    mv = {"timestamp": TS, "sampledValue": [sv16("13", "Current.Import", "A", "L2")]}
    assert parse_meter_value("1.6", mv, terminals=3).terminal_a == [None, 13.0, None]


def test_signed_1_6_values_are_skipped_not_refused() -> None:
    signed = sv16("OCMF|{...}|{...}", "Energy.Active.Import.Register", "Wh")
    signed["format"] = "SignedData"
    mv = {
        "timestamp": TS,
        "sampledValue": [signed, sv16("5000", "Energy.Active.Import.Register", "Wh")],
    }
    assert parse_meter_value("1.6", mv, terminals=3).energy_register_wh == 5000.0


@pytest.mark.parametrize(
    ("version", "sampled", "match"),
    [
        ("1.6", [{"value": "lots", "unit": "Wh"}], r"sampledValue\[0\]\.value: not a number"),
        ("1.6", [{"value": "nan", "unit": "Wh"}], "not finite"),
        ("1.6", [{"value": "inf", "measurand": "Current.Import"}], "not finite"),
        ("2.0.1", [{"value": "5", "measurand": "Power.Active.Import"}], "not a number"),
        # 10^400 overflows a float: it raised OverflowError (CALLERROR InternalError).
        ("2.0.1", [{"value": 5, "unitOfMeasure": {"multiplier": 400}}], "multiplier: out of"),
        ("2.0.1", [{"value": 1e307, "unitOfMeasure": {"unit": "kWh"}}], "not finite"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    version: str, sampled: list[dict[str, Any]], match: str
) -> None:
    with pytest.raises(MeterValueError, match=match):
        parse_meter_value(version, {"timestamp": TS, "sampledValue": sampled}, terminals=3)


@pytest.mark.parametrize(
    "bad", ["2026-03-01T12:00:00", "yesterday", "2026-13-01T00:00:00Z", "", None, 1767225600]
)
def test_bad_timestamps_are_refused(bad: Any) -> None:
    with pytest.raises(MeterValueError, match="timestamp"):
        parse_timestamp(bad)
    with pytest.raises(MeterValueError, match=r"meterValue\[3\]\.timestamp"):
        parse_meter_value(
            "1.6", {"timestamp": bad, "sampledValue": []}, terminals=3, field="meterValue[3]"
        )


def test_phase_map_accepts_names_and_indices() -> None:
    names = ["L1", "L2", "L3"]
    by_name = phase_map_for("three_phase", ["L2", "L3", "L1"], names)
    by_index = phase_map_for("three_phase", [1, 2, 0], names)
    assert by_name == by_index
    assert by_index.to_site([16.0, 0.0, 0.0]) == (0.0, 16.0, 0.0)
    assert by_index.to_site([10.0, 11.0, 12.0]) == (12.0, 10.0, 11.0)
    # A single-phase charger on site phase 3: the other phases read 0, not unknown.
    l2n = phase_map_for("line_to_neutral", [2], names)
    assert l2n.terminals == 1 and l2n.to_site([13.0, None, None]) == (0.0, 0.0, 13.0)
    assert l2n.to_site([None, None, None]) == (None, None, None)
    # Line-to-line (North America): the branch current flows out on one line, back on the other.
    ab = phase_map_for("line_to_line", ["B", "C"], ["A", "B", "C"])
    assert ab.to_site([24.0, None, None]) == (0.0, 24.0, 24.0)
    for bad in (["L4"], [3], [-1]):
        with pytest.raises(ValueError, match="not among site phases"):
            phase_map_for("line_to_neutral", bad, names)


def test_site_file_wiring_maps_to_phase_indices() -> None:
    # The site loader hands out phase indices; the central system maps them unchanged.
    site = make_site()
    assert site.charger("cp-a").phases == (1, 2, 0)
    info = {c.charger_id: c for c in chargers_of(site)}
    assert info["cp-a"].phase_map.site_index == (1, 2, 0)
    assert info["cp-c"].phase_map.site_index == (2,) and info["cp-c"].number_phases == 1
    assert info["cp-b"].number_phases == 3
    # A North American site with its own phase names.
    data: dict[str, Any] = {
        "site": {"id": "na", "phase_names": ["A", "B", "C"], "voltage_ln_v": 120.0},
        "nodes": [{"id": "grid", "kind": "grid", "phase_limit_a": 100.0}],
        "chargers": [
            {
                "id": "evse-1",
                "parent": "grid",
                "wiring": "line_to_line",
                "phases": ["C", "A"],
                "voltage_v": 208.0,
                "max_a": 32.0,
            }
        ],
    }
    na = chargers_of(load_site(data))[0]
    assert na.phase_map.site_index == (2, 0)
    assert na.phase_map.to_site([20.0, None, None]) == (20.0, 0.0, 20.0)
    assert SITE["chargers"][0]["phases"] == ["L2", "L3", "L1"]  # the shared site is untouched


async def test_units_and_multipliers_over_the_socket() -> None:
    """A 2.0.1 station reporting in kW/kWh with multipliers, a 1.6 one in kW/kWh: SI at the CSMS."""
    async with rig() as r:
        await r.until(lambda: len(r.of(ConfigurationEvent)) == 4)
        b, c = r.fleet.stations["CPB"], r.fleet.stations["CPA"]
        now = r.cs.clock.now()
        res = await b.call(
            "MeterValues",
            {
                "evseId": 1,
                "meterValue": [
                    {
                        "timestamp": iso(now),
                        "sampledValue": [
                            sv201(1.5, "Energy.Active.Import.Register", "kWh", multiplier=3),
                            sv201(11.0, "Power.Active.Import", "kW"),
                            sv201(160.0, "Current.Import", "A", multiplier=-1, phase="L1"),
                        ],
                    }
                ],
            },
        )
        assert res == {}
        res = await c.call(
            "MeterValues",
            {
                "connectorId": 1,
                "meterValue": [
                    {
                        "timestamp": iso(now),
                        "sampledValue": [
                            sv16("2.5", "Energy.Active.Import.Register", "kWh"),
                            sv16("3.68", "Power.Active.Import", "kW"),
                            sv16("16", "Current.Import", "A", "L1"),
                        ],
                    }
                ],
            },
        )
        assert res == {}
        await r.until(lambda: len([s for s in r.of(MeterSample) if s.power_w]) >= 2)
        got = {s.charger_id: s for s in r.of(MeterSample) if s.power_w}
        assert got["cp-b"].energy_register_wh == pytest.approx(1_500_000.0)
        assert got["cp-b"].power_w == pytest.approx(11_000.0)
        assert got["cp-b"].terminal_a[0] == pytest.approx(16.0)
        assert got["cp-b"].site_phase_a[0] == pytest.approx(16.0)
        assert got["cp-a"].energy_register_wh == pytest.approx(2_500.0)
        assert got["cp-a"].power_w == pytest.approx(3_680.0)
        # cp-a's terminal L1 is site L2; its other terminals were not reported.
        assert got["cp-a"].site_phase_a == (None, 16.0, None)


def test_a_dc_chargers_outlet_current_is_not_a_line_current() -> None:
    def mv(*sampled: dict[str, Any]) -> dict[str, Any]:
        return {"timestamp": TS, "sampledValue": list(sampled)}

    def at(sv: dict[str, Any], location: str) -> dict[str, Any]:
        return {**sv, "location": location}

    outlet = mv(
        sv201(125.0, "Current.Import", "A"),  # DC to the car (the default location is Outlet)
        sv201(50.0, "Power.Active.Import", "W", multiplier=3),
    )
    r = parse_meter_value("2.0.1", outlet, terminals=3, dc=True)
    assert r.terminal_a == [None, None, None] and r.power_w == 50_000.0 and not r.power_at_inlet
    # An AC charger's outlet current is its line current, as before.
    assert parse_meter_value("2.0.1", outlet, terminals=3).terminal_a == [125.0] * 3
    inlet = mv(
        at(sv201(125.0, "Current.Import", "A"), "Outlet"),
        at(sv201(75.0, "Current.Import", "A", phase="L1"), "Inlet"),
        at(sv201(52.0, "Power.Active.Import", "W", multiplier=3), "Inlet"),
    )
    r = parse_meter_value("2.0.1", inlet, terminals=3, dc=True)
    assert r.terminal_a == [75.0, None, None]
    assert r.power_w == 52_000.0 and r.power_at_inlet


async def test_dc_line_currents_over_the_socket() -> None:
    """A DC station reporting only its outlet: the line currents follow from the power through
    the rectifier (site file efficiency 0.95, aux 200 W), not from the DC current."""
    async with rig(extra_chargers=[DC_CHARGER]) as r:
        d = r.fleet.stations["CPD"]
        res = await d.call(
            "MeterValues",
            {
                "evseId": 1,
                "meterValue": [
                    {
                        "timestamp": iso(r.cs.clock.now()),
                        "sampledValue": [
                            sv201(125.0, "Current.Import", "A"),
                            sv201(50.0, "Power.Active.Import", "kW"),
                        ],
                    }
                ],
            },
        )
        assert res == {}
        await r.until(lambda: any(s.charger_id == "cp-d" for s in r.of(MeterSample)))
        got = next(s for s in r.of(MeterSample) if s.charger_id == "cp-d")
        line = (50_000.0 / 0.95 + 200.0) / (3 * 230.0)
        assert got.site_phase_a == pytest.approx((line, line, line))
        # The power drawn from the grid (it went out as the outlet's 50 kW before 2026-12-06).
        assert got.power_w == pytest.approx(50_000.0 / 0.95 + 200.0)
