"""A simulated station whose clock is set mid-run (an NTP correction, an operator) keeps its
energy and its apply delay on elapsed time, not on its clock's time of day.

It counted energy, timed its MeterValues and its profiles' apply delay on its own clock: set an
hour ahead, a 22 kW car's battery and register gained 22 kWh in one 5 s step; set back ten
minutes, a profile it had accepted waited ten minutes to apply."""

from __future__ import annotations

import pytest
from evcore.ocpp.v16 import iso
from evcore.sim.chargepoint import HeldProfile, SimChargePoint, SimConnector
from evcore.sim.ev import EV
from evcore.sim.vclock import VirtualClock

START = 1_767_614_400.0  # 2026-01-05T12:00:00Z
KW = 32.0 * 230.0 * 3 / 1000.0


def _charging(clock: VirtualClock) -> tuple[SimChargePoint, SimConnector]:
    conn = SimConnector(kind="ac", max_a=32.0)
    cp = SimChargePoint(
        "cp-1", [conn], url="ws://127.0.0.1:9/ocpp/cp-1", clock=clock, tick_s=5.0, apply_delay_s=2.0
    )
    cp.plug_in(1, EV(capacity_kwh=100.0, soc=0.2))
    conn.tx_ref.id = "1"
    cp.step()
    return cp, conn


@pytest.mark.parametrize("offset_s", [3600.0, -600.0])
def test_energy_counts_elapsed_time_when_the_clock_is_set(offset_s: float) -> None:
    clock = VirtualClock(START)
    cp, conn = _charging(clock)
    reg0 = conn.register_wh
    clock.set_time(START + 5.0)
    cp.step()
    cp.clock_offset_s = offset_s
    clock.set_time(START + 10.0)
    cp.step()
    # 10 s at 22.08 kW (was 3,605 s ahead, 5 s set back).
    assert conn.register_wh - reg0 == pytest.approx(KW * 1000.0 * 10.0 / 3600.0)


def test_a_profile_applies_its_delay_after_acceptance_when_the_clock_is_set_back() -> None:
    clock = VirtualClock(START)
    cp, conn = _charging(clock)
    # The profile accepted now (as SetChargingProfile would queue it) applies 2 s later.
    cp._on_SetChargingProfile(
        {
            "connectorId": 1,
            "csChargingProfiles": {
                "chargingProfileId": 7,
                "stackLevel": 1,
                "chargingProfilePurpose": "TxDefaultProfile",
                "chargingProfileKind": "Absolute",
                "chargingSchedule": {
                    "startSchedule": iso(START - 3600.0),
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10.0}],
                },
            },
        },
        [],
    )
    cp.clock_offset_s = -600.0
    clock.set_time(START + 5.0)
    cp.step()
    assert conn.offered == 10.0  # was 32 A: due 10 minutes later by the station's clock
    assert [p.id for p in cp.profiles] == [7]
    assert isinstance(cp.profiles[0], HeldProfile)
