"""Stations whose clocks are off from the central system's (simulated stations over real sockets).

Every profile's schedule starts ``max_clock_skew_s`` before the central system's now, its final
period still at ``validTo`` by our clock; each station's clock offset is estimated from the
timestamps it sends (``CentralSystem.clock_offset_s``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import pytest
from evcore.ocpp.clockskew import ClockOffset
from evcore.ocpp.handlers import iso
from evcore.ocpp.metering import parse_timestamp
from evcore.sim.ev import EV
from ocpp_testsite import PASSWORDS, rig
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(60)


def _schedule(payload: dict[str, object]) -> dict[str, object]:
    prof = payload.get("csChargingProfiles") or payload["chargingProfile"]
    assert isinstance(prof, dict)
    sched = prof["chargingSchedule"]
    return sched[0] if isinstance(sched, list) else sched  # type: ignore[no-any-return]


def _last_schedule(sim: Any) -> tuple[float, list[dict[str, Any]]]:
    """The start and the periods of the last profile ``sim`` was sent."""
    sched = _schedule([p for a, p in sim.received if a == "SetChargingProfile"][-1])
    periods = sched["chargingSchedulePeriod"]
    assert isinstance(periods, list)
    return parse_timestamp(str(sched["startSchedule"])), periods


@pytest.mark.parametrize(("charger", "station"), [("cp-a", "CPA"), ("cp-b", "CPB")])
async def test_a_station_60_s_behind_applies_a_lowered_txdefault_at_once(
    charger: str, station: str
) -> None:
    async with rig(connect=False) as r:
        sim = r.fleet.stations[station]
        sim.clock_offset_s = -60.0
        await r.fleet.start()
        await r.fleet.wait_connected()
        await r.until(lambda: sim.boot_status == "Accepted")
        evse = r.cs.charger(charger).evse_id
        res = await r.cs.set_limit(charger, limit_a=16.0, purpose="tx_default")
        assert res.status == "Accepted"
        res = await r.cs.set_limit(charger, limit_a=6.0, purpose="tx_default")
        assert res.status == "Accepted"
        now = r.cs.clock.now()
        start = parse_timestamp(
            _schedule([p for a, p in sim.received if a == "SetChargingProfile"][-1])[
                "startSchedule"
            ]
        )
        assert now - 301.0 < start <= now - 300.0
        await asyncio.sleep(0.5)
        # Before: the schedule started at our now, 60 s in the station's future: the lowered
        # TxDefault was not in force and had replaced the 16 A one, the station allowed 32 A.
        assert sim.limit_at(evse, sim.clock.now()) == 6.0


async def test_a_station_10_min_behind_applies_a_profile_at_once_once_its_lag_is_known() -> None:
    """Beyond ``max_clock_skew_s`` (300 s) the fixed margin is not enough: a station 600 s behind
    got a schedule starting 300 s in its future and enforced nothing of it meanwhile (only a
    WARNING was logged). Once its lag is known (two minutes of its timestamps) the schedule
    starts that much earlier again; the final period stays at ``validTo`` by our clock."""
    async with rig(connect=False) as r:
        sim = r.fleet.stations["CPA"]
        sim.clock_offset_s = -600.0
        await r.fleet.start()
        await r.fleet.wait_connected()
        await r.until(lambda: sim.boot_status == "Accepted")
        # As if it had been sending its timestamps for two minutes (a lag is reported from two
        # minutes of samples on): the minute before and this one.
        now = r.cs.clock.now()
        estimate = r.cs._stations["CPA"].clock_offset
        estimate.observe(now - 60.0 - 600.0, now - 60.0)
        estimate.observe(now - 600.0, now)
        await r.until(lambda: (r.cs.clock_offset_s("CPA") or 0.0) < -599.0, 10)
        evse = r.cs.charger("cp-a").evse_id
        valid_to = r.cs.clock.now() + 3600.0
        res = await r.cs.set_limit(
            "cp-a", limit_a=6.0, valid_to=valid_to, final_limit_a=10.0, purpose="tx_default"
        )
        assert res.status == "Accepted"
        start, periods = _last_schedule(sim)
        assert start <= sim.clock.now() - 300.0  # before: our now - 300, its now + 300
        assert valid_to - 1.0 < start + periods[-1]["startPeriod"] <= valid_to
        await asyncio.sleep(0.5)
        assert sim.limit_at(evse, sim.clock.now()) == 6.0


async def test_the_final_period_begins_at_valid_to_and_a_station_ahead_is_measured() -> None:
    async with rig(connect=False) as r:
        sim = r.fleet.stations["CPA"]
        sim.clock_offset_s = 20.0
        await r.fleet.start()
        await r.fleet.wait_connected()
        r.fleet.plug_in("cp-a", EV(soc=0.3))
        await r.until(lambda: 1 in r.cs.station_state("cp-a").active_transactions, 10)
        await r.until(lambda: (r.cs.clock_offset_s("cp-a") or 0.0) > 19.0, 10)
        offset = r.cs.clock_offset_s("CPA")
        assert offset is not None and 19.0 < offset <= 20.0
        assert r.cs.clock_offset_s("CPM") is None or abs(r.cs.clock_offset_s("CPM") or 0) < 1
        valid_to = r.cs.clock.now() + 45.0
        res = await r.cs.set_limit(
            "cp-a", limit_a=0.0, valid_to=valid_to, final_limit_a=16.0, purpose="tx"
        )
        assert res.status == "Accepted"
        start, periods = _last_schedule(sim)
        assert [p["limit"] for p in periods] == [0.0, 16.0]
        assert valid_to - 1.0 < start + periods[1]["startPeriod"] <= valid_to


def test_old_timestamps_never_lower_the_estimate_and_it_outlives_a_quiet_station() -> None:
    est = ClockOffset()
    assert est.offset_s is None
    t = 1_800_000_000.0
    est.observe(t + 30.0, t)  # 30 s ahead
    est.observe(t + 30.0 - 3600.0, t + 1.0)  # an hour-old sample (transactionData, replay)
    assert est.offset_s == 30.0
    est.observe(t + 5000.0 + 29.5, t + 5000.0)  # quiet for over an hour, then a fresh one
    assert est.offset_s == 29.5
    est.observe(t + 5100.0 - 2.0, t + 5100.0)  # NTP fixed: the lead is kept for the window
    assert est.offset_s == 29.5
    est.observe(t + 5800.0 - 2.0, t + 5800.0)
    assert est.offset_s == -2.0


async def test_a_start_replayed_hours_later_is_no_lag_and_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="evcore.ocpp")
    async with rig(connect=False) as r:
        token = base64.b64encode(f"CPA:{PASSWORDS['CPA']}".encode()).decode()
        async with connect(
            f"{r.base_url}/CPA",
            subprotocols=[Subprotocol("ocpp1.6")],
            additional_headers={"Authorization": "Basic " + token},
        ) as ws:
            t0 = time.time() - 4 * 3600  # a session that started while the station was offline
            start = {"connectorId": 1, "idTag": "T", "meterStart": 1000, "timestamp": iso(t0)}
            await ws.send(json.dumps([2, "s1", "StartTransaction", start]))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                if msg[0] == 3 and msg[1] == "s1":
                    break
        # Before: -14,400 s and a WARNING "its clock runs 14400.0 s behind ... Fix its NTP."
        assert r.cs.clock_offset_s("CPA") is None
    assert not [m for m in caplog.messages if "Fix its NTP" in m]
