"""The edge's session levers stay bound to the session they were meant for, and a departure not
after now is refused on a running session as on an empty charger (review of the API and edge
rooms, 2026-12-06): the API passes the transaction it looked up (``transaction_id=``, 11f791a) and
refuses a past departure itself (c835523), but other callers of ``ControllerFacade`` and
``EdgeController.set_session`` had neither guard. Real edge controller on the Rust core."""

from __future__ import annotations

from typing import Any

import pytest
from edge_testkit import FAST, ToldGateway, session_tx, settle, stepped_controller
from evcore.api.facade import NotApplicable
from evcore.clock import StepClock
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import EdgeController
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table


async def _two_sessions(policy: str = "fair_share") -> tuple[EdgeController, StepClock, str, str]:
    ctrl, clock = stepped_controller(
        depot_table(2, per_feeder=2, grid_share=1.0),
        ToldGateway(),
        cfg=EdgeConfig(**{**FAST, "policy": policy}),
    )
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    ctrl.on_event(session_tx(a, "A1", "started", clock.now(), 0.0))
    ctrl.on_event(session_tx(b, "B1", "started", clock.now(), 0.0))
    await settle(ctrl, clock, 4)
    return ctrl, clock, a, b


def _demand(ctrl: EdgeController, cid: str) -> tuple[Any, Any, Any]:
    c = ctrl.state.chargers[cid]
    return (c.departure, c.energy_requested_kwh, c.priority)


async def test_a_lever_bound_to_another_transaction_is_refused_naming_both() -> None:
    """Before: ``set_priority``/``set_departure`` took no ``transaction_id`` (TypeError), so the
    API fell back to its look-up alone and any other caller had no way to bind its change."""
    ctrl, clock, a, _b = await _two_sessions()
    facade = ControllerFacade(ctrl)
    ctrl.on_event(session_tx(a, "A1", "ended", clock.now(), 0.0))
    ctrl.on_event(session_tx(a, "A2", "started", clock.now(), 0.0))
    with pytest.raises(NotApplicable) as err:
        facade.set_priority(a, 5.0, transaction_id="A1")
    assert "'A1'" in str(err.value) and "'A2'" in str(err.value), err.value
    with pytest.raises(NotApplicable) as err:
        facade.set_departure(a, clock.now() + 3600, 10.0, transaction_id="A1")
    assert "'A1'" in str(err.value) and "'A2'" in str(err.value), err.value
    assert _demand(ctrl, a) == (None, None, 1.0)  # A2 keeps its own

    # Bound to the session there: taken.
    facade.set_priority(a, 5.0, transaction_id="A2")
    facade.set_departure(a, clock.now() + 3600, 10.0, transaction_id="A2")
    assert _demand(ctrl, a) == (clock.now() + 3600, 10.0, 5.0)

    # Nobody at the charger: refused naming the transaction; nothing lands for the next car.
    ctrl.on_event(session_tx(a, "A2", "ended", clock.now(), 0.0))
    for lever in (
        lambda: facade.set_priority(a, 2.0, transaction_id="A2"),
        lambda: facade.set_departure(a, clock.now() + 7200, 5.0, transaction_id="A2"),
    ):
        with pytest.raises(NotApplicable, match=r"'A2'.*no session"):
            lever()
    c = ctrl.state.chargers[a]
    assert (c.departure, c.energy_requested_kwh, c.priority, c.demand_set_at) == (
        None,
        None,
        1.0,
        None,
    )
    # Unbound, as before: a preset for the next car.
    facade.set_priority(a, 2.0)
    assert c.priority == 2.0


async def test_a_departure_not_after_now_is_refused_on_a_running_session() -> None:
    """Before: refused only on an empty charger; on a running session a departure 10 minutes
    past was taken, and under least_laxity that car became the most urgent on the site."""
    ctrl, clock, a, b = await _two_sessions("least_laxity")
    facade = ControllerFacade(ctrl)
    ctrl.set_session(b, departure=clock.now() + 4 * 3600, energy_requested_kwh=20.0)
    now = clock.now()
    with pytest.raises(ValueError, match=r"departure .* is not after now") as err:
        ctrl.set_session(a, departure=now - 600, energy_requested_kwh=10.0)
    assert f"{now - 600!r}" in str(err.value), err.value
    assert _demand(ctrl, a) == (None, None, 1.0)  # nothing of the call taken
    with pytest.raises(ValueError, match=r"is not after now"):
        ctrl.set_session(a, departure=now)
    with pytest.raises(ValueError, match=r"is not after now"):  # the facade: FacadeError
        facade.set_departure(a, now - 1, 10.0)
    assert _demand(ctrl, a) == (None, None, 1.0)
    await settle(ctrl, clock, 4)
    assert (ctrl.state.chargers[a].sent, ctrl.state.chargers[b].sent) == (16.0, 16.0)
    ctrl.set_session(a, departure=clock.now() + 1, energy_requested_kwh=10.0)
    assert _demand(ctrl, a) == (clock.now() + 1, 10.0, 1.0)
