"""A Relative charging profile (chargingProfileKind Relative, no startSchedule) counts its periods
and its duration from the start of the transaction (OCPP 1.6 ChargingProfileKindType, 2.0.1
ChargingProfileKindEnumType), on the simulated station's own limit and in the composite schedule
it reports.

The station applied a Relative TxProfile from its transaction's start, but its composite schedule
counted the profile's periods from when the profile arrived: a profile received 100 s into the
transaction, 16 A for 600 s then 8 A until 900 s, was reported to drop 600 s from then and end
at 900 s, where the station itself dropped at 500 s and ended at 800 s."""

from __future__ import annotations

from typing import Any

import pytest
from evcore.ocpp import validation
from evcore.sim.chargepoint import SimChargePoint, SimConnector
from evcore.sim.ev import EV
from evcore.sim.vclock import VirtualClock

START = 1_767_614_400.0  # 2026-01-05T12:00:00Z: the transaction starts
RECEIVED = START + 100.0  # the profile arrives (and applies: no apply delay)
TX_ID = "7"


def _relative_call(
    version: str,
    *,
    purpose: str,
    stack: int,
    profile_id: int,
    periods: list[tuple[int, float]],
    duration: int | None = None,
    tx: bool = False,
) -> dict[str, Any]:
    """SetChargingProfile on connector/EVSE 1: a Relative profile of ``purpose`` with the given
    (startPeriod, limit) periods in A, validated against the version's schema."""
    schedule: dict[str, Any] = {} if duration is None else {"duration": duration}
    schedule |= {
        "chargingRateUnit": "A",
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": lim} for s, lim in periods],
    }
    profile: dict[str, Any] = {
        "stackLevel": stack,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Relative",
    }
    if version == "1.6":
        tx_16: dict[str, Any] = {"transactionId": int(TX_ID)} if tx else {}
        call = {
            "connectorId": 1,
            "csChargingProfiles": profile
            | {"chargingProfileId": profile_id}
            | tx_16
            | {"chargingSchedule": schedule},
        }
    else:
        tx_201: dict[str, Any] = {"transactionId": TX_ID} if tx else {}
        call = {
            "evseId": 1,
            "chargingProfile": profile
            | {"id": profile_id}
            | tx_201
            | {"chargingSchedule": [schedule | {"id": 1}]},
        }
    validation.validate(version, "SetChargingProfile", call, response=False)
    return call


def _relative_tx_profile(version: str) -> dict[str, Any]:
    """SetChargingProfile: a Relative TxProfile, 16 A from the transaction's start, 8 A from
    600 s, for 900 s (the charger's 32 A after it)."""
    return _relative_call(
        version,
        purpose="TxProfile",
        stack=1,
        profile_id=5,
        periods=[(0, 16.0), (600, 8.0)],
        duration=900,
        tx=True,
    )


def _composite(cp: SimChargePoint, version: str, duration: int = 3600) -> list[dict[str, Any]]:
    """The station's composite schedule periods on connector/EVSE 1 for ``duration`` s, request
    and response validated against the version's schema."""
    call = {"connectorId" if version == "1.6" else "evseId": 1, "duration": duration}
    validation.validate(version, "GetCompositeSchedule", call, response=False)
    res = cp._on_GetCompositeSchedule(call, [])
    validation.validate(version, "GetCompositeSchedule", res, response=True)
    sched = res["chargingSchedule"] if version == "1.6" else res["schedule"]
    periods: list[dict[str, Any]] = sched["chargingSchedulePeriod"]
    return periods


def _station(clock: VirtualClock, version: str) -> tuple[SimChargePoint, SimConnector]:
    """One 32 A AC connector station at ``clock``, 1 s steps, profiles applied at once."""
    conn = SimConnector(kind="ac", max_a=32.0)
    cp = SimChargePoint(
        "cp-1",
        [conn],
        url="ws://127.0.0.1:9/ocpp/cp-1",
        clock=clock,
        version=version,
        tick_s=1.0,
        apply_delay_s=0.0,
    )
    return cp, conn


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
def test_a_relative_profile_counts_from_the_transaction_start(version: str) -> None:
    clock = VirtualClock(START)
    cp, conn = _station(clock, version)
    cp.plug_in(1, EV(capacity_kwh=300.0, soc=0.2))
    conn.tx_ref.id = TX_ID
    clock.set_time(RECEIVED)
    answer = cp._on_SetChargingProfile(_relative_tx_profile(version), [])
    assert answer["status"] == "Accepted"
    cp.step()
    # What the station applies: 16 A, 8 A from 600 s after the transaction's start, 32 A from 900.
    for t, want_a in [(RECEIVED, 16.0), (START + 599.0, 16.0), (START + 600.0, 8.0)]:
        assert cp.limit_at(1, t) == want_a
    assert cp.limit_at(1, START + 900.0) == 32.0

    # The same, from now (100 s into the transaction).
    assert _composite(cp, version, 1000) == [
        {"startPeriod": 0, "limit": 16.0},
        {"startPeriod": 500, "limit": 8.0},  # was 600: counted from the profile's arrival
        {"startPeriod": 800, "limit": 32.0},  # was 900
    ]


def _relative_tx_default(version: str) -> dict[str, Any]:
    """SetChargingProfile: a Relative TxDefaultProfile on EVSE 1, 6 A for the first 1800 s of a
    session, 16 A after."""
    return _relative_call(
        version,
        purpose="TxDefaultProfile",
        stack=0,
        profile_id=9,
        periods=[(0, 6.0), (1800, 16.0)],
    )


@pytest.mark.parametrize("version", ["1.6", "2.0.1"])
@pytest.mark.parametrize("used_before", [True, False])
def test_a_relative_tx_default_on_an_idle_evse_counts_from_now(
    version: str, used_before: bool
) -> None:
    """With no transaction on the EVSE a Relative profile's schedule starts now, as EVerest's
    libocpp computes it (``calculate_start``: "if there isn't a session start then assume the
    session starts now"): its composite schedule shows what a car plugging in now gets. The twin
    counted it from the EVSE's last transaction's start (its ``tx_started_at`` was never
    cleared) or, on an EVSE without one, from the profile's arrival: 2000 s after either, an idle
    EVSE reported 16 A only, where the next car starts at 6 A (the edge takes an idle charger's
    composite schedule as what it enforces)."""
    clock = VirtualClock(START)
    cp, conn = _station(clock, version)
    if used_before:
        cp.plug_in(1, EV(capacity_kwh=300.0, soc=0.2))
        conn.tx_ref.id = TX_ID
        clock.set_time(START + 100.0)
        cp.unplug(1)
    else:
        assert cp._on_SetChargingProfile(_relative_tx_default(version), [])["status"] == "Accepted"
    clock.set_time(START + 2000.0)
    if used_before:
        assert cp._on_SetChargingProfile(_relative_tx_default(version), [])["status"] == "Accepted"
    cp.step()
    assert cp.limit_at(1, clock.now()) == 6.0  # was 16 A
    assert _composite(cp, version) == [
        {"startPeriod": 0, "limit": 6.0},
        {"startPeriod": 1800, "limit": 16.0},
    ]  # was [16 A from 0]
    # A car plugs in: the schedule counts from its transaction's start.
    clock.set_time(START + 2500.0)
    cp.plug_in(1, EV(capacity_kwh=300.0, soc=0.2))
    cp.step()
    assert cp.limit_at(1, START + 2500.0 + 1799.0) == 6.0
    assert cp.limit_at(1, START + 2500.0 + 1800.0) == 16.0
