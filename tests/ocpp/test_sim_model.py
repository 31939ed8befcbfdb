"""The simulator's models without sockets: EV, composite schedule, site physics."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from evcore.clock import ManualClock
from evcore.ocpp import validation
from evcore.ocpp.v16 import iso
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.ev import EV
from evcore.sim.physics import SitePhysics
from evcore.site import load_site

pytestmark = pytest.mark.timeout(60)


# ---- EV model -----------------------------------------------------------------------------------


def test_ev_constant_current_then_taper_then_full() -> None:
    ev = EV(capacity_kwh=50.0, soc=0.5, onboard_limit_a=16.0, taper_start_soc=0.8)
    assert ev.ac_draw_a(32.0) == 16.0  # the onboard charger limits
    assert ev.ac_draw_a(10.0) == 10.0  # the pilot limits
    assert ev.ac_draw_a(5.9) == 0.0  # below 6 A the pilot allows no charging
    ev.soc = 0.9
    assert ev.ac_draw_a(32.0) == pytest.approx(8.0)  # half-way through the taper
    ev.soc = 0.99
    assert 0.0 < ev.ac_draw_a(32.0) < 2.0
    ev.add_energy(10_000.0)
    assert ev.soc == 1.0 and ev.full and ev.ac_draw_a(32.0) == 0.0
    dc = EV(soc=0.2, max_dc_power_w=100_000.0)
    assert dc.dc_draw_w(50_000.0) == 50_000.0 and dc.dc_draw_w(200_000.0) == 100_000.0
    for bad in ({"soc": 1.5}, {"phases": 4}, {"capacity_kwh": 0}, {"taper_start_soc": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            EV(**bad)


# ---- the simulated station's composite schedule -------------------------------------------------


def station(clock: ManualClock, version: str = "1.6", **conn: Any) -> SimChargePoint:
    return SimChargePoint(
        "SIM1",
        [SimConnector(**conn)],
        url="ws://127.0.0.1:9/unused",
        clock=clock,
        version=version,
        apply_delay_s=2.0,
    )


def profile_16(
    clock: ManualClock,
    *,
    pid: int,
    purpose: str,
    limit: float,
    stack: int = 1,
    connector: int = 1,
    unit: str = "A",
    valid_to: float | None = None,
    tx: int | None = None,
) -> dict[str, Any]:
    prof: dict[str, Any] = {
        "chargingProfileId": pid,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": {
            "startSchedule": iso(clock.now()),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit, "numberPhases": 3}],
        },
    }
    if valid_to is not None:
        prof["validTo"] = iso(valid_to)
    if tx is not None:
        prof["transactionId"] = tx
    payload = {"connectorId": connector, "csChargingProfiles": prof}
    validation.validate("1.6", "SetChargingProfile", payload, response=False)
    return payload


def send(sim: SimChargePoint, payload: dict[str, Any]) -> str:
    out: str = sim._on_SetChargingProfile(payload, [])["status"]
    return out


def settle(sim: SimChargePoint, clock: ManualClock, seconds: float) -> None:
    """Advance in 0.1 s steps, as the station's ticker would."""
    for _ in range(round(seconds / 0.1)):
        clock.advance(0.1)
        sim.step()


def test_composite_stack_levels_valid_to_and_fallback_to_tx_default() -> None:
    clock = ManualClock()
    sim = station(clock)
    sim.step()
    assert sim.limit_at(1, clock.now()) == 32.0  # no profile: the hardware maximum
    assert send(sim, profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=16)) == "Accepted"
    settle(sim, clock, 1.0)
    assert sim.limit_at(1, clock.now()) == 32.0  # not applied before the station's delay
    settle(sim, clock, 1.1)
    assert sim.limit_at(1, clock.now()) == 16.0
    # A higher stack level wins while valid, then the lower one is back.
    until = clock.now() + 10.0
    p = profile_16(clock, pid=2, purpose="TxDefaultProfile", limit=10, stack=2, valid_to=until)
    assert send(sim, p) == "Accepted"
    settle(sim, clock, 2.1)
    assert sim.limit_at(1, clock.now()) == 10.0
    settle(sim, clock, 8.0)
    assert sim.limit_at(1, clock.now()) == 16.0
    # A TxProfile needs an active transaction (1.6), for this transaction.
    assert send(sim, profile_16(clock, pid=3, purpose="TxProfile", limit=20, tx=7)) == "Rejected"
    sim.plug_in(1, EV(soc=0.3))
    sim.connectors[1].tx_ref.id = "7"  # as if the StartTransaction answer arrived
    assert send(sim, profile_16(clock, pid=3, purpose="TxProfile", limit=20, tx=8)) == "Rejected"
    assert send(sim, profile_16(clock, pid=3, purpose="TxProfile", limit=20, tx=7)) == "Accepted"
    settle(sim, clock, 2.1)
    # The TxProfile overrides the TxDefault for its transaction, even upwards.
    assert sim.limit_at(1, clock.now()) == 20.0
    assert sim.terminal_a(1) == (20.0, 20.0, 20.0)
    # A station maximum caps everything; it lives on connector 0 only.
    assert send(sim, profile_16(clock, pid=4, purpose="ChargePointMaxProfile", limit=12)) == (
        "Rejected"
    )
    p = profile_16(clock, pid=4, purpose="ChargePointMaxProfile", limit=12, connector=0)
    assert send(sim, p) == "Accepted"
    settle(sim, clock, 2.1)
    assert sim.limit_at(1, clock.now()) == 12.0 and sim.terminal_a(1) == (12.0, 12.0, 12.0)
    # The composite schedule the station reports matches.
    comp = sim._on_GetCompositeSchedule({"connectorId": 1, "duration": 60}, [])
    validation.validate("1.6", "GetCompositeSchedule", comp, response=True)
    assert comp["chargingSchedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 12.0}]
    # Clearing the max and the tx profile falls back to the TxDefault.
    for pid in (3, 4):
        assert sim._on_ClearChargingProfile({"id": pid}, [])["status"] == "Accepted"
    assert sim._on_ClearChargingProfile({"id": 99}, [])["status"] == "Unknown"
    sim.step()
    assert sim.limit_at(1, clock.now()) == 16.0


def test_a_tx_profile_ends_with_its_transaction() -> None:
    clock = ManualClock()
    sim = station(clock)
    sim.step()
    assert send(sim, profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=16)) == "Accepted"
    sim.plug_in(1, EV(soc=0.3))
    sim.connectors[1].tx_ref.id = "7"
    # 1.6 allows a TxProfile without a transactionId: it is for the transaction running now.
    assert send(sim, profile_16(clock, pid=2, purpose="TxProfile", limit=10)) == "Accepted"
    settle(sim, clock, 2.1)
    assert sim.limit_at(1, clock.now()) == 10.0
    sim.unplug(1)
    assert [p.purpose for p in sim.profiles] == ["default"]
    # The next session starts at the TxDefault, not at the last session's TxProfile.
    sim.plug_in(1, EV(soc=0.3))
    sim.connectors[1].tx_ref.id = "8"
    settle(sim, clock, 0.2)
    assert sim.limit_at(1, clock.now()) == 16.0 and sim.terminal_a(1) == (16.0, 16.0, 16.0)
    # One still waiting for the station's apply delay goes too.
    assert send(sim, profile_16(clock, pid=3, purpose="TxProfile", limit=8)) == "Accepted"
    sim.unplug(1)
    sim.plug_in(1, EV(soc=0.3))
    sim.connectors[1].tx_ref.id = "9"
    settle(sim, clock, 2.1)
    assert sim.limit_at(1, clock.now()) == 16.0


def test_ignore_profiles_answers_accepted_and_applies_nothing() -> None:
    clock = ManualClock()
    sim = station(clock)
    sim.misbehaviour.ignore_profiles = True
    assert send(sim, profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=8)) == "Accepted"
    settle(sim, clock, 3.0)
    assert sim.limit_at(1, clock.now()) == 32.0
    sim.misbehaviour.ignore_profiles = False
    sim.misbehaviour.reject_profiles = True
    assert send(sim, profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=8)) == "Rejected"


def test_pilot_steps_watts_and_single_phase_car() -> None:
    clock = ManualClock()
    sim = station(clock, steps_a=(0.0, 8.0, 16.0, 24.0, 32.0))
    sim.plug_in(1, EV(soc=0.3, phases=1))
    sim.connectors[1].tx_ref.id = "1"
    # 7,360 W on three phases at 230 V is 10.67 A: this EVSE only knows 8 A steps.
    p = profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=7360.0, unit="W")
    assert send(sim, p) == "Accepted"
    settle(sim, clock, 2.1)
    c = sim.connectors[1]
    assert c.offered == 8.0
    # A single-phase car on a three-phase charger draws on the charger's L1 only.
    assert sim.terminal_a(1) == (8.0, 0.0, 0.0) and c.power_w == pytest.approx(8.0 * 230.0)
    register_at_8a = c.register_wh
    # Below the 6 A pilot minimum nothing flows.
    assert send(sim, profile_16(clock, pid=1, purpose="TxDefaultProfile", limit=5)) == "Accepted"
    settle(sim, clock, 2.1)
    assert c.offered == 0.0 and sim.terminal_a(1) == (0.0, 0.0, 0.0)
    assert c.status == "SuspendedEVSE"
    # The register grew by what flowed at 8 A until the cut, about 2 s after the request.
    grown_wh = c.register_wh - register_at_8a
    assert 8.0 * 230.0 * 1.9 / 3600.0 <= grown_wh <= 8.0 * 230.0 * 2.2 / 3600.0
    settle(sim, clock, 1.0)
    assert c.register_wh == register_at_8a + grown_wh  # nothing flows at 0 A


# ---- site physics -------------------------------------------------------------------------------


AC230 = {"voltage_v": 230.0, "max_a": 32.0}
AC208 = {"voltage_v": 208.0, "max_a": 32.0}


def eu_site() -> Any:
    return load_site(
        {
            "site": {"id": "phys"},
            "nodes": [
                {"id": "grid", "kind": "grid", "phase_limit_a": 40.0},
                {"id": "F1", "parent": "grid", "phase_limit_a": 20.0},
            ],
            "chargers": [
                {
                    "id": "a",
                    "parent": "F1",
                    "wiring": "three_phase",
                    "phases": ["L1", "L2", "L3"],
                    **AC230,
                },
                {
                    "id": "b",
                    "parent": "grid",
                    "wiring": "line_to_neutral",
                    "phases": ["L2"],
                    **AC230,
                },
            ],
        }
    )


def test_physics_counts_every_sample_over_every_node_phase_limit() -> None:
    site = eu_site()
    clock = ManualClock()
    currents = np.zeros((2, 3))
    phys = SitePhysics(site, lambda: currents, clock=clock, period_s=0.1)
    assert phys.sample() == 0
    # a: 21 A on its three phases (over F1 on every phase); b: 20 A on site L2 (grid L2 = 41 A).
    currents[0] = [21.0, 21.0, 21.0]
    currents[1] = [20.0, 0.0, 0.0]
    assert phys.sample() == 4
    assert phys.violations_by_node == {"grid": 1, "F1": 3}
    assert phys.worst_excess_a == pytest.approx(1.0)
    # Exactly at the limit is not over it.
    currents[0] = [20.0, 20.0, 20.0]
    currents[1] = [0.0, 0.0, 0.0]
    assert phys.sample() == 0
    assert phys.samples == 3 and phys.violations == 4
    assert phys.peak_a.tolist()[1] == [21.0, 21.0, 21.0]  # F1
    with pytest.raises(ValueError, match="100 ms"):
        SitePhysics(site, lambda: currents, clock=clock, period_s=0.5)


async def test_physics_samples_every_100_ms_of_simulated_time_without_averaging() -> None:
    site = eu_site()
    clock = ManualClock()
    currents = np.zeros((2, 3))
    phys = SitePhysics(site, lambda: currents, clock=clock)
    phys.start()
    try:
        for step in range(50):  # 5 s of simulated time
            # One 100 ms spike over F1's limit on one phase in the whole run.
            currents[0] = [25.0, 0.0, 0.0] if step == 20 else [10.0, 0.0, 0.0]
            for _ in range(3):
                await asyncio.sleep(0)
            clock.advance(0.1)
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        await phys.stop()
    assert phys.samples >= 50
    assert phys.violations == 1  # a 5 s average would hide it; one sample over is one violation


def test_physics_line_to_line_currents_are_phasor_sums() -> None:
    site = load_site(
        {
            "site": {"id": "na", "phase_names": ["A", "B", "C"], "voltage_ln_v": 120.0},
            "nodes": [{"id": "panel", "kind": "grid", "phase_limit_a": 17.0}],
            "chargers": [
                {
                    "id": "ab",
                    "parent": "panel",
                    "wiring": "line_to_line",
                    "phases": ["A", "B"],
                    **AC208,
                },
                {
                    "id": "ca",
                    "parent": "panel",
                    "wiring": "line_to_line",
                    "phases": ["C", "A"],
                    **AC208,
                },
            ],
        }
    )
    currents = np.array([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    phys = SitePhysics(site, lambda: currents, clock=ManualClock())
    lines = phys.line_currents()[0]
    # |I_A| = sqrt(10² + 10² + 10·10) = 17.32 A: over 17 A, though each branch carries 10 A.
    assert lines == pytest.approx([17.3205, 10.0, 10.0], abs=1e-3)
    assert phys.sample() == 1


def profile_201(
    clock: ManualClock,
    *,
    pid: int,
    purpose: str,
    limit: float,
    stack: int = 1,
    evse: int = 1,
    valid_from: float | None = None,
    valid_to: float | None = None,
    tx: str | None = None,
) -> dict[str, Any]:
    prof: dict[str, Any] = {
        "id": pid,
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [
            {
                "id": pid,
                "startSchedule": iso(clock.now()),
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit, "numberPhases": 3}],
            }
        ],
    }
    if valid_from is not None:
        prof["validFrom"] = iso(valid_from)
    if valid_to is not None:
        prof["validTo"] = iso(valid_to)
    if tx is not None:
        prof["transactionId"] = tx
    payload = {"evseId": evse, "chargingProfile": prof}
    validation.validate("2.0.1", "SetChargingProfile", payload, response=False)
    return payload


def test_2_0_1_refuses_a_clash_with_another_id_where_1_6_replaces() -> None:
    clock = ManualClock()
    sim = station(clock, version="2.0.1")
    sim.step()
    t = clock.now()
    assert send(sim, profile_201(clock, pid=7, purpose="TxDefaultProfile", limit=20)) == "Accepted"
    # Same stack level, purpose and EVSE under another id, validity overlapping: refused
    # (K01.FR.06), with a reason code; the same even before the first is applied (apply delay).
    clash = profile_201(clock, pid=8, purpose="TxDefaultProfile", limit=10)
    answer = sim._on_SetChargingProfile(clash, [])
    validation.validate("2.0.1", "SetChargingProfile", answer, response=True)
    assert answer["status"] == "Rejected"
    assert answer["statusInfo"]["reasonCode"] == "DuplicateProfile"
    settle(sim, clock, 2.1)
    assert sim.limit_at(1, clock.now()) == 20.0
    assert send(sim, clash) == "Rejected"
    # The same id replaces (K01.FR.05); another stack level, EVSE 0 or a validity that does not
    # overlap is no clash.
    assert send(sim, profile_201(clock, pid=7, purpose="TxDefaultProfile", limit=18)) == "Accepted"
    assert send(sim, profile_201(clock, pid=9, purpose="TxDefaultProfile", limit=6, stack=0)) == (
        "Accepted"
    )
    p = profile_201(clock, pid=10, purpose="TxDefaultProfile", limit=8, evse=0)
    assert send(sim, p) == "Accepted"
    kw: dict[str, Any] = {"purpose": "TxDefaultProfile", "stack": 3}
    assert send(sim, profile_201(clock, pid=11, limit=14, valid_to=t + 600, **kw)) == "Accepted"
    p = profile_201(clock, pid=12, limit=12, valid_from=t + 600, valid_to=t + 900, **kw)
    assert send(sim, p) == "Accepted"
    assert send(sim, profile_201(clock, pid=13, limit=12, valid_from=t + 300, **kw)) == "Rejected"
    settle(sim, clock, 2.1)
    assert sorted(q.id for q in sim.profiles) == [7, 9, 10, 11, 12]
    assert sim.limit_at(1, clock.now()) == 14.0  # stack level 3 for now
    assert sim.limit_at(1, t + 700) == 12.0 and sim.limit_at(1, t + 1000) == 18.0
    # Once the holder is cleared, the other id is taken.
    assert sim._on_ClearChargingProfile({"chargingProfileId": 7}, [])["status"] == "Accepted"
    assert send(sim, clash) == "Accepted"
    # TxProfiles: the same stack level and transaction under another id is refused (K01.FR.39).
    sim.plug_in(1, EV(soc=0.3))
    tx = sim.connectors[1].tx_id
    assert tx is not None
    assert send(sim, profile_201(clock, pid=20, purpose="TxProfile", limit=16, tx=tx)) == (
        "Accepted"
    )
    answer = sim._on_SetChargingProfile(
        profile_201(clock, pid=21, purpose="TxProfile", limit=12, tx=tx), []
    )
    assert answer["status"] == "Rejected"
    assert answer["statusInfo"]["reasonCode"] == "InvalidStackLevel"
    assert send(sim, profile_201(clock, pid=21, purpose="TxProfile", limit=12, tx=tx, stack=2)) == (
        "Accepted"
    )
    # 1.6 replaces a profile of the same stack level and purpose on the connector instead.
    v16 = station(clock)
    assert send(v16, profile_16(clock, pid=7, purpose="TxDefaultProfile", limit=20)) == "Accepted"
    assert send(v16, profile_16(clock, pid=8, purpose="TxDefaultProfile", limit=10)) == "Accepted"
    settle(v16, clock, 2.1)
    assert [q.id for q in v16.profiles] == [8] and v16.limit_at(1, clock.now()) == 10.0


def test_2_0_1_a_higher_stack_level_takes_over_from_another_id_without_a_gap() -> None:
    """What the central system does on a clash (docs/ocpp.md): ours one stack level above the
    other id's. The station applies the other one until ours applies (apply delay 2 s), then
    ours, at every 0.1 s step: never its 32 A maximum. Both kept; ours replaced by its id."""
    clock = ManualClock()
    sim = station(clock, version="2.0.1")
    sim.step()
    assert send(sim, profile_201(clock, pid=7, purpose="TxDefaultProfile", limit=16)) == "Accepted"
    settle(sim, clock, 2.1)
    for ours, expect in ((10.0, 10.0), (20.0, 20.0)):
        p = profile_201(clock, pid=1_000_003, purpose="TxDefaultProfile", limit=ours, stack=2)
        before = sim.limit_at(1, clock.now())
        assert send(sim, p) == "Accepted"
        seen = []
        for _ in range(25):
            clock.advance(0.1)
            sim.step()
            seen.append(sim.limit_at(1, clock.now()))
        assert set(seen) == {before, expect} and seen[-1] == expect
        assert 19 <= seen.index(expect) <= 20  # applied after 2 s
        assert sorted((q.id, q.stack) for q in sim.profiles) == [(7, 1), (1_000_003, 2)]


def test_2_0_1_reports_its_profiles_by_criteria_in_parts() -> None:
    clock = ManualClock()
    sim = station(clock, version="2.0.1")
    sim.step()
    assert send(sim, profile_201(clock, pid=7, purpose="TxDefaultProfile", limit=20)) == "Accepted"
    assert send(sim, profile_201(clock, pid=8, purpose="TxDefaultProfile", limit=6, stack=0)) == (
        "Accepted"
    )
    p = profile_201(clock, pid=9, purpose="ChargingStationMaxProfile", limit=30, evse=0)
    assert send(sim, p) == "Accepted"

    def ask(**crit: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        evse = crit.pop("evse", None)
        req: dict[str, Any] = {"requestId": 42, "chargingProfile": crit}
        if evse is not None:
            req["evseId"] = evse
        validation.validate("2.0.1", "GetChargingProfiles", req, response=False)
        after: list[Any] = []
        answer = sim._on_GetChargingProfiles(req, after)
        validation.validate("2.0.1", "GetChargingProfiles", answer, response=True)
        reports = [fn.args[0] for fn in after]
        for r in reports:
            validation.validate("2.0.1", "ReportChargingProfiles", r, response=False)
        return answer, reports

    # Not yet applied (apply delay) counts as held; filtered by EVSE, purpose and stack level.
    answer, [report] = ask(evse=1, chargingProfilePurpose="TxDefaultProfile", stackLevel=1)
    assert answer == {"status": "Accepted"}
    assert (report["requestId"], report["evseId"], report["chargingLimitSource"]) == (42, 1, "CSO")
    assert "tbc" not in report
    [prof] = report["chargingProfile"]
    assert (prof["id"], prof["stackLevel"], prof["chargingProfilePurpose"]) == (
        7,
        1,
        "TxDefaultProfile",
    )
    assert prof["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 20.0
    assert ask(evse=1, chargingProfilePurpose="TxProfile") == ({"status": "NoProfiles"}, [])
    assert ask(chargingProfileId=[5]) == ({"status": "NoProfiles"}, [])
    # Everything: one part per EVSE (and source), sorted by stack level, tbc on all but the last.
    settle(sim, clock, 2.1)
    answer, reports = ask()
    assert [(r["evseId"], r.get("tbc", False)) for r in reports] == [(0, True), (1, False)]
    assert [q["id"] for q in reports[1]["chargingProfile"]] == [8, 7]
    assert ask(chargingLimitSource=["EMS"]) == ({"status": "NoProfiles"}, [])
