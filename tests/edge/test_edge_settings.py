"""Restart and reconnect waits as ``[edge]`` settings: parsed, validated, and used by the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from evcore.clock import ManualClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig, EdgeConfigError
from evcore.edge.coreio import RustCore
from evcore.edge.sitegen import depot_table
from evcore.site import load_site


def test_defaults_are_unchanged() -> None:
    cfg = EdgeConfig.from_table({})
    assert cfg.startup_grace_s == 10.0
    assert cfg.report_wait_s == 5.0


def test_the_waits_come_from_the_site_file() -> None:
    table = depot_table(2, edge={"startup_grace_s": 3, "report_wait_s": 1.5})
    cfg = EdgeConfig.from_site(table)
    assert cfg.startup_grace_s == 3.0
    assert cfg.report_wait_s == 1.5
    assert EdgeConfig.from_table({"startup_grace_s": 0}).startup_grace_s == 0.0


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("report_wait_s", 0, "must be a number > 0, got 0"),
        ("report_wait_s", -1.0, "must be a number > 0, got -1.0"),
        ("startup_grace_s", -2, "must be a number >= 0, got -2"),
        ("startup_grace_s", float("nan"), "must be a number >= 0, got nan"),
        ("startup_grace_s", "10", "must be a number >= 0, got '10'"),
        ("report_wait_s", True, "must be a number > 0, got True"),
    ],
)
def test_bad_values_are_refused_naming_the_key(key: str, value: Any, why: str) -> None:
    with pytest.raises(EdgeConfigError, match=rf"\[edge\]\.{key} {why}"):
        EdgeConfig.from_table({key: value})


class _SilentStation:
    """A gateway whose stations never answer the reconnect report."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.never = asyncio.Event()

    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        raise AssertionError("nothing is sent in this test")

    async def get_composite_schedule(self, charger_id: str, **kwargs: Any) -> Any:
        self.asked.append(charger_id)
        await self.never.wait()

    async def trigger_message(self, target: str, message: str) -> Any:
        await self.never.wait()


def _controller(clock: ManualClock, cfg: EdgeConfig) -> Any:
    """A controller of a two-charger depot on ``clock`` whose stations never answer."""
    table = depot_table(2, per_feeder=2)
    return build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=_SilentStation(),  # type: ignore[arg-type]
        clock=clock,
        cfg=cfg,
    )


async def test_a_reconnect_holds_resends_for_report_wait_s_and_bounds_the_report() -> None:
    from evcore.clock import WallClock
    from evcore.ocpp.events import ConnectionEvent

    table = depot_table(2, per_feeder=2)
    cid = "cp-0001"
    # On the injected clock: re-sends to the station's chargers wait report_wait_s.
    clock = ManualClock()
    ctrl = _controller(clock, EdgeConfig(report_wait_s=7.5))
    ocpp_id = ctrl.state.chargers[cid].ocpp_id
    ctrl.on_event(ConnectionEvent(ocpp_id, True, "1.6", clock.now()))
    assert ctrl._report_due[cid] == pytest.approx(clock.monotonic() + 7.5)
    for t in list(ctrl._sends):
        t.cancel()
    await asyncio.gather(*ctrl._sends, return_exceptions=True)
    # The report call is bounded by the same setting: a station that never answers is given up
    # after it (and no longer waited for).
    gw = _SilentStation()
    ctrl = build_controller(
        table,
        core=RustCore(load_site(table), table),
        gateway=gw,  # type: ignore[arg-type]
        clock=WallClock(),
        cfg=EdgeConfig(report_wait_s=0.2),
    )
    ctrl.on_event(ConnectionEvent(ocpp_id, True, "1.6", 0.0))
    report = next(iter(ctrl._sends))
    await asyncio.wait_for(asyncio.shield(report), 10)
    assert gw.asked == [cid] and cid not in ctrl._report_due


def test_a_local_plan_stays_in_force_until_the_next_re_plan() -> None:
    """Re-plans further apart than ``cloud_plan_fresh_s``: the local plan is followed until the
    next one replaces it, not dropped after ``cloud_plan_fresh_s`` (the allocator then ran alone
    for the rest of every re-plan period); a cloud plan keeps its own bound."""
    from evcore.edge.controller import PlanTargets

    clock = ManualClock()
    ctrl = _controller(
        clock, EdgeConfig(policy="planner_cost", replan_every_s=1200.0, cloud_plan_fresh_s=900.0)
    )
    cid = "cp-0001"
    t0 = clock.now()
    rows = {cid: [(t0, 7200.0, 10.0)]}
    ctrl.local_plan = PlanTargets("local", "edge-local@1", t0, rows)
    assert ctrl.local_plan_fresh_s() == 2400.0
    # 1000 s on: older than cloud_plan_fresh_s, before the next re-plan is even due.
    assert ctrl._targets(t0 + 1000.0) is not None and ctrl.plan_in_use is ctrl.local_plan
    # Past two re-plan periods without a new plan (a planner that stopped): not followed.
    assert ctrl._targets(t0 + 2500.0) is None and ctrl.plan_in_use is None
    # A cloud plan of the same age is not followed past its own bound.
    ctrl.local_plan = None
    ctrl.cloud_plan = PlanTargets("cloud", "c@1", t0, rows)
    assert ctrl._targets(t0 + 800.0) is not None
    assert ctrl._targets(t0 + 1000.0) is None
    # Defaults unchanged: re-plans every 300 s, plans fresh for 900 s.
    assert EdgeConfig().replan_every_s * 2 <= EdgeConfig().cloud_plan_fresh_s


def test_a_dc_resolution_coarser_than_whole_watts_is_refused() -> None:
    """The central system sends DC limits in whole watts. A coarser ``[edge].resolution_w`` makes
    the dispatch hold back a decrease smaller than it, leaving the charger above the envelope's
    setpoint: refused at load time, as a coarser ``resolution_a`` is."""
    from evcore.edge.dispatch import plan_dispatch

    with pytest.raises(EdgeConfigError, match=r"\[edge\]\.resolution_w: 100\.0 is coarser"):
        EdgeConfig.from_site({"edge": {"resolution_w": 100.0}})
    assert EdgeConfig.from_site({"edge": {"resolution_w": 0.5}}).resolution_w == 0.5
    assert EdgeConfig.from_site({"edge": {}}).resolution_w == 1.0
    # Why: a 60 W decrease at 100 W resolution is no change at all; at 1 W it leaves.
    args: dict[str, Any] = {
        "dc_ids": {"dc1"},
        "deadband_a": 0.0,
        "deadband_w": 0.0,
        "now_s": 0.0,
        "settle_s": 1.0,
    }
    coarse = plan_dispatch({"dc1": 50_030.0}, {"dc1": 50_090.0}, resolution_w=100.0, **args)
    fine = plan_dispatch({"dc1": 50_030.0}, {"dc1": 50_090.0}, resolution_w=1.0, **args)
    assert not coarse.decreases and [c.new for c in fine.decreases] == [50_030.0]
