"""Profiles a station holds under ids of an earlier numbering: 2.0.1 refuses ours where one of
another id has the same stack level, purpose and EVSE (K01.FR.06) or, for a TxProfile, the same
stack level and transaction (K01.FR.39); the central system asks what the station holds there
(GetChargingProfiles), and sends ours once more one stack level above every profile of another id
reported there: nothing is cleared, so the charger goes from the other profile's limit straight to
ours and never runs uncapped. Never a station maximum. 1.6 replaces it by itself.
Over real WebSockets, against simulated stations."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from edge_testkit import held_profile
from evcore.ocpp import LimitOrder, ProfileResult
from evcore.sim.chargepoint import HeldProfile, SimChargePoint
from evcore.sim.ev import EV
from ocpp_testsite import Rig, rig

pytestmark = pytest.mark.timeout(60)

OURS_TX_DEFAULT_EVSE1 = 1_000_003  # 1,000,000 + EVSE 1 x 3 + slot 0
OURS_TX_EVSE1 = 1_000_004


def held(
    sim: SimChargePoint,
    pid: int,
    purpose: str,
    limit_a: float,
    *,
    evse: int = 1,
    stack: int = 1,
    tx: str | None = None,
) -> HeldProfile:
    return held_profile(sim.clock.now(), pid, purpose, limit_a, evse=evse, stack=stack, tx=tx)


PROFILE_ACTIONS = ("SetChargingProfile", "GetChargingProfiles", "ClearChargingProfile")


def profile_calls(sim: SimChargePoint) -> list[tuple[str, dict[str, Any]]]:
    return [(a, p) for a, p in sim.received if a in PROFILE_ACTIONS]


def profile_answers(sim: SimChargePoint) -> list[tuple[str, dict[str, Any]]]:
    return [(a, p) for a, p in sim.answers if a in PROFILE_ACTIONS]


def clears(r: Rig) -> list[tuple[str, dict[str, Any]]]:
    """Every ClearChargingProfile any station received (none may be sent on a clash)."""
    return [
        (a, p)
        for sim in r.fleet.stations.values()
        for a, p in sim.received
        if a == "ClearChargingProfile"
    ]


def results(r: Rig, charger: str) -> list[ProfileResult]:
    return [e for e in r.of(ProfileResult) if e.charger_id == charger]


def stack_of(sim: SimChargePoint, pid: int) -> int:
    [level] = [q.stack for q in sim.profiles if q.id == pid]
    return level


@pytest.mark.parametrize("charger", ["cp-b", "cp-a"])
async def test_a_tx_default_held_under_an_old_id_is_outranked_by_ours(charger: str) -> None:
    async with rig() as r:
        sim = r.fleet.stations[r.cs.charger(charger).ocpp_id]
        v201 = sim.version == "2.0.1"
        # Left by a central system that numbered profiles by first use: a TxDefault (id 7) at our
        # stack level on the EVSE, one at another level and a station maximum.
        sim.hold_profile(held(sim, 7, "default", 20.0))
        sim.hold_profile(held(sim, 8, "default", 6.0, stack=0))
        sim.hold_profile(held(sim, 9, "max", 30.0, evse=0))
        res = await r.cs.set_limit(charger, limit_a=10, purpose="tx_default")
        assert res.accepted and res.profile_id == OURS_TX_DEFAULT_EVSE1
        calls, answers = profile_calls(sim), profile_answers(sim)
        assert len(results(r, charger)) == 1  # the request's one result, after the migration
        assert clears(r) == []
        if not v201:  # 1.6: ours replaces the one of the same stack level and purpose
            await r.until(
                lambda: sorted(q.id for q in sim.profiles) == [8, 9, OURS_TX_DEFAULT_EVSE1]
            )
            assert [a for a, _ in calls] == ["SetChargingProfile"]
            return
        # 2.0.1: the other id stays; ours is above it, and applies.
        await r.until(
            lambda: sorted(q.id for q in sim.profiles) == [7, 8, 9, OURS_TX_DEFAULT_EVSE1]
        )
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 10.0)
        assert stack_of(sim, OURS_TX_DEFAULT_EVSE1) == 2 and stack_of(sim, 7) == 1
        assert [a for a, _ in calls] == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "SetChargingProfile",
        ]
        assert answers[0][1]["status"] == "Rejected"
        assert answers[0][1]["statusInfo"]["reasonCode"] == "DuplicateProfile"
        # Asked by EVSE and purpose, every stack level.
        get = calls[1][1]
        assert get["evseId"] == 1
        assert get["chargingProfile"] == {"chargingProfilePurpose": "TxDefaultProfile"}
        assert [p["status"] for _, p in answers] == ["Rejected", "Accepted", "Accepted"]
        resent = calls[2][1]["chargingProfile"]
        assert resent["id"] == OURS_TX_DEFAULT_EVSE1 and resent["stackLevel"] == 2
        assert resent["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 10.0
        assert "DuplicateProfile" in res.detail and "resent at stack level 2" in res.detail
        # The next limit goes at that level at once: it replaces ours by its id, no clash.
        res = await r.cs.set_limit(charger, limit_a=8, purpose="tx_default")
        assert res.accepted and res.detail == ""
        later = profile_calls(sim)[3:]
        assert [a for a, _ in later] == ["SetChargingProfile"]
        assert later[0][1]["chargingProfile"]["stackLevel"] == 2
        [sent] = r.cs.send_limits([LimitOrder(charger, limit_a=7, purpose="tx_default")])
        assert sent.sent_mono is not None and (await sent.result).accepted  # the direct path
        assert profile_calls(sim)[4][1]["chargingProfile"]["stackLevel"] == 2
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 7.0)
        assert sorted(q.id for q in sim.profiles) == [7, 8, 9, OURS_TX_DEFAULT_EVSE1]
        assert sim.invalid_calls == []


async def test_the_charger_never_runs_above_the_other_profile_or_ours_meanwhile() -> None:
    """The reviewer's case without the edge: a car charging under another id's 16 A TxDefault;
    ours (10 A) is refused, then resent above it. Sampled every 10 ms from before the first send
    until ours applies (1 s after its acceptance), the station's limit and what it offers the car
    never exceed 16 A (a clear by id had let it run to its 32 A maximum until ours applied)."""
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        sim.hold_profile(held(sim, 7, "default", 16.0))
        r.fleet.plug_in("cp-b", EV(soc=0.3))
        await r.until(lambda: sim.connectors[1].offered == 16.0)
        sim.apply_delay_s = 1.0
        samples: list[tuple[float, float]] = []
        done = False

        async def sample() -> None:
            while not done:
                now = sim.clock.now()
                samples.append((sim.limit_at(1, now), sim.connectors[1].offered))
                await asyncio.sleep(0.01)

        sampler = asyncio.ensure_future(sample())
        try:
            res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
            assert res.accepted and "resent" in res.detail
            await r.until(lambda: sim.connectors[1].offered == 10.0)
            await asyncio.sleep(0.1)
        finally:
            done = True
            await sampler
        assert len(samples) > 50
        assert max(limit for limit, _ in samples) == 16.0
        assert max(offered for _, offered in samples) == 16.0
        assert samples[-1] == (10.0, 10.0)
        assert [a for a, _ in profile_calls(sim)].count("ClearChargingProfile") == 0


async def test_a_tx_profile_of_the_old_numbering_is_outranked_on_the_direct_path() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        r.fleet.plug_in("cp-b", EV(soc=0.3))
        await r.until(lambda: r.cs.station_state("cp-b").active_transactions.get(1) is not None)
        tx = r.cs.station_state("cp-b").active_transactions[1]
        await sim.wait_idle()
        sim.hold_profile(held(sim, 101, "tx", 16.0, tx=tx))
        [sent] = r.cs.send_limits([LimitOrder("cp-b", limit_a=12)])
        assert sent.sent_mono is not None  # written at once, then refused (K01.FR.39)
        res = await sent.result
        assert res.accepted and res.profile_id == OURS_TX_EVSE1
        assert "InvalidStackLevel" in res.detail
        await r.until(
            lambda: sorted(q.id for q in sim.profiles if q.purpose == "tx") == [101, OURS_TX_EVSE1]
        )
        assert stack_of(sim, OURS_TX_EVSE1) == 2
        calls = profile_calls(sim)
        assert [a for a, _ in calls] == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "SetChargingProfile",
        ]
        assert calls[1][1]["chargingProfile"] == {"chargingProfilePurpose": "TxProfile"}
        assert calls[2][1]["chargingProfile"]["stackLevel"] == 2
        assert calls[2][1]["chargingProfile"]["transactionId"] == tx
        assert clears(r) == []
        await r.until(lambda: sim.connectors[1].offered == 12.0)
        assert results(r, "cp-b") == [res]


async def test_the_raised_level_is_kept_across_a_reconnect() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        sim.hold_profile(held(sim, 7, "default", 20.0))
        assert (await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")).accepted
        await sim.disconnect()
        await r.until(lambda: sim.connections == 2 and r.cs.is_connected("cp-b"))
        await sim.wait_idle()
        n = len(profile_calls(sim))
        # A new connection: the level learnt on the first is used at once (the station still
        # holds 7 at the configured level): accepted, replacing ours by its id; no refusal, no
        # GetChargingProfiles, no report wait before the decrease.
        res = await r.cs.set_limit("cp-b", limit_a=9, purpose="tx_default")
        assert res.accepted and res.detail == ""
        again = profile_calls(sim)[n:]
        assert [a for a, _ in again] == ["SetChargingProfile"]
        assert again[0][1]["chargingProfile"]["stackLevel"] == 2
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 9.0)
        assert sorted(q.id for q in sim.profiles) == [7, OURS_TX_DEFAULT_EVSE1]
        # The other id gone meanwhile: ours at the raised level is still accepted alone.
        sim.profiles = [q for q in sim.profiles if q.id != 7]
        res = await r.cs.set_limit("cp-b", limit_a=8, purpose="tx_default")
        assert res.accepted and [a for a, _ in profile_calls(sim)[n + 1 :]] == [
            "SetChargingProfile"
        ]
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 8.0)


async def test_no_resend_above_the_bound_of_eight_levels() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # Another id at our level and one at 9: ours would need 10, more than 1 + 8.
        sim.hold_profile(held(sim, 7, "default", 20.0))
        sim.hold_profile(held(sim, 12, "default", 24.0, stack=9))
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert res.status == "Rejected" and "stack level 10 would be needed" in res.detail
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile", "GetChargingProfiles"]
        assert sorted(q.id for q in sim.profiles) == [7, 12]
        # One at 8 instead: ours goes to 9.
        sim.profiles = [q for q in sim.profiles if q.id != 12]
        sim.hold_profile(held(sim, 12, "default", 24.0, stack=8))
        res = await r.cs.set_limit("cp-b", limit_a=9, purpose="tx_default")
        assert res.accepted and "resent at stack level 9" in res.detail
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 9.0)
        assert stack_of(sim, OURS_TX_DEFAULT_EVSE1) == 9


async def test_a_station_refusing_for_other_reasons_is_not_looped() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # Ours was accepted: the station can hold no clashing profile, so a refusal clears nothing.
        assert (await r.cs.set_limit("cp-b", limit_a=16, purpose="tx_default")).accepted
        sim.misbehaviour.reject_profiles = True
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert res.status == "Rejected"
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile"] * 2
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # A fresh central system does not know what the station holds: ours of an earlier run
        # (our stable id, 16 A), and the station refuses everything. It is asked once; holding
        # only ours there, nothing is resent (ours stays: it was the charger's limit) and the
        # next refusals are final without asking (the key is known clear).
        sim.hold_profile(held(sim, OURS_TX_DEFAULT_EVSE1, "default", 16.0))
        sim.misbehaviour.reject_profiles = True
        first = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert first.status == "Rejected"
        assert f"{OURS_TX_DEFAULT_EVSE1} at 1; none of another id" in first.detail
        for limit in (9, 8):
            res = await r.cs.set_limit("cp-b", limit_a=limit, purpose="tx_default")
            assert res.status == "Rejected" and res.detail == ""
        actions = [a for a, _ in profile_calls(sim)]
        assert actions == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "SetChargingProfile",
            "SetChargingProfile",
        ]
        assert [x.status for x in results(r, "cp-b")] == ["Rejected"] * 3
        assert [q.id for q in sim.profiles] == [OURS_TX_DEFAULT_EVSE1]
        assert sim.limit_at(1, sim.clock.now()) == 16.0
        assert clears(r) == []
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # Holding nothing there: NoProfiles, nothing resent.
        sim.misbehaviour.reject_profiles = True
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert res.status == "Rejected" and "none of another id" in res.detail
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile", "GetChargingProfiles"]
        assert sim.answers[-1] == ("GetChargingProfiles", {"status": "NoProfiles"})


async def test_a_refused_limit_is_not_resent_once_a_newer_one_is_requested() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        sim.hold_profile(held(sim, 7, "default", 20.0))
        [older] = r.cs.send_limits([LimitOrder("cp-b", limit_a=16, purpose="tx_default")])
        [newer] = r.cs.send_limits([LimitOrder("cp-b", limit_a=8, purpose="tx_default")])
        assert older.sent_mono is not None and newer.sent_mono is None  # one CALL in flight
        first, second = await older.result, await newer.result
        # The older one's refusal is final: resent after the newer request it would have raised
        # the charger above it for a while.
        assert first.status == "Rejected" and first.detail == ""
        assert second.accepted and "resent" in second.detail
        sets = [p for a, p in profile_calls(sim) if a == "SetChargingProfile"]
        limits = [
            p["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"]
            for p in sets
        ]
        assert limits == [16.0, 8.0, 8.0]
        assert [p["chargingProfile"]["stackLevel"] for p in sets] == [1, 1, 2]
        assert [a for a, _ in profile_calls(sim)].count("ClearChargingProfile") == 0
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 8.0)
        assert [x.status for x in results(r, "cp-b")] == ["Rejected", "Accepted"]


async def test_ours_goes_above_every_other_id_of_a_report_in_parts() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # Ours of an earlier run and another id at our stack level on EVSE 1, a third at level 2
        # installed by another source: reported in two parts (one per source, the first with
        # tbc). Ours goes to 3, above both; none is cleared.
        sim.hold_profile(held(sim, OURS_TX_DEFAULT_EVSE1, "default", 16.0))
        sim.hold_profile(held(sim, 7, "default", 20.0))
        other = held(sim, 12, "default", 24.0, stack=2)
        other.limit_source = "EMS"
        sim.hold_profile(other)
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert res.accepted and "resent at stack level 3" in res.detail
        assert "7 at 1, 1000003 at 1, 12 at 2" in res.detail
        calls = profile_calls(sim)
        assert [a for a, _ in calls] == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "SetChargingProfile",
        ]
        assert calls[2][1]["chargingProfile"]["stackLevel"] == 3
        assert clears(r) == []
        await r.until(lambda: stack_of(sim, OURS_TX_DEFAULT_EVSE1) == 3)
        assert sorted(q.id for q in sim.profiles) == [7, 12, OURS_TX_DEFAULT_EVSE1]
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 10.0)
        assert sim.invalid_calls == []


async def test_a_refused_station_maximum_is_never_outranked() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # A station maximum of another id at our stack level: the refusal stands (nothing is
        # asked, nothing resent at another level, nothing cleared).
        sim.hold_profile(held(sim, 9, "max", 30.0, evse=0))
        res = await r.cs.set_limit("cp-b", limit_a=20, purpose="station_max")
        assert res.status == "Rejected"
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile"]
        assert [q.id for q in sim.profiles] == [9] and clears(r) == []


async def test_no_report_resends_nothing_after_the_call_timeout() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        sim.hold_profile(held(sim, 7, "default", 20.0))
        sim._send_report = lambda report: None  # type: ignore[method-assign]  # answers, never reports
        t0 = r.cs.clock.monotonic()
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        waited = r.cs.clock.monotonic() - t0
        assert res.status == "Rejected" and "report incomplete" in res.detail
        assert 3.0 <= waited < 5.0  # call_timeout_s of the test site
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile", "GetChargingProfiles"]
        assert [q.id for q in sim.profiles] == [7] and clears(r) == []
