"""A plan is for the sessions it was made for: a new car on a charger does not inherit the last
car's targets (a deferred session's 0 A), also from a cloud plan over the real NATS server whose
rows name their transaction; and a plan that can no longer be made (nothing left to plan, or the
re-plan fails) stops being followed. Through the rig's OCPP chargers."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from bus_testkit import patient_nats_bus
from edge_testkit import planner_cfg
from evcore.bus import Subjects
from evcore.edge.grid import PricePoint
from evcore.edge.rig import EdgeRig
from evcore.edge.signals import subscribe_signals
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.v1 import plan_pb2

pytestmark = pytest.mark.timeout(150)

CFG = planner_cfg(cloud_plan_fresh_s=900.0)


async def _deferred_car(rig: EdgeRig, cid: str) -> str:
    """A car on ``cid`` the local plan defers to the cheap hours (held at 0 A); its transaction."""
    ctrl, planner = rig.controller, rig.planner
    assert ctrl is not None and planner is not None
    await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
    now = rig.clock.now()
    ctrl.post_prices([PricePoint(now - 60.0, 1.0), PricePoint(now + 3 * 3600.0, 0.05)])
    rig.fleet.plug_in(cid, EV(soc=0.2))
    await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id, 15, "session 1")
    tx1 = ctrl.state.chargers[cid].transaction_id
    assert tx1 is not None
    ctrl.set_session(cid, energy_requested_kwh=5.0, departure=now + 10 * 3600.0)
    await rig.wait_for(lambda: planner.plans >= 1, 30, "a local plan")
    await rig.wait_for(lambda: rig.limit_at(cid) == 0.0, 15, "car 1 deferred at 0 A")
    return tx1


async def _next_car(rig: EdgeRig, cid: str, tx1: str) -> None:
    ctrl = rig.controller
    assert ctrl is not None
    rig.fleet.unplug(cid)
    await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id is None, 15, "session 1 end")
    rig.fleet.plug_in(cid, EV(soc=0.1))
    await rig.wait_for(
        lambda: ctrl.state.chargers[cid].transaction_id not in (None, tx1), 15, "session 2"
    )


async def _next_car_charges_unbound(rig: EdgeRig, cid: str, tx1: str) -> None:
    """The next car on ``cid`` charges, not bound by the plan made for car 1 (``tx1``)."""
    await _next_car(rig, cid, tx1)
    core = rig.core
    assert core is not None
    await rig.wait_for(
        lambda: rig.limit_at(cid) >= 6.0 and core.last_codes.get(cid) != "plan",
        15,
        "the new car charging, not bound by car 1's plan",
    )


async def test_a_new_car_does_not_inherit_the_last_cars_plan_targets() -> None:
    rig = EdgeRig(depot_table(2, per_feeder=2), cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        cid = rig.fleet.charger_ids[0]
        tx1 = await _deferred_car(rig, cid)
        plan = ctrl.local_plan
        assert plan is not None and plan.transactions == {cid: tx1}
        planner.stop()  # no re-plan: the plan made for car 1 stays fresh and in force
        # Before: the new car was still bound by car 1's plan (code "plan": its 0 A, unless it
        # counted as behind that plan) until the plan went stale.
        await _next_car_charges_unbound(rig, cid, tx1)
        assert ctrl.local_plan is plan and ctrl.plan_in_use is plan


async def test_nothing_left_to_plan_drops_the_local_plan() -> None:
    rig = EdgeRig(depot_table(2, per_feeder=2), cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        cid = rig.fleet.charger_ids[0]
        tx1 = await _deferred_car(rig, cid)
        await _next_car(rig, cid, tx1)  # the new session has no departure: nothing to plan
        await rig.wait_for(lambda: planner.last_status == "no_sessions", 15, "a re-plan")
        await rig.wait_for(lambda: rig.limit_at(cid) >= 6.0, 15, "the new car charging")
        assert ctrl.local_plan is None and ctrl.plan_in_use is None


async def test_a_failed_re_plan_drops_the_local_plan() -> None:
    rig = EdgeRig(depot_table(2, per_feeder=2), cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        cid = rig.fleet.charger_ids[0]
        await _deferred_car(rig, cid)
        failures = planner.failures
        # A price the planner cannot use: the re-plan fails.
        ctrl.post_prices([PricePoint(rig.clock.now() - 60.0, 1e300)])
        await rig.wait_for(lambda: planner.failures > failures, 30, "the failed re-plan")
        await asyncio.sleep(0.5)
        # Before: the old plan stayed in force (0 A) until cloud_plan_fresh_s (900 s).
        assert ctrl.local_plan is None
        await rig.wait_for(lambda: rig.limit_at(cid) >= 6.0, 15, "the car charging")


async def test_a_cloud_plan_row_is_for_the_transaction_it_names(tmp_path: Path) -> None:
    site = "plan-tx-" + uuid.uuid4().hex[:8]
    rig = EdgeRig(depot_table(2, per_feeder=2, site_id=site), cfg=CFG, apply_delay_s=0.3)
    edge_bus = patient_nats_bus(site, "nats://127.0.0.1:4222", tmp_path / "edge-outbox")
    cloud_bus = patient_nats_bus(site, "nats://127.0.0.1:4222", tmp_path / "cloud-outbox")
    await edge_bus.start()
    await cloud_bus.start()
    subs: list[object] = []
    try:
        async with rig:
            ctrl, planner = rig.controller, rig.planner
            assert ctrl is not None and planner is not None
            planner.stop()  # only the cloud plans here
            subs = await subscribe_signals(edge_bus, ctrl)
            cid = rig.fleet.charger_ids[0]
            await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
            rig.fleet.plug_in(cid, EV(soc=0.2))
            await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id, 15, "session 1")
            tx1 = str(ctrl.state.chargers[cid].transaction_id)
            # The cloud defers car 1 for two hours: 0 A, for its transaction.
            now = rig.clock.now()
            plan = plan_pb2.Plan(plan_id="cloud-p", plan_version=1, source="cloud")
            plan.computed_at.FromNanoseconds(int(now * 1e9))
            for k in range(8):
                row = plan.rows.add(charger_id=cid, step_s=900.0, target_a=0.0)
                row.transaction_id = tx1
                row.step_start.FromNanoseconds(int((now - 60.0 + 900.0 * k) * 1e9))
            await cloud_bus.publish(Subjects(site).plan, plan)
            await rig.wait_for(lambda: ctrl.cloud_plan is not None, 10, "the cloud plan")
            assert ctrl.cloud_plan is not None and ctrl.cloud_plan.transactions == {cid: tx1}
            await rig.wait_for(lambda: rig.limit_at(cid) == 0.0, 15, "car 1 deferred at 0 A")
            # Car 2 on the same charger, the plan still fresh: not held to car 1's 0 A.
            await _next_car_charges_unbound(rig, cid, tx1)
            assert ctrl.plan_in_use is ctrl.cloud_plan
    finally:
        for sub in subs:
            await sub.stop()  # type: ignore[attr-defined]
        await cloud_bus.close()
        await edge_bus.close()


def test_plan_rows_of_one_charger_naming_two_transactions_are_refused() -> None:
    from evcore.bus import BadPayload
    from evcore.edge.signals import plan_from_proto

    plan = plan_pb2.Plan(plan_id="cloud-p", plan_version=1, source="cloud")
    for k, tx in enumerate(("tx-1", "tx-2")):
        row = plan.rows.add(charger_id="cp-0001", step_s=900.0, target_a=8.0, transaction_id=tx)
        row.step_start.FromSeconds(1_800_000_000 + 900 * k)
    with pytest.raises(BadPayload, match=r"rows\[1\]\.transaction_id 'tx-2'.*'tx-1'"):
        plan_from_proto(plan.SerializeToString(), 0.0, lambda cid: True)
    del plan.rows[1]
    got = plan_from_proto(plan.SerializeToString(), 0.0, lambda cid: True)
    assert got.transactions == {"cp-0001": "tx-1"} and got.applies_to("cp-0001", "tx-1")
    assert not got.applies_to("cp-0001", "tx-2")
