"""What the edge's local planner makes of its price points and curtailments, through the rig's OCPP
chargers: a negative day-ahead price is planned (the energy goes into the paid hour), not refused
with the old plan left in force."""

from __future__ import annotations

import pytest
from edge_testkit import planner_cfg
from evcore.edge.grid import Curtailment, PricePoint
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(150)

CFG = planner_cfg()

_KW_PER_A = 3 * 230.0 / 1000.0


async def test_a_negative_price_is_planned_into_and_the_car_waits_for_it() -> None:
    rig = EdgeRig(depot_table(2, per_feeder=2), cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        now = rig.clock.now()
        cid = rig.fleet.charger_ids[0]
        rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id, 15, "a session")
        ctrl.set_session(cid, energy_requested_kwh=5.0, departure=now + 8 * 3600.0)
        await rig.wait_for(lambda: planner.plans >= 1, 30, "a local plan")
        first = ctrl.local_plan
        assert first is not None
        # Day-ahead: 0.10 now, -0.02 from +3 h (surplus wind), 0.10 again from +4 h.
        ctrl.post_prices(
            [
                PricePoint(now - 60.0, 0.10),
                PricePoint(now + 3 * 3600.0, -0.02),
                PricePoint(now + 4 * 3600.0, 0.10),
            ]
        )
        # Before: "price_per_kwh[20]: must not be negative", status failed, edge-local@1 kept.
        await rig.wait_for(lambda: ctrl.local_plan is not first, 30, "a re-plan")
        plan = ctrl.local_plan
        assert plan is not None and planner.last_status == "optimal"
        paid = sum(
            t * _KW_PER_A * d / 3600.0
            for rows in plan.rows.values()
            for s, d, t in rows
            if now + 3 * 3600.0 - 1.0 <= s < now + 4 * 3600.0
        )
        # All of it in the hour that pays: 12.8 A there (the idle charger holds the other half of
        # the 25.6 A supply at its failsafe level) take 8.8 kWh.
        assert paid >= 5.0 - 0.05
        assert plan.targets_at(rig.clock.now()) == {cid: 0.0}
        await rig.wait_for(lambda: rig.limit_at(cid) == 0.0, 15, "the car waiting for it")


async def test_a_step_is_capped_by_every_curtailment_in_it_and_priced_at_its_mean() -> None:
    rig = EdgeRig(depot_table(2, per_feeder=2), cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        now = rig.clock.now()
        cid = rig.fleet.charger_ids[0]
        rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(lambda: ctrl.state.chargers[cid].transaction_id, 15, "a session")
        ctrl.set_session(cid, energy_requested_kwh=60.0, departure=now + 10 * 3600.0)
        root = next(n.id for n in rig.site.nodes if n.parent is None)
        # Hourly steps from +4 h. A 0 kW curtailment from +5 h 10 min to +5 h 25 min lies in the
        # step [+5 h, +6 h) but not over its midpoint; the price goes from 0.30 back to 0.08 at
        # +8 h 25 min, inside the step [+8 h, +9 h).
        ctrl.post_curtailment(
            Curtailment("dso-1", root, 0.0, now + 5 * 3600 + 600, now + 5 * 3600 + 1500)
        )
        ctrl.post_prices(
            [
                PricePoint(now - 60, 0.08),
                PricePoint(now + 5 * 3600, 0.30),
                PricePoint(now + 8 * 3600 + 1500, 0.08),
            ]
        )
        req = planner.request(now)
        assert req is not None
        starts = [now + sum(req.step_s[:k]) for k in range(len(req.step_s))]
        k5 = starts.index(now + 5 * 3600.0)
        k8 = starts.index(now + 8 * 3600.0)
        assert req.step_s[k5] == req.step_s[k8] == 3600.0
        caps = req.nodes[0].power_limit_kw
        # Before: None (no cap anywhere: the midpoint +5 h 30 min is after the curtailment).
        assert caps is not None and caps[k5] < 0.01 and caps[k5 - 1] > 1000.0
        # Before: 0.08 (the price at +8 h 30 min).
        assert req.price_per_kwh[k8] == pytest.approx((0.30 * 1500 + 0.08 * 2100) / 3600)
        res = planner.planner.plan(req, 5.0)
        assert res.ok
        cols = res.schedule.to_pydict()
        hour5 = [
            a
            for s, a in zip(cols["step_start"], cols["target_a"], strict=True)
            if s.timestamp() == pytest.approx(now + 5 * 3600.0)
        ]
        assert hour5 == [pytest.approx(0.0, abs=1e-6)]  # before: 12.8 A through the curtailment
