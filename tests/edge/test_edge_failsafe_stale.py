"""The failsafe when a charger may not obey our TxDefault, through real sockets.

The failsafe levels assume every charger falls back to the TxDefault the edge gave it. A charger
that has not accepted one (it rejects profiles, it just booted, its stale profiles were just
cleared) may hold anything: the others' levels are sized with it at its maximum. And TxDefaults an
earlier controller left on a station (any id or stack level, which would override ours) are cleared
when the station connects, before ours is sent.
"""

from __future__ import annotations

from typing import Any

import pytest
from edge_testkit import FAST as BASE_FAST
from edge_testkit import held_default
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table

pytestmark = pytest.mark.timeout(120)

FAST: dict[str, Any] = BASE_FAST | {"report_wait_s": 1.0}


async def test_a_charger_without_a_confirmed_txdefault_counts_at_its_maximum_in_the_failsafe() -> (
    None
):
    # F1 (32 A per phase): cp-0001, cp-0002; F2: cp-0003, cp-0004; grid 51.2 A per phase.
    table = depot_table(4, per_feeder=2)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST))
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        normal = dict(ctrl.failsafe)
        assert all(v > 6.0 for v in normal.values()), normal
        # cp-0001's station reboots, loses its profiles, and from now on refuses every profile:
        # its TxDefault is never confirmed again, so it may let a car draw its maximum (32 A).
        sim, _ = rig.fleet.station("cp-0001")
        sim.misbehaviour.lose_profiles_on_reboot = True
        sim.misbehaviour.reject_profiles = True
        await sim.reboot()
        await rig.wait_for(
            lambda: ctrl.failsafe.get("cp-0002", 1.0) == 0.0, 15, "F1's other charger at 0 A"
        )
        fs = ctrl.failsafe
        # With cp-0001 at 32 A: F1 has nothing left, the grid 51.2 - 32 = 19.2 A.
        assert fs["cp-0002"] == 0.0
        assert fs["cp-0003"] + fs["cp-0004"] <= 51.2 - 32.0 + 1e-6
        assert fs["cp-0003"] > 0.0
        # The others were told so on the wire.
        await rig.wait_for(
            lambda: all(rig.limit_at(c) <= fs[c] + 1e-9 for c in ("cp-0002", "cp-0003", "cp-0004")),
            10,
            "the others' TxDefaults lowered",
        )
        # It accepts profiles again: confirmed, the levels go back to the normal ones.
        sim.misbehaviour.reject_profiles = False
        await rig.wait_for(
            lambda: ctrl.failsafe == normal and rig.tx_default_at_failsafe(),
            20,
            "the normal levels, confirmed everywhere",
        )
        assert rig.physics.violations == 0


async def test_txdefaults_an_earlier_controller_left_are_cleared_when_a_station_connects() -> None:
    table = depot_table(4, per_feeder=2)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST))
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        sim, evse = rig.fleet.station("cp-0003")
        now = rig.clock.now()
        # An earlier controller's TxDefault at a higher stack level overrides ours: 32 A.
        sim.profiles.append(held_default(now, 9001, 32.0, evse=evse, stack=9))
        assert rig.limit_at("cp-0003") == 32.0
        await sim.disconnect()  # the station reconnects by itself
        await rig.wait_for(
            lambda: all(p.id != 9001 for p in sim.profiles),
            15,
            "the stale TxDefault cleared",
        )
        await rig.wait_for(
            lambda: (
                rig.failsafe_applied() and rig.limit_at("cp-0003") == ctrl.failsafe["cp-0003"] // 1
            ),
            15,
            "ours back at the failsafe level, in force at the station",
        )
        assert any(a == "ClearChargingProfile" for a, _ in sim.received)
        assert rig.physics.violations == 0
