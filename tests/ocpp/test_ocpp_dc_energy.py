"""A DC charger's session energy is the energy into the car, from the register at its outlet.

OCPP's ``Energy.Active.Import.Register`` has a ``location``: ``Outlet`` (the default) is what goes
to the car, ``Inlet`` the charger's grid side. For a DC charger the two differ by the rectifier's
losses and its auxiliary load. The central system reads the location: the session energy of a DC
session is the outlet register's difference; a DC charger that reports only an inlet register has
it converted with the site file's ``efficiency`` and ``aux_w`` (the auxiliary load over each
interval between two readings in which the register moved). An AC charger is as before: its
outlet register, else its inlet one.

Before (review, 2026-12): the location was ignored, and the simulator's DC charger counted its AC
input on a register it reported as the outlet's: a DC session's energy at the edge was the grid's,
about 5 % and the auxiliary load above what the car took.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.ocpp import MeterSample, TransactionEvent
from evcore.ocpp.metering import parse_meter_value
from evcore.ocpp.v16 import iso
from evcore.sim.ev import EV
from ocpp_testsite import DC_CHARGER, VERSIONS, raw_csms, rig, tx_event

pytestmark = pytest.mark.timeout(60)

EFF = DC_CHARGER["efficiency"]  # 0.95
AUX_W = DC_CHARGER["aux_w"]  # 200 W


def register(wh: float, location: str | None = None) -> dict[str, Any]:
    sv: dict[str, Any] = {
        "value": wh,
        "measurand": "Energy.Active.Import.Register",
        "unitOfMeasure": {"unit": "Wh"},
    }
    if location is not None:
        sv["location"] = location
    return sv


def mv(at: float, *sampled: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"timestamp": iso(at), "sampledValue": list(sampled)}]


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
async def test_a_simulated_dc_sessions_energy_is_what_its_battery_took(version: str) -> None:
    """End to end: the simulated 50 kW DC charger (efficiency 0.95, 200 W aux) over real OCPP.
    The session energy the central system publishes is the battery's gain (before: the AC
    input, 50 / 0.95 + 0.2 kW for 50 kW into the car, 5.7 % more)."""
    async with rig(extra_chargers=[DC_CHARGER], versions={**VERSIONS, "CPD": version}) as r:
        ev = EV(capacity_kwh=1000.0, soc=0.2, max_dc_power_w=50_000.0)
        r.fleet.plug_in("cp-d", ev)
        await r.until(
            lambda: any(s.charger_id == "cp-d" and s.session_energy_wh for s in r.of(MeterSample)),
            6,
        )
        await asyncio.sleep(4.0)
        r.fleet.unplug("cp-d")
        await r.until(
            lambda: any(
                e.charger_id == "cp-d" and e.kind == "ended" for e in r.of(TransactionEvent)
            ),
            6,
        )
        battery_wh = (ev.soc - 0.2) * 1_000_000.0
        assert battery_wh > 50.0  # it charged (about 14 Wh a second)
        ended = next(e for e in r.of(TransactionEvent) if e.kind == "ended")
        # 1.6 meterStart / meterStop are whole Wh.
        assert ended.session_energy_wh == pytest.approx(battery_wh, abs=1.0)
        sim = r.fleet.connector("cp-d")
        # The station's AC input meter, reported at the Inlet, counted the losses and aux.
        assert sim.inlet_register_wh - 1_000_000.0 > battery_wh / EFF


async def test_dc_session_energy_comes_from_the_outlet_register_when_both_are_reported() -> None:
    """A 2.0.1 DC station reporting its DC (outlet, no location) and AC (Inlet) registers: the
    session energy is the outlet's difference (before: whichever came last, here the inlet's)."""
    async with raw_csms(extra_chargers=[DC_CHARGER]) as r:
        clock, events = r.clock, r.events
        st = await r.station("CPD")
        t = clock.now() - 120
        evse = {"id": 1, "connectorId": 1}
        steps = [
            tx_event(
                "D1",
                0,
                "Started",
                "CablePluggedIn",
                t,
                evse=evse,
                meterValue=mv(t, register(4_000.0), register(5_000.0, "Inlet")),
            ),
            tx_event(
                "D1",
                1,
                "Updated",
                "MeterValuePeriodic",
                t + 60,
                evse=evse,
                meterValue=mv(t + 60, register(4_800.0, "Outlet"), register(5_860.0, "Inlet")),
            ),
        ]
        for p in steps:
            assert (await st.call("TransactionEvent", p))[0] == 3
        samples = [s for s in events if isinstance(s, MeterSample)]
        assert [s.session_energy_wh for s in samples] == [0.0, 800.0]  # was 0, 860 (inlet)
        assert samples[-1].energy_register_wh == 4_800.0  # the outlet register
        updated = [e for e in events if isinstance(e, TransactionEvent)][-1]
        assert (updated.meter_start_wh, updated.meter_now_wh) == (4_000.0, 4_800.0)


async def test_a_dc_station_metering_only_its_inlet_is_converted_with_the_site_file() -> None:
    """A 2.0.1 DC station whose only register is at its Inlet: the energy into the car is
    (inlet energy less aux_w over the interval) x efficiency per interval between two readings;
    a pause (the register still) counts nothing, aux included."""
    async with raw_csms(extra_chargers=[DC_CHARGER]) as r:
        clock, events = r.clock, r.events
        st = await r.station("CPD")
        t = clock.now() - 600
        evse = {"id": 1, "connectorId": 1}
        # 60 s at 40 kW into the car: 40 / 0.95 + 0.2 kW at the inlet.
        grid_wh = (40_000.0 / EFF + AUX_W) * 60.0 / 3600.0
        readings = [
            (t, 10_000.0),
            (t + 60, 10_000.0 + grid_wh),
            (t + 300, 10_000.0 + grid_wh),  # paused 4 min: nothing, no aux either
            (t + 360, 10_000.0 + 2 * grid_wh),
        ]
        for seq, (at, wh) in enumerate(readings):
            kind = "Started" if seq == 0 else "Updated"
            p = tx_event(
                "D2",
                seq,
                kind,
                "MeterValuePeriodic",
                at,
                evse=evse,
                meterValue=mv(at, register(wh, "Inlet")),
            )
            assert (await st.call("TransactionEvent", p))[0] == 3
        got = [s.session_energy_wh for s in events if isinstance(s, MeterSample)]
        car_wh = 40_000.0 * 60.0 / 3600.0
        assert got == pytest.approx([0.0, car_wh, car_wh, 2 * car_wh])  # was grid_wh, ...


async def test_an_outlet_register_that_comes_late_goes_on_from_the_inlets_count() -> None:
    """A 2.0.1 DC station that reports its outlet register only from some reading on: the
    session energy goes on from what its inlet register counted, then follows the outlet's."""
    async with raw_csms(extra_chargers=[DC_CHARGER]) as r:
        clock, events = r.clock, r.events
        st = await r.station("CPD")
        t = clock.now() - 600
        grid_wh = (40_000.0 / EFF + AUX_W) * 60.0 / 3600.0
        car_wh = 40_000.0 * 60.0 / 3600.0
        readings = [
            [register(10_000.0, "Inlet")],
            [register(10_000.0 + grid_wh, "Inlet")],
            [register(3_000.0), register(10_000.0 + 2 * grid_wh, "Inlet")],
            [register(3_000.0 + car_wh), register(10_000.0 + 3 * grid_wh, "Inlet")],
        ]
        for seq, sampled in enumerate(readings):
            at = t + 60 * seq
            kind = "Started" if seq == 0 else "Updated"
            p = tx_event(
                "D3",
                seq,
                kind,
                "MeterValuePeriodic",
                at,
                evse={"id": 1, "connectorId": 1},
                meterValue=mv(at, *sampled),
            )
            assert (await st.call("TransactionEvent", p))[0] == 3
        got = [s.session_energy_wh for s in events if isinstance(s, MeterSample)]
        assert got == pytest.approx([0.0, car_wh, car_wh, 2 * car_wh])


async def test_1_6_meter_start_and_stop_of_an_inlet_only_dc_station() -> None:
    """1.6 meterStart / meterStop carry no location: they are the register the station's
    meter values report, here its Inlet one (its only one)."""
    async with raw_csms(extra_chargers=[DC_CHARGER]) as r:
        clock, events = r.clock, r.events
        st = await r.station("CPD", "1.6")
        t = clock.now() - 200
        grid_wh = (40_000.0 / EFF + AUX_W) * 60.0 / 3600.0
        start = await st.call(
            "StartTransaction",
            {"connectorId": 1, "idTag": "T", "meterStart": 20_000, "timestamp": iso(t)},
        )
        tx_id = start[2]["transactionId"]
        sv = {
            "value": f"{20_000.0 + grid_wh:.3f}",
            "measurand": "Energy.Active.Import.Register",
            "unit": "Wh",
            "location": "Inlet",
        }
        values = {
            "connectorId": 1,
            "transactionId": tx_id,
            "meterValue": [{"timestamp": iso(t + 60), "sampledValue": [sv]}],
        }
        assert (await st.call("MeterValues", values))[0] == 3
        stop = {
            "transactionId": tx_id,
            "meterStop": round(20_000.0 + 2 * grid_wh),
            "timestamp": iso(t + 120),
            "reason": "EVDisconnected",
        }
        assert (await st.call("StopTransaction", stop))[0] == 3
        car_wh = 40_000.0 * 60.0 / 3600.0
        sample = next(s for s in events if isinstance(s, MeterSample))
        assert sample.session_energy_wh == pytest.approx(car_wh)
        ended = next(e for e in events if isinstance(e, TransactionEvent) and e.kind == "ended")
        assert ended.session_energy_wh == pytest.approx(2 * car_wh, abs=1.0)


async def test_an_ac_charger_is_as_before_whatever_the_location() -> None:
    """AC: the outlet register (no location) as before; a station reporting only an Inlet
    register has it taken as it is (no conversion)."""
    async with raw_csms() as r:
        clock, events = r.clock, r.events
        st = await r.station("CPB")
        t = clock.now() - 100
        for seq, wh in enumerate((1_000.0, 1_500.0)):
            p = tx_event(
                "A1",
                seq,
                "Started" if seq == 0 else "Updated",
                "MeterValuePeriodic",
                t + 60 * seq,
                evse={"id": 1, "connectorId": 1},
                meterValue=mv(t + 60 * seq, register(wh, "Inlet")),
            )
            assert (await st.call("TransactionEvent", p))[0] == 3
        got = [s.session_energy_wh for s in events if isinstance(s, MeterSample)]
        assert got == [0.0, 500.0]


def test_the_register_location_is_read() -> None:
    def reading(*sampled: dict[str, Any], dc: bool = True) -> Any:
        return parse_meter_value(
            "2.0.1", {"timestamp": iso(0.0), "sampledValue": list(sampled)}, terminals=3, dc=dc
        )

    r = reading(register(10.0, "Inlet"), register(8.0))
    assert (r.energy_register_wh, r.inlet_energy_register_wh) == (8.0, 10.0)
    r = reading(register(8.0, "Outlet"), register(10.0, "Inlet"))
    assert (r.energy_register_wh, r.inlet_energy_register_wh) == (8.0, 10.0)
    r = reading(register(10.0, "Inlet"))
    assert (r.energy_register_wh, r.inlet_energy_register_wh) == (None, 10.0)
    # EV: what the car measured it took, as the outlet's when no outlet register came.
    assert reading(register(7.0, "EV")).energy_register_wh == 7.0
    assert reading(register(7.0, "EV"), register(8.0, "Outlet")).energy_register_wh == 8.0
    # A register of the cable or the charger's body is not the session's.
    assert reading(register(5.0, "Body"), dc=False).energy_register_wh is None


def power(w: float, location: str | None = None) -> dict[str, Any]:
    sv: dict[str, Any] = {
        "value": w,
        "measurand": "Power.Active.Import",
        "unitOfMeasure": {"unit": "W"},
    }
    if location is not None:
        sv["location"] = location
    return sv


async def test_a_dc_chargers_published_power_is_what_it_draws_from_the_grid() -> None:
    """MeterSample.power_w is the import from the grid (what the edge compares with a DC
    setpoint's input). A DC station's power at its outlet (no location) is converted with the
    efficiency and aux_w, one at its Inlet is taken as it is; a DC charger whose site file gives
    no efficiency is counted at the core's 0.95 (its line current was counted at 1.0). Before:
    30 kW at the outlet went out as 30 kW (the grid gave 31.78 kW), and the line current of
    the charger without an efficiency was 43.5 A instead of 45.8."""
    bare = {**DC_CHARGER, "id": "cp-e", "ocpp_id": "CPE"}
    del bare["efficiency"]
    async with raw_csms(extra_chargers=[DC_CHARGER, bare]) as r:
        clock, events = r.clock, r.events
        evse = {"id": 1, "connectorId": 1}
        t = clock.now() - 60
        for ocpp_id, tx in (("CPD", "P1"), ("CPE", "P2")):
            st = await r.station(ocpp_id)
            readings = [mv(t, power(30_000.0)), mv(t + 10, power(32_000.0, "Inlet"))]
            for seq, m in enumerate(readings):
                kind = "Started" if seq == 0 else "Updated"
                p = tx_event(tx, seq, kind, "MeterValuePeriodic", t + 10 * seq, evse=evse)
                p["meterValue"] = m
                assert (await st.call("TransactionEvent", p))[0] == 3
        samples = [s for s in events if isinstance(s, MeterSample)]
        d = [s for s in samples if s.charger_id == "cp-d"]
        e = [s for s in samples if s.charger_id == "cp-e"]
        assert [s.power_w for s in d] == pytest.approx([30_000.0 / EFF + AUX_W, 32_000.0])
        assert [s.power_w for s in e] == pytest.approx([30_000.0 / 0.95 + AUX_W, 32_000.0])
        line = (30_000.0 / 0.95 + AUX_W) / (3 * 230.0)
        assert e[0].site_phase_a == pytest.approx((line, line, line))
