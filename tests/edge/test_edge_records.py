"""What the edge records, through the real loop (EdgeRig: central system, simulated stations on
real sockets, the Rust core) into the embedded store and the audit log."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from edge_testkit import FAST
from evcore.clock import WallClock
from evcore.edge.config import EdgeConfig
from evcore.edge.recording import AuditRecorder
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(120)


async def test_records_show_the_value_sent_bindings_of_unchanged_chargers_and_confirmations(
    tmp_path: Path,
) -> None:
    from evcore.audit.log import AuditLog
    from evcore.store import open_store

    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    recorder = AuditRecorder(AuditLog(store, clock=WallClock()), store)
    # Four chargers on 51.2 A: each decided 12.8 A, told 12 A (whole amperes).
    table = depot_table(4, per_feeder=2)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST, resolution_a=1.0), audit=recorder)
    async with rig:
        ctrl = rig.controller
        assert ctrl is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        for cid in rig.fleet.charger_ids[:2]:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: (
                sum(1 for c in ctrl.state.chargers.values() if c.transaction_id) == 2
                and all(c.accepted for c in ctrl.state.chargers.values())
            ),
            15,
            "two sessions, accepted TxProfiles",
        )
        await asyncio.sleep(1.0)
        for cid in rig.fleet.charger_ids[2:]:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: (
                sum(1 for c in ctrl.state.chargers.values() if c.transaction_id) == 4
                and all(c.accepted for c in ctrl.state.chargers.values())
            ),
            15,
            "all four in sessions, accepted",
        )
        # Each session's share is its charger's failsafe level (12 A told): nothing changes by
        # itself (the reclaim no longer caps a car from a reading taken before it ramped up,
        # which sent the TxProfiles this test relied on). An operator weights one session up:
        # TxProfiles go out (valid_until), in whole amperes.
        first = rig.fleet.charger_ids[0]
        ctrl.set_session(first, priority=2.0)
        await rig.wait_for(
            lambda: (
                ctrl.state.chargers[first].sent not in (None, 12.0)
                and all(c.accepted for c in ctrl.state.chargers.values())
            ),
            15,
            "the weighted session raised, accepted",
        )
        await asyncio.sleep(1.0)
    await recorder.drain()
    records = await store.audit_records()
    sps = [sp for r in records for sp in r.setpoints]
    assert any(sp.HasField("valid_until") for sp in sps)
    # Item 4: the value recorded is the one that went out (whole amperes), the decided one in
    # the reason when it differs: the failsafe level is 12.8 A, the TxDefault says 12 A.
    assert all(sp.setpoint_a == int(sp.setpoint_a) for sp in sps), [sp.setpoint_a for sp in sps]
    assert any(sp.setpoint_a == 12.0 and "decided 12.8 A, sent 12" in sp.reason for sp in sps), [
        sp.reason for sp in sps
    ]
    # Item 3: chargers considered and left unchanged carry their binding as well.
    changed = [{sp.charger_id for sp in r.setpoints} for r in records]
    unchanged = [
        b
        for r, ch in zip(records, changed, strict=True)
        for b in r.bindings
        if b.charger_id not in ch
    ]
    assert unchanged and all(b.reason for b in unchanged)
    # Item 5: confirmations reach the store.
    last = await store.last_setpoints()
    assert recorder.confirmations > 0
    assert any(rec.confirmed for rec in last.values()), last
    report = await recorder.audit_log.verify()
    assert report.ok, report.summary()
    await store.close()


async def test_edge_app_runs_telemetry_retention(tmp_path: Path) -> None:
    from evcore.edge.app import EdgeApp
    from evcore.site import load_site
    from evcore.store import open_store
    from evcore.v1.meter_pb2 import MeterSample

    clock = WallClock()
    store = open_store(
        {"kind": "embedded", "path": str(tmp_path / "store"), "telemetry_retention_s": 3600},
        tmp_path,
    )
    await store.open()
    old = MeterSample(charger_id="cp-0001", current_a=[6.0, 6.0, 6.0])
    old.sampled_at.FromSeconds(int(clock.now()) - 7200)
    fresh = MeterSample(charger_id="cp-0001", current_a=[7.0, 7.0, 7.0])
    fresh.sampled_at.FromSeconds(int(clock.now()) - 60)
    await store.append_meter_samples([old, fresh])
    await store.close()
    store = open_store(
        {"kind": "embedded", "path": str(tmp_path / "store"), "telemetry_retention_s": 3600},
        tmp_path,
    )
    table = depot_table(2, per_feeder=2)
    app = EdgeApp(load_site(table), table, clock=clock, store=store)
    runner = asyncio.ensure_future(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        for _ in range(200):
            got = await store.meter_samples("cp-0001")
            if len(got) == 1:
                break
            await asyncio.sleep(0.05)
        assert [s.current_a[0] for s in got] == [7.0]
    finally:
        app.stop()
        await asyncio.wait_for(runner, 30)


async def test_sessions_are_saved_on_start_steering_and_end_and_come_back_after_a_restart(
    tmp_path: Path,
) -> None:
    from evcore.edge.app import build_controller, charger_states
    from evcore.edge.coreio import RustCore
    from evcore.edge.recording import SessionKeeper, recover
    from evcore.ocpp.events import TransactionEvent
    from evcore.site import load_site
    from evcore.store import open_store

    section = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    table = depot_table(2, per_feeder=2)
    clock = WallClock()

    def controller() -> Any:
        return build_controller(
            table,
            core=RustCore(load_site(table), table),
            gateway=None,  # type: ignore[arg-type]  # nothing is sent in this test
            clock=clock,
        )

    def tx(kind: str) -> TransactionEvent:
        return TransactionEvent(
            charger_id="cp-0001",
            ocpp_id="CP0001",
            transaction_id="T1",
            kind=kind,  # type: ignore[arg-type]
            at=clock.now(),
            id_tag="tag",
            meter_start_wh=0.0,
            meter_now_wh=0.0,
            session_energy_wh=0.0,
        )

    ctrl = controller()
    keeper = SessionKeeper(store, clock)
    ctrl.on_session = keeper
    ctrl.on_event(tx("started"))
    departure = clock.now() + 7200
    ctrl.set_session("cp-0001", priority=3.0, departure=departure, energy_requested_kwh=25.0)
    await keeper.drain()
    (rec,) = await store.list_open_sessions()
    assert (rec.charger_id, rec.transaction_id, rec.priority) == ("cp-0001", "T1", 3.0)
    assert rec.departure_s == departure and rec.energy_requested_kwh == 25.0

    # A restart: a new controller recovers the session and what the operator set.
    state, _ = charger_states(table)
    keeper2 = SessionKeeper(store, clock)
    await recover(state, store, keeper2)
    c = state.chargers["cp-0001"]
    assert (c.transaction_id, c.priority, c.departure, c.energy_requested_kwh) == (
        "T1",
        3.0,
        departure,
        25.0,
    )

    ctrl.on_event(tx("ended"))
    await keeper.drain()
    assert await store.list_open_sessions() == []
    got = await store.get_session("cp-0001:T1")
    assert got is not None and got.ended_at_s is not None
    await store.close()
