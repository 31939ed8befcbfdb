"""Smart charging and commands through the per-station queue, against simulated stations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.ocpp import MeterSample, ProfileResult
from evcore.ocpp.metering import parse_timestamp
from evcore.sim.chargepoint import SimChargePoint
from evcore.sim.ev import EV
from ocpp_testsite import DC_CHARGER, rig

pytestmark = pytest.mark.timeout(60)


def sent_profiles(sim: SimChargePoint, action: str = "SetChargingProfile") -> list[dict[str, Any]]:
    return [p for a, p in sim.received if a == action]


@pytest.mark.parametrize("charger", ["cp-a", "cp-b"])
async def test_limits_reach_the_charger_as_the_right_profile(charger: str) -> None:
    async with rig() as r:
        sid = r.cs.charger(charger).ocpp_id
        sim = r.fleet.stations[sid]
        v16 = sim.version == "1.6"
        # No transaction yet: a TxProfile is not sent at all.
        res = await r.cs.set_limit(charger, limit_a=10)
        assert res.status == "NoTransaction" and not res.accepted
        assert sent_profiles(sim) == []
        # TxDefault: whole amperes, rounded DOWN; three phases.
        res = await r.cs.set_limit(charger, limit_a=16.9, purpose="tx_default")
        assert res.accepted and res.limit_a == 16.0
        prof = sent_profiles(sim)[-1]
        body = prof["csChargingProfiles"] if v16 else prof["chargingProfile"]
        sched = body["chargingSchedule"] if v16 else body["chargingSchedule"][0]
        assert body["chargingProfilePurpose"] == "TxDefaultProfile"
        assert (prof["connectorId"] if v16 else prof["evseId"]) == 1
        assert sched["chargingRateUnit"] == "A" and "startSchedule" in sched
        assert sched["chargingSchedulePeriod"] == [
            {"startPeriod": 0, "limit": 16.0, "numberPhases": 3}
        ]
        r.fleet.plug_in(charger, EV(soc=0.3))
        await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is not None)
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 16.0)  # after the apply delay
        # TxProfile for the active transaction, and a station-wide max.
        res = await r.cs.set_limit(charger, limit_a=12)
        assert res.accepted
        body = sent_profiles(sim)[-1]["csChargingProfiles" if v16 else "chargingProfile"]
        assert body["chargingProfilePurpose"] == "TxProfile"
        assert str(body["transactionId"]) == r.cs.station_state(charger).active_transactions[1]
        res = await r.cs.set_limit(charger, limit_a=8, purpose="station_max")
        assert res.accepted
        last = sent_profiles(sim)[-1]
        assert (last["connectorId"] if v16 else last["evseId"]) == 0
        assert last["csChargingProfiles" if v16 else "chargingProfile"][
            "chargingProfilePurpose"
        ] == ("ChargePointMaxProfile" if v16 else "ChargingStationMaxProfile")
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 8.0)
        comp = await r.cs.get_composite_schedule(charger, duration_s=600)
        assert comp.status == "Accepted" and comp.limit_at(r.cs.clock.now()) == 8.0
        # Clearing the max lets the TxProfile (12 A) rule again.
        cleared = await r.cs.clear_profile(charger, purpose="station_max")
        assert cleared.ok
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 12.0)
        # validTo with a final level: the charger falls back by itself when it expires.
        now = r.cs.clock.now()
        res = await r.cs.set_limit(charger, limit_a=20, valid_to=now + 2.0, final_limit_a=6)
        assert res.accepted
        body = sent_profiles(sim)[-1]["csChargingProfiles" if v16 else "chargingProfile"]
        sched = body["chargingSchedule"] if v16 else body["chargingSchedule"][0]
        periods = sched["chargingSchedulePeriod"]
        assert [p["limit"] for p in periods] == [20.0, 6.0]
        # The schedule starts max_clock_skew_s (300 s) back; the final period at validTo.
        start = parse_timestamp(sched["startSchedule"])
        assert now - 301.0 < start <= now - 300.0
        assert now + 1.0 < start + periods[1]["startPeriod"] <= now + 2.0
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 20.0)
        await r.until(lambda: sim.connectors[1].terminal_a[0] == 6.0, 5)
        results = [e for e in r.events if isinstance(e, ProfileResult)]
        assert [x.status for x in results][:2] == ["NoTransaction", "Accepted"]
        assert sim.invalid_calls == []


async def test_single_phase_charger_sends_one_phase_and_bad_requests_are_refused() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPC"]
        res = await r.cs.set_limit("cp-c", limit_a=13.5, purpose="tx_default")
        assert res.accepted
        sched = sent_profiles(sim)[-1]["chargingProfile"]["chargingSchedule"][0]
        assert sched["chargingSchedulePeriod"] == [
            {"startPeriod": 0, "limit": 13.0, "numberPhases": 1}
        ]
        with pytest.raises(ValueError, match="exactly one"):
            await r.cs.set_limit("cp-c", limit_a=10, limit_w=1000)
        with pytest.raises(ValueError, match="final limit needs valid_to"):
            await r.cs.set_limit("cp-c", limit_a=10, final_limit_a=6)
        with pytest.raises(ValueError, match=">= 0"):
            await r.cs.set_limit("cp-c", limit_a=-1)
        with pytest.raises(KeyError, match="unknown charger"):
            await r.cs.set_limit("nope", limit_a=10)


async def test_dc_charger_gets_watts_and_its_car_follows() -> None:
    async with rig(extra_chargers=[DC_CHARGER]) as r:
        sim = r.fleet.stations["CPD"]
        with pytest.raises(ValueError, match="DC charger; give limit_w"):
            await r.cs.set_limit("cp-d", limit_a=20)
        r.fleet.plug_in("cp-d", EV(soc=0.3))
        await r.until(lambda: r.cs.station_state("cp-d").active_transactions.get(1) is not None)
        res = await r.cs.set_limit("cp-d", limit_w=22_222.7)
        assert res.accepted and res.limit_w == 22_222.0 and res.limit_a is None
        sched = sent_profiles(sim)[-1]["chargingProfile"]["chargingSchedule"][0]
        assert sched["chargingRateUnit"] == "W"
        assert sched["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 22_222.0}]
        c = sim.connectors[1]
        await r.until(lambda: c.offered == 22_222.0)
        # The car takes the DC power; the grid sees it through the rectifier on three phases.
        await r.until(lambda: c.power_w == pytest.approx(22_222.0 / 0.95 + 200.0))
        assert c.terminal_a[0] == pytest.approx(c.power_w / (3 * 230.0))
        # The station reports its grid side (location Inlet): the central system sees the same.
        await r.until(
            lambda: any(
                s.charger_id == "cp-d" and s.power_w and s.power_w > 20_000
                for s in r.of(MeterSample)
            )
        )
        seen = [s for s in r.of(MeterSample) if s.charger_id == "cp-d" and s.power_w][-1]
        assert seen.power_w is not None
        line = seen.power_w / (3 * 230.0)
        assert seen.site_phase_a == pytest.approx((line, line, line), rel=1e-3)
        comp = await r.cs.get_composite_schedule("cp-d", duration_s=60)
        assert comp.unit == "W" and comp.limit_at(r.cs.clock.now()) == 22_222.0
        assert sim.invalid_calls == []


async def test_valid_to_and_decimal_amperes() -> None:
    async with rig(whole_amperes=False) as r:
        for charger in ("cp-a", "cp-b"):
            sim = r.fleet.stations[r.cs.charger(charger).ocpp_id]
            v16 = sim.version == "1.6"
            now = r.cs.clock.now()
            res = await r.cs.set_limit(
                charger, limit_a=12.97, purpose="tx_default", valid_to=now + 1.5
            )
            assert res.accepted and res.limit_a == 12.9  # 0.1 A, rounded down
            body = sent_profiles(sim)[-1]["csChargingProfiles" if v16 else "chargingProfile"]
            sched = body["chargingSchedule"] if v16 else body["chargingSchedule"][0]
            assert sched["chargingSchedulePeriod"] == [
                {"startPeriod": 0, "limit": 12.9, "numberPhases": 3}
            ]
            assert body["validTo"].endswith("Z")
            # Held while valid, then gone: the station is back at its own maximum.
            await r.until(lambda s=sim: s.limit_at(1, r.cs.clock.now()) == 12.9)  # type: ignore[misc]
            await r.until(lambda s=sim: s.limit_at(1, r.cs.clock.now()) == 32.0, 5)  # type: ignore[misc]
            assert sim.invalid_calls == []


async def test_queue_sends_decreases_first_and_drops_superseded_limits() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPM"]  # one station, two EVSEs, one queue
        for cid in ("cp-m1", "cp-m2"):
            assert (await r.cs.set_limit(cid, limit_a=16, purpose="tx_default")).accepted
        sim.misbehaviour.gated_actions = {"SetChargingProfile"}
        sim.misbehaviour.answer_gate.clear()
        before = len(sent_profiles(sim))
        blocker = asyncio.create_task(r.cs.set_limit("cp-m1", limit_a=14, purpose="tx_default"))
        await r.until(lambda: len(sent_profiles(sim)) == before + 1)  # in flight, unanswered
        up1 = asyncio.create_task(r.cs.set_limit("cp-m2", limit_a=20, purpose="tx_default"))
        await asyncio.sleep(0.05)
        up2 = asyncio.create_task(r.cs.set_limit("cp-m2", limit_a=24, purpose="tx_default"))
        await asyncio.sleep(0.05)
        down = asyncio.create_task(r.cs.set_limit("cp-m1", limit_a=6, purpose="tx_default"))
        await asyncio.sleep(0.05)
        assert r.cs.station_state("CPM").queued_calls == 2  # up1 was superseded by up2
        assert (await up1).status == "Superseded"
        sim.misbehaviour.answer_gate.set()
        results = await asyncio.gather(blocker, up2, down)
        assert [x.status for x in results] == ["Accepted"] * 3
        order = [
            (
                p["connectorId"],
                p["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"],
            )
            for p in sent_profiles(sim)[before:]
        ]
        assert order == [(1, 14.0), (1, 6.0), (2, 24.0)]  # the decrease overtook the increase


async def test_timeouts_bounded_queue_and_disconnect() -> None:
    async with rig(call_timeout_s=0.5, queue_bound=2) as r:
        sim = r.fleet.stations["CPM"]
        sim.misbehaviour.unanswered_actions = {"SetChargingProfile"}
        t0 = asyncio.get_running_loop().time()
        res = await r.cs.set_limit("cp-m1", limit_a=10, purpose="tx_default")
        assert res.status == "Timeout"
        # Not before call_timeout_s (an upper bound would be a timed assertion: load delays it).
        assert asyncio.get_running_loop().time() - t0 >= 0.45
        # The queue moves on after a timeout; with the bound reached, new requests are refused.
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(r.cs.set_limit("cp-m1", limit_a=8 + i, purpose="tx_default"))
            for i in range(1)
        ]
        await asyncio.sleep(0.05)  # one in flight
        tasks += [asyncio.create_task(r.cs.reset("CPM")), asyncio.create_task(r.cs.reset("CPM"))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(r.cs.reset("CPM")))
        done = await asyncio.gather(*tasks)
        statuses = [d.status for d in done]
        assert statuses[0] == "Timeout" and statuses[-1] == "QueueFull"
        # Offline stations: nothing is queued, the caller learns it at once.
        await sim.go_offline(30)
        await r.until(lambda: "CPM" not in r.cs.connected())
        res = await r.cs.set_limit("cp-m1", limit_a=10, purpose="tx_default")
        assert res.status == "NotConnected"


@pytest.mark.parametrize("charger", ["cp-a", "cp-b"])
async def test_commands_both_versions(charger: str) -> None:
    async with rig() as r:
        sid = r.cs.charger(charger).ocpp_id
        sim = r.fleet.stations[sid]
        v16 = sim.version == "1.6"
        res = await r.cs.remote_start(charger, "TAG-1")
        assert res.ok and res.action == (
            "RemoteStartTransaction" if v16 else "RequestStartTransaction"
        )
        await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is not None)
        res = await r.cs.trigger_message(charger, "MeterValues")
        assert res.ok
        res = await r.cs.remote_stop(charger)
        assert res.ok
        await r.until(lambda: not r.cs.station_state(charger).active_transactions)
        assert (await r.cs.remote_stop(charger)).status == "NoTransaction"
        res = await r.cs.change_availability(charger, operative=False)
        assert res.ok and not sim.connectors[1].available
        assert (await r.cs.change_availability(charger, operative=True)).ok
        assert (await r.cs.unlock_connector(charger)).ok
        if v16:
            got = await r.cs.get_configuration(sid, ["MeterValueSampleInterval", "Nope"])
            assert got.payload is not None
            assert got.payload["configurationKey"][0]["value"] == "1"
            assert got.payload["unknownKey"] == ["Nope"]
            changed = await r.cs.change_configuration(sid, "HeartbeatInterval", "60")
            assert changed.ok and sim.config["HeartbeatInterval"] == "60"
            wrong = await r.cs.get_variables(sid, [("X", "Y")])
            assert wrong.status == "NotSupported"
            assert (
                wrong.detail == f"GetVariables exists only in OCPP 2.0.1; station {sid} speaks 1.6"
            )
        else:
            got = await r.cs.get_variables(sid, [("SampledDataCtrlr", "TxUpdatedInterval")])
            assert got.payload is not None
            assert got.payload["getVariableResult"][0]["attributeValue"] == "1"
            res = await r.cs.set_variables(sid, [("SampledDataCtrlr", "TxUpdatedInterval", "5")])
            assert res.status == "Result" and sim.sample_interval_s == 5.0
            wrong = await r.cs.get_configuration(sid)
            assert wrong.status == "NotSupported"
            assert (
                wrong.detail
                == f"GetConfiguration exists only in OCPP 1.6; station {sid} speaks 2.0.1"
            )
        boots = sim.connections
        res = await r.cs.reset(sid, hard=True)
        assert res.ok
        await r.until(lambda: sim.connections == boots + 1 and sim.boot_status == "Accepted")
        assert sim.invalid_calls == []


async def test_profiles_lost_on_reboot_are_visible_in_the_composite_schedule() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPA"]
        sim.misbehaviour.lose_profiles_on_reboot = True
        assert (await r.cs.set_limit("cp-a", limit_a=10, purpose="tx_default")).accepted
        await r.until(lambda: bool(sim.profiles))
        before = await r.cs.get_composite_schedule("cp-a", duration_s=60)
        assert before.limit_at(r.cs.clock.now()) == 10.0
        await sim.reboot()
        await r.until(lambda: sim.connections == 2 and sim.boot_status == "Accepted")
        await r.until(lambda: "CPA" in r.cs.connected())
        after = await r.cs.get_composite_schedule("cp-a", duration_s=60)
        assert after.limit_at(r.cs.clock.now()) == 32.0  # back at the hardware maximum
