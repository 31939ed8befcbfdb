"""What an operator (or a driver's app, through the edge API) may set on a session."""

from __future__ import annotations

import pytest
from edge_testkit import AcceptingGateway, planner_cfg, stepped_controller
from evcore.edge.sitegen import depot_table


async def test_an_energy_request_the_planner_cannot_take_is_refused_naming_it() -> None:
    """1e300 kWh (or Wh given as kWh: 60,000 for a 60 kWh car) was taken, and every re-plan of
    the site then failed on the planner's bound (energy_requested_kwh at most 1e4 kWh) for as
    long as the session lasted."""
    ctrl, _clock = stepped_controller(
        depot_table(2, per_feeder=2), AcceptingGateway(), cfg=planner_cfg()
    )
    cid = next(iter(ctrl.state.chargers))
    for bad in (1e300, 60_000.0):
        with pytest.raises(ValueError, match=r"energy_requested_kwh must be at most 10000 kWh"):
            ctrl.set_session(cid, energy_requested_kwh=bad)
        assert ctrl.state.chargers[cid].energy_requested_kwh != bad
    # The bound is the planner's own (docs/planner.md): at it, taken.
    ctrl.set_session(cid, energy_requested_kwh=1e4)
    assert ctrl.state.chargers[cid].energy_requested_kwh == 1e4
