"""Profiles a station holds under ids of an earlier numbering: 2.0.1 refuses ours where one of
another id has the same stack level, purpose and EVSE (K01.FR.06) or, for a TxProfile, the same
stack level and transaction (K01.FR.39); the central system asks what the station holds there
(GetChargingProfiles), clears only the profiles whose id is not ours, by id, telling its listeners
before and after, and sends ours once more. Never a station maximum. 1.6 replaces it by itself.
Over real WebSockets, against simulated stations."""

from __future__ import annotations

from typing import Any

import pytest
from evcore.ocpp import LimitOrder, ProfileCleared, ProfileClearing, ProfileResult
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
    now = sim.clock.now()
    return HeldProfile(
        id=pid,
        evse=evse,
        purpose=purpose,
        stack=stack,
        tx_id=tx,
        kind="Absolute",
        valid_from=None,
        valid_to=None,
        start=now,
        duration=None,
        unit="A",
        periods=[(0.0, limit_a, 3)],
        received_at=now,
    )


PROFILE_ACTIONS = ("SetChargingProfile", "GetChargingProfiles", "ClearChargingProfile")


def profile_calls(sim: SimChargePoint) -> list[tuple[str, dict[str, Any]]]:
    return [(a, p) for a, p in sim.received if a in PROFILE_ACTIONS]


def profile_answers(sim: SimChargePoint) -> list[tuple[str, dict[str, Any]]]:
    return [(a, p) for a, p in sim.answers if a in PROFILE_ACTIONS]


def clears(r: Rig) -> list[ProfileClearing | ProfileCleared]:
    return [e for e in r.events if isinstance(e, (ProfileClearing, ProfileCleared))]


def results(r: Rig, charger: str) -> list[ProfileResult]:
    return [e for e in r.of(ProfileResult) if e.charger_id == charger]


@pytest.mark.parametrize("charger", ["cp-b", "cp-a"])
async def test_a_tx_default_held_under_an_old_id_gives_way_to_ours(charger: str) -> None:
    async with rig() as r:
        sim = r.fleet.stations[r.cs.charger(charger).ocpp_id]
        v201 = sim.version == "2.0.1"
        # Left by a central system that numbered profiles by first use: a TxDefault (id 7) at our
        # stack level on the EVSE, one at another level and a station maximum.
        sim.hold_profile(held(sim, 7, "default", 20.0))
        sim.hold_profile(held(sim, 8, "default", 6.0, stack=0))
        sim.hold_profile(held(sim, 9, "max", 30.0, evse=0))
        # What a listener (the edge) sees when the clear is announced: the frame not yet sent.
        clears_received_at_announce: list[int] = []

        def on_event(ev: object) -> None:
            if isinstance(ev, ProfileClearing):
                n = sum(a == "ClearChargingProfile" for a, _ in sim.received)
                clears_received_at_announce.append(n)

        r.cs.add_listener(on_event)
        res = await r.cs.set_limit(charger, limit_a=10, purpose="tx_default")
        assert res.accepted and res.profile_id == OURS_TX_DEFAULT_EVSE1
        await r.until(lambda: sorted(q.id for q in sim.profiles) == [8, 9, OURS_TX_DEFAULT_EVSE1])
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 10.0)
        calls, answers = profile_calls(sim), profile_answers(sim)
        assert len(results(r, charger)) == 1  # the request's one result, after the migration
        if not v201:  # 1.6: ours replaces the one of the same stack level and purpose
            assert [a for a, _ in calls] == ["SetChargingProfile"]
            assert clears(r) == []
            return
        assert [a for a, _ in calls] == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "ClearChargingProfile",
            "SetChargingProfile",
        ]
        assert answers[0][1]["status"] == "Rejected"
        assert answers[0][1]["statusInfo"]["reasonCode"] == "DuplicateProfile"
        # Asked by EVSE, purpose and our stack level; cleared by the other id alone.
        get = calls[1][1]
        assert get["evseId"] == 1 and get["chargingProfile"] == {
            "chargingProfilePurpose": "TxDefaultProfile",
            "stackLevel": 1,
        }
        assert calls[2][1] == {"chargingProfileId": 7}
        assert [p["status"] for _, p in answers] == ["Rejected", "Accepted", "Accepted", "Accepted"]
        # The listeners were told before the clear left and after its answer, then the result.
        assert clears_received_at_announce == [0]
        [before, after] = clears(r)
        assert isinstance(before, ProfileClearing) and isinstance(after, ProfileCleared)
        assert (before.charger_id, before.purpose, before.profile_id) == (charger, "tx_default", 7)
        assert (after.profile_id, after.status, after.nothing_cleared) == (7, "Accepted", False)
        order = [
            e for e in r.events if isinstance(e, (ProfileClearing, ProfileCleared, ProfileResult))
        ]
        assert order == [before, after, res]
        resent = calls[3][1]["chargingProfile"]
        assert resent["id"] == OURS_TX_DEFAULT_EVSE1 and resent["stackLevel"] == 1
        assert resent["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 10.0
        assert "DuplicateProfile" in res.detail and "resent" in res.detail
        # The next limit replaces ours by its id: no clear any more.
        res = await r.cs.set_limit(charger, limit_a=8, purpose="tx_default")
        assert res.accepted
        assert [a for a, _ in profile_calls(sim)[4:]] == ["SetChargingProfile"]
        assert sim.invalid_calls == []


async def test_a_tx_profile_of_the_old_numbering_gives_way_on_the_direct_path() -> None:
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
        await r.until(lambda: [q.id for q in sim.profiles if q.purpose == "tx"] == [OURS_TX_EVSE1])
        calls = profile_calls(sim)
        assert [a for a, _ in calls] == [
            "SetChargingProfile",
            "GetChargingProfiles",
            "ClearChargingProfile",
            "SetChargingProfile",
        ]
        assert calls[1][1]["chargingProfile"] == {
            "chargingProfilePurpose": "TxProfile",
            "stackLevel": 1,
        }
        assert calls[2][1] == {"chargingProfileId": 101}
        assert [(type(e).__name__, e.purpose, e.profile_id) for e in clears(r)] == [
            ("ProfileClearing", "tx", 101),
            ("ProfileCleared", "tx", 101),
        ]
        await r.until(lambda: sim.connectors[1].offered == 12.0)
        assert results(r, "cp-b") == [res]


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
        # only ours there, nothing is cleared (ours stays: it was the charger's limit) and the
        # next refusals are final without asking (the key is known clear).
        sim.hold_profile(held(sim, OURS_TX_DEFAULT_EVSE1, "default", 16.0))
        sim.misbehaviour.reject_profiles = True
        first = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert first.status == "Rejected"
        assert f"{OURS_TX_DEFAULT_EVSE1}; none of another id" in first.detail
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
        # Holding nothing there: NoProfiles, nothing cleared, nothing resent.
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
        assert [a for a, _ in profile_calls(sim)].count("ClearChargingProfile") == 1
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 8.0)
        assert [x.status for x in results(r, "cp-b")] == ["Rejected", "Accepted"]


async def test_only_the_profiles_of_another_id_are_cleared_from_a_report_in_parts() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # Ours of an earlier run and two others at our stack level on EVSE 1, one installed by
        # another source: reported in two parts (one per source, the first with tbc).
        sim.hold_profile(held(sim, OURS_TX_DEFAULT_EVSE1, "default", 16.0))
        sim.hold_profile(held(sim, 7, "default", 20.0))
        other = held(sim, 12, "default", 24.0)
        other.limit_source = "EMS"
        sim.hold_profile(other)
        res = await r.cs.set_limit("cp-b", limit_a=10, purpose="tx_default")
        assert res.accepted and "resent" in res.detail
        calls = profile_calls(sim)
        assert [p for a, p in calls if a == "ClearChargingProfile"] == [
            {"chargingProfileId": 7},
            {"chargingProfileId": 12},
        ]
        assert [(type(e).__name__, e.profile_id) for e in clears(r)] == [
            ("ProfileClearing", 7),
            ("ProfileCleared", 7),
            ("ProfileClearing", 12),
            ("ProfileCleared", 12),
        ]
        await r.until(lambda: [q.id for q in sim.profiles] == [OURS_TX_DEFAULT_EVSE1])
        await r.until(lambda: sim.limit_at(1, sim.clock.now()) == 10.0)
        assert sim.invalid_calls == []


async def test_a_refused_station_maximum_is_never_cleared() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        # A station maximum of another id at our stack level: clearing it (EVSE 0) would lift
        # the cap of every EVSE of the station. The refusal stands.
        sim.hold_profile(held(sim, 9, "max", 30.0, evse=0))
        res = await r.cs.set_limit("cp-b", limit_a=20, purpose="station_max")
        assert res.status == "Rejected"
        assert [a for a, _ in profile_calls(sim)] == ["SetChargingProfile"]
        assert [q.id for q in sim.profiles] == [9] and clears(r) == []


async def test_no_report_clears_nothing_after_the_call_timeout() -> None:
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
