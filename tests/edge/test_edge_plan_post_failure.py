"""A local plan that cannot be turned into targets is a failed plan, not the end of the edge.

``LocalPlanner.plan_now`` dropped the plan on a failed, infeasible or late solve, but the step
after the solve (the schedule to rows, the spare-room fill, no pauses after a session's first
charging step) was not guarded: anything it raised (a schedule of another core version, a bug
in the fill) ended the planner's task, and with it the edge's task group: the control loop,
the central system and the API stopped with it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from edge_testkit import AcceptingGateway, planner_cfg, stepped_controller
from evcore.edge.controller import PlanTargets
from evcore.edge.planning import LocalPlanner
from evcore.edge.sitegen import depot_table
from evcore.site import load_site


class _Result:
    """An optimal result whose schedule lacks the columns the edge reads (another version)."""

    status = "optimal"
    ok = True

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {"status": "optimal", "peak_kw": 10.0}
        self.schedule = pa.RecordBatch.from_pydict({"charger": ["cp-0001"], "start_s": [0.0]})


class _Planner:
    def plan(self, req: Any, budget_s: float) -> _Result:
        return _Result()


async def test_a_plan_whose_schedule_cannot_be_read_is_dropped_and_the_planner_goes_on() -> None:
    table = depot_table(2, per_feeder=2)
    ctrl, clock = stepped_controller(table, AcceptingGateway(), cfg=planner_cfg())
    planner = LocalPlanner(load_site(table), ctrl, planner=_Planner())
    c = ctrl.state.chargers["cp-0001"]
    c.transaction_id, c.plugged = "t1", True
    ctrl.set_session("cp-0001", energy_requested_kwh=10.0, departure=clock.now() + 4 * 3600.0)
    ctrl.local_plan = PlanTargets("local", "edge-local@0", clock.now(), {"cp-0001": []})
    got = await planner.plan_now()  # before: KeyError out of here, ending the edge's tasks
    assert got is None
    assert planner.last_status == "failed" and planner.failures == 1
    assert ctrl.local_plan is None  # the old plan is not followed either
