"""The planner in the loop, through real sockets: the edge plans locally with the core planner on
its own schedule and on events, the allocator follows the plan's targets, and a fresh cloud plan
wins over the local one (a stale one does not)."""

from __future__ import annotations

import asyncio

import pytest
from edge_testkit import planner_cfg
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import PlanTargets
from evcore.edge.grid import PricePoint
from evcore.edge.planning import PlannerConfigError, PlannerSection, schedule_rows
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.planner import (
    PlanCharger,
    Planner,
    PlanNode,
    PlanRequest,
    PlanSession,
    step_grid,
)
from evcore.sim.ev import EV

pytestmark = pytest.mark.timeout(150)

CFG = planner_cfg()


async def test_local_plan_is_followed_replanned_on_events_and_a_fresh_cloud_plan_wins() -> None:
    table = depot_table(2, per_feeder=2)
    rig = EdgeRig(table, cfg=CFG, apply_delay_s=0.3)
    async with rig:
        ctrl, planner = rig.controller, rig.planner
        assert ctrl is not None and planner is not None
        await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
        now = rig.clock.now()
        # Expensive for two hours, cheap afterwards; both cars leave in 8 h wanting 5 kWh.
        ctrl.post_prices([PricePoint(now - 60.0, 1.0), PricePoint(now + 7200.0, 0.05)])
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(c.transaction_id for c in ctrl.state.chargers.values()), 15, "sessions"
        )
        for cid in rig.fleet.charger_ids:
            ctrl.set_session(cid, energy_requested_kwh=5.0, departure=now + 8 * 3600.0)
        # The operator's change asked for a plan: mostly in the cheap hours, so the chargers
        # get the plan's target for now (at most 10.2 A, where fair share would give 12.8 A).
        await rig.wait_for(lambda: planner.plans >= 1, 30, "a local plan")
        first = ctrl.local_plan
        assert first is not None and first.source == "local"
        energy_now = sum(
            t * 3 * 230.0 * d / 3.6e6
            for rows in first.rows.values()
            for s, d, t in rows
            if s < now + 7200.0
        )
        assert energy_now < 0.25 * 10.0  # most of the 10 kWh is planned for the cheap hours
        await rig.wait_for(lambda: _follows(rig, first), 15, "the chargers following the plan")
        assert ctrl.plan_in_use is first
        # A price update (now is cheap) re-plans at once: the cars charge now.
        ctrl.post_prices([PricePoint(rig.clock.now() - 60.0, 0.01)])
        await rig.wait_for(lambda: ctrl.local_plan is not first, 30, "a re-plan on prices")
        second = ctrl.local_plan
        assert second is not None
        assert all(t >= 6.0 for t in second.targets_at(rig.clock.now()).values())
        await rig.wait_for(lambda: _follows(rig, second), 15, "the chargers following the re-plan")
        # A fresh cloud plan wins: 10 A for the first charger, 0 for the second.
        a, b = rig.fleet.charger_ids
        t = rig.clock.now()
        cloud = PlanTargets(
            "cloud", "cloud-7@1", t, {a: [(t - 10.0, 3600.0, 10.0)], b: [(t - 10.0, 3600.0, 0.0)]}
        )
        ctrl.set_plan(cloud)
        await rig.wait_for(
            lambda: rig.limit_at(a) == 10.0 and rig.limit_at(b) == 0.0, 15, "the cloud plan"
        )
        assert ctrl.plan_in_use is cloud
        # A cloud plan older than cloud_plan_fresh_s does not: the local plan is followed again.
        old = t - CFG.cloud_plan_fresh_s - 1.0
        ctrl.set_plan(PlanTargets("cloud", "cloud-7@0", old, dict(cloud.rows)))
        await rig.wait_for(
            lambda: rig.limit_at(a) > 10.0 and rig.limit_at(b) >= 6.0, 15, "the local plan again"
        )
        assert ctrl.plan_in_use is ctrl.local_plan
        assert rig.physics.violations == 0


# A target at exactly the node's share ties with the node limit: either may be named.
_PLAN_OR_NODE = ("plan", "node_phase", "node_power")


def _follows(rig: EdgeRig, plan: PlanTargets) -> bool:
    """Every charger holds what the allocator makes of the plan's target now (whole amperes,
    0 for a zero target, the 6 A minimum for a small one), bound by the plan."""
    assert rig.core is not None
    targets = plan.targets_at(rig.clock.now())
    for cid in rig.fleet.charger_ids:
        target = targets.get(cid, 0.0)
        want = 0.0 if target <= 0 else max(6.0, float(int(target + 1e-9)))
        if rig.limit_at(cid) != want or rig.core.last_codes.get(cid) not in _PLAN_OR_NODE:
            return False
    return True


def test_planner_section_names_a_bad_key() -> None:
    assert PlannerSection.from_table({"price_per_kwh": 0.3}).price_per_kwh == 0.3
    with pytest.raises(PlannerConfigError, match=r"\[planner\]\.price_per_kwhh: unknown key"):
        PlannerSection.from_table({"price_per_kwhh": 0.3})
    with pytest.raises(PlannerConfigError, match=r"\[planner\]\.horizon_h: must be a finite"):
        PlannerSection.from_table({"horizon_h": float("nan")})


async def test_no_plan_without_sessions_and_not_under_fair_share() -> None:
    table = depot_table(2, per_feeder=2)
    rig = EdgeRig(table, cfg=EdgeConfig(tick_s=0.5), apply_delay_s=0.3)
    async with rig:
        assert rig.planner is not None and not rig.planner.active
        assert await rig.planner.plan_now() is None and rig.planner.last_status == "no_sessions"
        await asyncio.sleep(0.5)
        assert rig.controller is not None and rig.controller.local_plan is None


@pytest.mark.parametrize("offset_s", [0.0004996, 0.0005002, 0.0005004, 0.0015, 0.1234565])
def test_plan_rows_are_matched_to_their_steps_whatever_the_start_fraction(offset_s: float) -> None:
    """Review of session 12: schedule rows were matched to the request's steps by rounding both
    starts to the millisecond; the core returns them in whole microseconds, so a start within
    half a microsecond of a half millisecond rounded to two different milliseconds and every
    row of the plan was dropped (the plan recorded as optimal, the allocator without targets).
    The real planner on one session; every step it plans keeps its target."""
    start = 1_733_400_000.0 + offset_s
    req = PlanRequest(
        start=start,
        step_s=step_grid(3600),
        price_per_kwh=0.1,
        nodes=[PlanNode(id="root", phase_limit_a=64)],
        chargers=[
            PlanCharger(
                id="c0",
                parent="root",
                wiring="three_phase",
                phases=["L1", "L2", "L3"],
                voltage_v=230,
                max_a=32,
            )
        ],
        sessions=[
            PlanSession(
                id="s0",
                charger_id="c0",
                arrival=start,
                departure=start + 3600,
                energy_requested_kwh=5,
            )
        ],
    )
    res = Planner().plan(req, 2.0)
    assert res.status == "optimal"
    planned = [t for t in res.schedule.to_pydict()["target_a"] if t is not None]
    rows = schedule_rows(req, res, fill=False)
    assert len(rows["c0"]) == len(planned) > 0
    starts = [s for s, _, _ in rows["c0"]]
    assert starts[0] == pytest.approx(start, abs=1e-6)
    assert sorted(t for _, _, t in rows["c0"]) == sorted(planned)
