"""A decision that follows a plan is recorded with that plan's version, beside its trigger, the
digest of the core's inputs and the site configuration's version, on both stores: the real
controller (``build_controller`` with the Rust core) records through ``AuditRecorder`` into an
``AuditLog``; the gateway only records what is sent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from edge_testkit import settle
from evcore.audit import AuditLog, verify_chain
from evcore.clock import StepClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import PlanTargets
from evcore.edge.coreio import RustCore
from evcore.edge.recording import AuditRecorder
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store

pytestmark = pytest.mark.timeout(60)

FAST = {"tick_s": 0.5, "settle_s": 3.0, "min_on_s": 0.0, "min_off_s": 0.0}


@dataclass
class Accepted:
    accepted: bool = True


class Gateway:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def set_limit(self, charger_id: str, **kwargs: Any) -> Accepted:
        self.sent.append((charger_id, kwargs))
        return Accepted()


async def test_a_decision_following_a_plan_records_its_version(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    store = open_store(store_section, tmp_path)
    await store.open()
    clock = StepClock()
    recorder = AuditRecorder(AuditLog(store, clock=clock), store, edge_id="e1")
    table = depot_table(2, per_feeder=2, site_id="plan")
    gw = Gateway()
    ctrl = build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=gw,  # type: ignore[arg-type]
        clock=clock,
        cfg=EdgeConfig(**{**FAST, "policy": "planner_cost", "cloud_plan_fresh_s": 3600.0}),
        audit=recorder,
    )
    try:
        for c in ctrl.state.chargers.values():
            c.online = True
            ctrl.state.on_status(c.charger_id, "Charging")
            ctrl.state.on_transaction(
                c.charger_id, "started", "tx-" + c.charger_id, clock.now(), clock.monotonic()
            )
        await settle(ctrl, clock, 3)
        before = await store.audit_head()
        assert before is not None
        cid = next(iter(ctrl.state.chargers))
        now = clock.now()
        ctrl.set_plan(PlanTargets("cloud", "cloud-p1@7", now, {cid: [(now - 1.0, 7200.0, 10.0)]}))
        await settle(ctrl, clock, 3)
        await recorder.drain()
        records = await store.audit_records(after_seq=before.seq)
        followed = [r for r in records if any(sp.charger_id == cid for sp in r.setpoints)]
        assert followed, [(r.trigger, [sp.charger_id for sp in r.setpoints]) for r in records]
        rec = followed[0]
        assert rec.plan_version == 7
        sp = next(sp for sp in rec.setpoints if sp.charger_id == cid)
        assert sp.setpoint_a == pytest.approx(10.0) and sp.reason, sp
        # The other charger in a session, considered and left unchanged, says what held it.
        other = next(c for c in ctrl.state.chargers if c != cid)
        assert [sp.charger_id for sp in rec.setpoints] == [cid]
        held = {b.charger_id: b.reason for b in rec.bindings}
        assert held.get(other, "").startswith(("held at ", "paused: ")), rec.bindings
        # The edge fills inputs_digest with a SHA-256 of the core call's inputs (64 hex).
        assert rec.trigger == "test" and rec.config_version
        assert len(rec.inputs_digest) == 64 and int(rec.inputs_digest, 16) >= 0
        assert rec.edge_id == "e1"
        # Decisions before the plan followed none.
        earlier = await store.audit_records(until_s=now)
        assert earlier and all(r.plan_version == 0 for r in earlier)
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        await recorder.drain()
        await store.close()
