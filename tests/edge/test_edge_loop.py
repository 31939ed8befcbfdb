"""The closed loop through real sockets: central system, simulated charge points, site physics.

Every test runs the real controller, the Rust allocator/envelope, the OCPP central system on a
loopback WebSocket and the OCPP room's simulated stations; ``SitePhysics`` counts every 100 ms
sample over a node-phase limit.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from edge_testkit import FAST
from evcore.checker import node_power_kw
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import SentProfile
from evcore.edge.dispatch import ChangeKind
from evcore.edge.grid import Curtailment
from evcore.edge.recording import AuditRecorder
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)


async def test_chargers_hold_the_failsafe_default_and_plug_ins_stay_within_limits(
    tmp_path: Path,
) -> None:
    from evcore.audit.log import AuditLog
    from evcore.store import open_store

    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    audit_log = AuditLog(store, clock=__import__("evcore.clock").clock.WallClock())
    recorder = AuditRecorder(audit_log, store)
    durable_before_send: list[bool] = []

    def check_durable(sent: SentProfile) -> None:
        # The decision's record was durable (AuditLog.append returned) when its profile leaves.
        durable_before_send.append(sent.decision in recorder.durable)

    table = depot_table(10, per_feeder=5)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), audit=recorder, on_sent=check_durable)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        # The failsafe level is the core's: all 10 at it fit the grid's 128 A per phase.
        assert sum(ctrl.failsafe.values()) <= 128.0 + 1e-6
        assert all(v >= 6.0 for v in ctrl.failsafe.values())
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 10, "sessions"
        )
        await asyncio.sleep(4.0)
        assert rig.physics.samples > 30
        assert rig.physics.violations == 0, rig.physics.violations_by_node
        drawn = rig.fleet.terminal_currents()
        assert drawn.sum() > 100.0  # the cars do charge
    await recorder.drain()
    assert durable_before_send and all(durable_before_send)
    report = await audit_log.verify()
    assert report.ok, report.summary()
    records = await store.audit_records()
    sent_chargers = {sp.charger_id for r in records for sp in r.setpoints}
    assert sent_chargers == set(rig.fleet.charger_ids)
    assert all(sp.reason for r in records for sp in r.setpoints)
    await store.close()


async def test_curtailment_decreases_first_hold_from_t1_and_release_at_t2() -> None:
    # Grid-limited depot: 12 chargers, 100 kW at the grid before the curtailment.
    table = depot_table(12, per_feeder=6, grid_share=0.6, feeder_share=0.7)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), apply_delay_s=0.5)
    power: list[tuple[float, float]] = []

    async def sample_power() -> None:
        while True:
            kw = node_power_kw(rig.site, rig.fleet.terminal_currents())
            power.append((rig.clock.now(), float(np.asarray(kw)[0])))
            await asyncio.sleep(0.1)

    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))

        def site_kw() -> float:
            return float(np.asarray(node_power_kw(rig.site, rig.fleet.terminal_currents()))[0])

        # Past the start (the cars first draw their TxDefault level), the sessions share the
        # grid. Decreases to cars still drawing less than their new limit settle by time
        # (settle_s), not by a reading, so the increases behind them may take that long.
        await asyncio.sleep(3.0)
        await rig.wait_for(lambda: site_kw() > 60.0, 12, "sessions charging above 60 kW")
        sampler = asyncio.create_task(sample_power())
        now = rig.clock.now()
        t1, t2, cap_kw = now + 4.0, now + 10.0, 30.0
        n_sent = len(rig.sent)
        ctrl.post_curtailment(Curtailment("dso-1", "grid", cap_kw, t1, t2))
        await asyncio.sleep(t2 - rig.clock.now() + 6.0)
        sampler.cancel()
        during = [kw for t, kw in power if t1 <= t < t2]
        after = [kw for t, kw in power if t > t2 + 4.0]
        assert during and max(during) <= cap_kw + 1e-6, max(during)
        assert after and max(after) > cap_kw + 10.0  # released at T2
        # The curtailment's decreases left before T1 and before any increase.
        new = rig.sent[n_sent:]
        first_increase = next(i for i, s in enumerate(new) if s.kind is ChangeKind.INCREASE)
        decreases = [s for s in new[:first_increase] if s.kind is ChangeKind.DECREASE]
        assert len({s.charger_id for s in decreases if s.purpose == "tx_default"}) == 12
        assert all(s.kind is not ChangeKind.INCREASE for s in new[:first_increase])
        assert rig.physics.violations == 0
