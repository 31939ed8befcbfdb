"""Clearing a station's stale TxDefaults is recorded in the audit log before it leaves.

When a (re)connected station reports an idle charger enforcing more than its failsafe level (a
TxDefault an earlier controller left, at another id or stack level, or none), the edge clears
every TxDefault of the station (``ClearChargingProfile``) before sending its own. That changes
what its chargers may let a car draw (their maximum until ours is in force), yet no audit record
said so, while every limit the edge sends is recorded, durable before it leaves.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from edge_testkit import FAST, held_default
from evcore.audit.log import AuditLog
from evcore.clock import WallClock
from evcore.edge.config import EdgeConfig
from evcore.edge.recording import AuditRecorder
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.store import open_store

pytestmark = pytest.mark.timeout(120)


async def test_clearing_a_stations_stale_txdefaults_is_audited_before_it_leaves(
    tmp_path: Path,
) -> None:
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    recorder = AuditRecorder(AuditLog(store, clock=WallClock()), store)
    durable_at: dict[str, float] = {}

    def on_durable(record: Any) -> None:
        if "clear" in str(record["trigger"]):
            durable_at.setdefault("clear", time.monotonic())

    recorder.on_durable = on_durable
    table = depot_table(4, per_feeder=2)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST, report_wait_s=1.0), audit=recorder)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        sim, evse = rig.fleet.station("cp-0003")
        now = rig.clock.now()
        # An earlier controller's TxDefault at a higher stack level overrides ours: 32 A.
        sim.profiles.append(held_default(now, 9001, 32.0, evse=evse, stack=9))
        sim.received = []
        seen: dict[str, float] = {}

        async def watch() -> None:
            while "clear" not in seen:
                if any(a == "ClearChargingProfile" for a, _ in sim.received):
                    seen["clear"] = time.monotonic()
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        await sim.disconnect()  # the station reconnects by itself
        await rig.wait_for(
            lambda: all(p.id != 9001 for p in sim.profiles), 15, "the stale TxDefault cleared"
        )
        await asyncio.wait_for(watcher, 5)
        await rig.wait_for(rig.failsafe_applied, 15, "ours back at the failsafe level")
    await recorder.drain()
    records = await store.audit_records()
    cleared = [
        (r, sp)
        for r in records
        for sp in r.setpoints
        if sp.charger_id == "cp-0003" and "cleared" in sp.reason
    ]
    # Before: no record named the clear at all.
    assert cleared, [(r.trigger, [(s.charger_id, s.reason) for s in r.setpoints]) for r in records]
    rec, sp = cleared[0]
    assert "clear" in rec.trigger
    # What the charger may let a car draw once cleared, until ours is in force: its maximum.
    assert sp.setpoint_a == 32.0
    assert "32 A" in sp.reason, sp.reason
    # Durable before the ClearChargingProfile reached the station.
    assert durable_at["clear"] <= seen["clear"], (durable_at, seen)
    report = await recorder.audit_log.verify()
    assert report.ok, report.summary()
    await store.close()
