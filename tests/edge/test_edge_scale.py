"""Curtailment at 500 chargers, through real sockets, with the site physics watching."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from evcore.checker import node_power_kw
from evcore.edge.config import EdgeConfig
from evcore.edge.dispatch import ChangeKind
from evcore.edge.grid import Curtailment
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(180)


class _Stamped(list[Any]):
    """A station's ``received`` list that also notes when each CALL arrived (monotonic)."""

    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def append(self, item: Any) -> None:
        self.at.append(time.monotonic())
        super().append(item)


async def test_curtailment_with_500_chargers_decreases_leave_within_1s_and_hold_from_t1() -> None:
    table = depot_table(500, sample_interval_s=5)
    cfg = EdgeConfig(tick_s=1.0, curtail_lead_s=4.0, settle_s=3.0, min_on_s=0.0, min_off_s=0.0)
    rig = EdgeRig(table, cfg=cfg, sim_tick_s=0.5, apply_delay_s=0.5)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 60, "TxDefault at the failsafe level")
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 60, "sessions"
        )
        await asyncio.sleep(2.0)
        # Settled: every station confirmed its TxDefault (until then it counts at its maximum,
        # which holds the others back) and every session holds its fair share, so the
        # curtailment needs a decrease at every charger.
        states = list(ctrl.state.chargers.values())
        await rig.wait_for(
            lambda: (
                rig.tx_default_at_failsafe()
                and all(
                    c.accepted and not c.needs_resend and (c.sent or 0.0) >= 12.0 for c in states
                )
                and all(p.accepted for p in ctrl.pending.values())
            ),
            60,
            "sessions at their fair share",
        )
        for sim in rig.fleet.stations.values():
            sim.received = _Stamped()
        power: list[tuple[float, float]] = []

        async def sample_power() -> None:
            while True:
                kw = np.asarray(node_power_kw(rig.site, rig.fleet.terminal_currents()))
                power.append((rig.clock.now(), float(kw[0])))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample_power())
        n_sent = len(rig.sent)
        now = rig.clock.now()
        t1, t2, cap_kw = now + 6.0, now + 14.0, 1000.0  # 11 MW of chargers down to 1 MW
        # The limit is in force from T1 - curtail_lead_s (monotonic time of that instant).
        in_force_mono = rig.clock.monotonic() + (t1 - cfg.curtail_lead_s - now)
        ctrl.post_curtailment(Curtailment("dso-500", "grid", cap_kw, t1, t2))
        await asyncio.sleep(t2 - rig.clock.now() - 0.5)
        sampler.cancel()
        # Every TxProfile decrease of the curtailment left in one decision, and reached its
        # station within 1 s of the first.
        tx_dec = [
            s
            for s in rig.sent[n_sent:]
            if s.purpose == "tx"
            and s.kind is ChangeKind.DECREASE
            and s.left_mono >= in_force_mono - 0.05
        ]
        first_decision = min(s.decision for s in tx_dec)
        batch = [s for s in tx_dec if s.decision == first_decision]
        assert len({s.charger_id for s in batch}) == 500
        arrivals = [
            at
            for sim in rig.fleet.stations.values()
            for (action, _), at in zip(sim.received, sim.received.at, strict=True)
            if action == "SetChargingProfile"
        ]
        left = min(s.left_mono for s in batch)
        tx_arrivals = sorted(a for a in arrivals if a >= left)
        assert len(tx_arrivals) >= 500
        assert tx_arrivals[499] - left <= 1.0, tx_arrivals[499] - left
        during = [kw for t, kw in power if t >= t1]
        assert len(during) > 10
        assert max(during) <= cap_kw + 1e-6, max(during)
        assert rig.physics.violations == 0
