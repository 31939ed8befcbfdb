"""An operator's priority is the session's, not the charger's.

``SiteState._end_session`` cleared a session's energy wanted and departure but kept its priority:
the next car on the charger (hours later, another driver) was weighted as the operator had
weighted the car before it, shown so in ``ListSessions`` and saved so in the store, though nobody
had steered it.
"""

from __future__ import annotations

from edge_testkit import ToldGateway, settle, stepped_controller
from edge_testkit import controller_tx as _tx
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table


async def test_the_next_car_does_not_inherit_the_last_ones_priority() -> None:
    # One 32 A feeder, two 32 A chargers.
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    ctrl, clock = stepped_controller(table, ToldGateway())
    facade = ControllerFacade(ctrl)
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    ctrl.on_event(_tx(ctrl, b, "B1", "started"))
    ctrl.on_event(_tx(ctrl, a, "A1", "started"))
    facade.set_priority(a, 10.0)  # the operator favours car A1
    await settle(ctrl, clock, 6)
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    assert (ca.sent, cb.sent) == (26.0, 6.0)

    ctrl.on_event(_tx(ctrl, a, "A1", "ended"))
    await settle(ctrl, clock, 2)
    ctrl.on_event(_tx(ctrl, a, "A2", "started"))  # another driver, nobody steered it
    await settle(ctrl, clock, 8)
    (a2,) = [s for s in facade.sessions() if s["charger_id"] == a]
    assert a2["transaction_id"] == "A2"
    assert a2["priority"] == 1.0, a2  # before: 10.0
    assert (ca.sent, cb.sent) == (16.0, 16.0)  # before: 26 and 6
