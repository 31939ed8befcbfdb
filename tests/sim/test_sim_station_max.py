"""The simulated station models what a real one does with a station-wide maximum, with its
station-level composite schedule and with a DC minimum power.

- A ChargePointMaxProfile (2.0.1: ChargingStationMaxProfile) on connector/EVSE 0 caps the
  station as a whole, every EVSE together. The simulator applied it to each EVSE on its own: two
  cars under a 32 A station maximum drew 32 A each, 64 A.
- GetCompositeSchedule for connector/EVSE 0 (the grid connection's expected most) was refused.
- A DC charger limited below its ``min_w`` ran at the limit (3 kW from a 5 kW minimum): a real
  one stops, or runs at its minimum."""

from __future__ import annotations

import pytest
from edge_testkit import held_profile
from evcore.ocpp import validation
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.ev import EV
from evcore.sim.fleet import connector_for
from evcore.sim.vclock import VirtualClock

START = 1_767_614_400.0  # 2026-01-05T12:00:00Z
#: When the tests' profiles were set: a minute before the start. They carry no numberPhases
#: (the station takes its own).
SET_AT = START - 60.0


def _station(
    clock: VirtualClock, conns: list[SimConnector], version: str = "1.6"
) -> SimChargePoint:
    return SimChargePoint(
        "cp-1", conns, url="ws://127.0.0.1:9/ocpp/cp-1", clock=clock, tick_s=5.0, version=version
    )


def _ac_station(clock: VirtualClock, n: int) -> SimChargePoint:
    conns = [SimConnector(evse_id=e, kind="ac", max_a=32.0) for e in range(1, n + 1)]
    cp = _station(clock, conns)
    for e in range(1, n + 1):
        clock.set_time(START + e)  # they start one after the other: EVSE 1 first
        cp.plug_in(e, EV(capacity_kwh=100.0, soc=0.2))
        cp.connectors[e].tx_ref.id = str(e)
    return cp


def _drawn_a(cp: SimChargePoint) -> list[float]:
    return [c.terminal_a[0] for c in cp.connectors.values()]


def test_a_station_maximum_caps_the_evses_together() -> None:
    clock = VirtualClock(START)
    cp = _ac_station(clock, 2)
    cp.hold_profile(held_profile(SET_AT, 1, "max", 32.0, evse=0, phases=None))
    clock.set_time(START + 10.0)
    cp.step()
    assert _drawn_a(cp) == [16.0, 16.0]  # was [32.0, 32.0]: 64 A under a 32 A maximum
    # A car that takes less leaves the rest to the other.
    cp.connectors[1].ev.onboard_limit_a = 10.0  # type: ignore[union-attr]
    clock.set_time(START + 15.0)
    cp.step()
    assert _drawn_a(cp) == [10.0, 22.0]
    # Its own TxDefault still holds each EVSE.
    cp.hold_profile(held_profile(SET_AT, 2, "default", 12.0, evse=2, phases=None))
    clock.set_time(START + 20.0)
    cp.step()
    assert _drawn_a(cp) == [10.0, 12.0]
    # In W (1.6 counts three phases of 230 V for an AC EVSE without numberPhases): 22,080 W is
    # 32 A in all.
    cp.hold_profile(held_profile(SET_AT, 1, "max", 22_080.0, evse=0, phases=None, unit="W"))
    cp.connectors[1].ev.onboard_limit_a = 32.0  # type: ignore[union-attr]
    clock.set_time(START + 25.0)
    cp.step()
    assert sum(_drawn_a(cp)) == pytest.approx(32.0)


def test_shares_below_the_pilot_minimum_pause_the_car_that_started_last() -> None:
    """16 A among three cars is 5.3 A each, below the 6 A pilot: nobody would charge. The last
    to start gets nothing and the first two 8 A each (was 16 A each: 48 A)."""
    clock = VirtualClock(START)
    cp = _ac_station(clock, 3)
    cp.hold_profile(held_profile(SET_AT, 1, "max", 16.0, evse=0, phases=None))
    clock.set_time(START + 10.0)
    cp.step()
    assert _drawn_a(cp) == [8.0, 8.0, 0.0]
    assert cp.connectors[3].status == "SuspendedEVSE"
    # A full car needs no share: the other two run.
    cp.connectors[1].ev.soc = 1.0  # type: ignore[union-attr]
    clock.set_time(START + 15.0)
    cp.step()
    assert _drawn_a(cp) == [0.0, 8.0, 8.0]


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
def test_the_station_composite_schedule_sums_the_evses_under_the_maximum(version: str) -> None:
    clock = VirtualClock(START)
    conns = [SimConnector(evse_id=e, kind="ac", max_a=32.0) for e in (1, 2)]
    cp = _station(clock, conns, version)
    cp.hold_profile(held_profile(SET_AT, 1, "default", 20.0, evse=1, phases=None))
    cp.hold_profile(
        held_profile(SET_AT, 2, "max", 40.0, evse=0, phases=None, valid_to=START + 300.0)
    )
    if version == "1.6":
        call = {"connectorId": 0, "duration": 600}
    else:
        call = {"evseId": 0, "duration": 600}
    validation.validate(version, "GetCompositeSchedule", call, response=False)
    res = cp._on_GetCompositeSchedule(call, [])
    validation.validate(version, "GetCompositeSchedule", res, response=True)
    assert res["status"] == "Accepted"  # was Rejected
    sched = res["chargingSchedule"] if version == "1.6" else res["schedule"]
    assert sched["chargingRateUnit"] == "A"
    # 20 A + 32 A under the 40 A maximum until it ends, then 52 A.
    assert sched["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 40.0},
        {"startPeriod": 300, "limit": 52.0},
    ]
    res = cp._on_GetCompositeSchedule({**call, "chargingRateUnit": "W"}, [])
    validation.validate(version, "GetCompositeSchedule", res, response=True)
    sched = res["chargingSchedule"] if version == "1.6" else res["schedule"]
    assert [p["limit"] for p in sched["chargingSchedulePeriod"]] == [
        pytest.approx(40.0 * 230.0 * 3),
        pytest.approx(52.0 * 230.0 * 3),
    ]


@pytest.mark.parametrize(("below_min", "want_w"), [("stop", 0.0), ("minimum", 5_000.0)])
def test_a_dc_charger_below_its_minimum_stops_or_runs_at_it(below_min: str, want_w: float) -> None:
    clock = VirtualClock(START)
    conn = connector_for(
        {"id": "dc-1", "kind": "dc", "max_w": 50_000.0, "min_w": 5_000.0, "aux_w": 200.0}
    )
    conn.below_min_w = below_min
    cp = _station(clock, [conn])
    cp.plug_in(1, EV(capacity_kwh=300.0, soc=0.2, max_dc_power_w=50_000.0))
    conn.tx_ref.id = "1"
    cp.hold_profile(held_profile(SET_AT, 1, "default", 3_000.0, evse=1, phases=None, unit="W"))
    clock.set_time(START + 5.0)
    cp.step()
    assert conn.offered == want_w  # was 3,000 W
    assert conn.power_w == pytest.approx(want_w / 0.95 + 200.0 if want_w else 0.0)
    # At or above its minimum it follows the limit.
    cp.hold_profile(held_profile(SET_AT, 1, "default", 6_000.0, evse=1, phases=None, unit="W"))
    clock.set_time(START + 10.0)
    cp.step()
    assert conn.offered == 6_000.0
    assert conn.min_w == 5_000.0  # taken from the site file's charger
