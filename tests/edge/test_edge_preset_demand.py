"""A demand set on a charger with no car is the next car's only while it still holds.

An operator (or a driver's app, or the twin, which sets it as the car plugs in, before the
station's transaction start arrives) may set a session's demand (energy wanted, departure,
priority) on a charger with no session. Before, it stayed on the charger for as long as nobody
came, and the next car took it whenever it came: hours later, with a departure long past (the
allocator's most urgent car, ``least_laxity``'s top weight), an energy request that was not its
own (met, a car is held at 0 A) and another car's priority. Now such a demand is the next
session's only if that session starts before its departure and within ``PRESET_DEMAND_S`` of
when it was set; otherwise it is dropped at the start, with a warning naming it. A departure
already past is refused when set on an empty charger.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from edge_testkit import ToldGateway, settle, stepped_controller
from edge_testkit import controller_tx as _tx
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table
from evcore.edge.state import PRESET_DEMAND_S


def _pair() -> tuple[Any, Any, ControllerFacade, str, str]:
    # One 32 A feeder, two 32 A chargers: equal weights share it 16 / 16.
    ctrl, clock = stepped_controller(depot_table(2, per_feeder=2, grid_share=1.0), ToldGateway())
    a, b = ctrl.state.chargers
    return ctrl, clock, ControllerFacade(ctrl), a, b


async def test_a_demand_set_on_an_empty_charger_is_dropped_once_its_departure_passed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctrl, clock, facade, a, b = _pair()
    await settle(ctrl, clock)
    ctrl.on_event(_tx(ctrl, b, "B1", "started"))
    # Charger A has no car. The operator sets what a car expected there wants.
    t0 = clock.now()
    facade.set_departure(a, t0 + 1800.0, energy_requested_kwh=30.0)
    facade.set_priority(a, 10.0)
    await settle(ctrl, clock, 2)
    # Nobody came for two hours; then another car arrives at A.
    clock.advance(7200.0)
    with caplog.at_level(logging.WARNING, logger="evcore.edge"):
        ctrl.on_event(_tx(ctrl, a, "A2", "started"))
    await settle(ctrl, clock, 8)
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    (a2,) = [s for s in facade.sessions() if s["charger_id"] == a]
    # Before: departure t0 + 1800 (two hours past), 30 kWh, priority 10; A at 26 A, B at 6 A.
    assert (a2["departure"], a2["energy_requested_kwh"], a2["priority"]) == (None, None, 1.0), a2
    assert (ca.sent, cb.sent) == (16.0, 16.0)
    assert any(
        a in r.getMessage() and "departure" in r.getMessage() and "dropped" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


async def test_a_demand_set_just_before_the_car_arrives_is_its_sessions() -> None:
    """What the twin and a driver's app do: the demand is set as the car plugs in, and the
    station's transaction start comes a moment later."""
    ctrl, clock, facade, a, b = _pair()
    await settle(ctrl, clock)
    ctrl.on_event(_tx(ctrl, b, "B1", "started"))
    t0 = clock.now()
    facade.set_departure(a, t0 + 3 * 3600.0, energy_requested_kwh=30.0)
    facade.set_priority(a, 10.0)
    clock.advance(60.0)
    ctrl.on_event(_tx(ctrl, a, "A1", "started"))
    await settle(ctrl, clock, 8)
    (a1,) = [s for s in facade.sessions() if s["charger_id"] == a]
    assert (a1["departure"], a1["energy_requested_kwh"], a1["priority"]) == (
        t0 + 3 * 3600.0,
        30.0,
        10.0,
    )
    assert (ctrl.state.chargers[a].sent, ctrl.state.chargers[b].sent) == (26.0, 6.0)


async def test_a_demand_with_no_departure_set_on_an_empty_charger_holds_for_a_while() -> None:
    ctrl, clock, facade, a, _b = _pair()
    await settle(ctrl, clock)
    facade.set_priority(a, 10.0)
    ctrl.set_session(a, energy_requested_kwh=2.0)
    clock.advance(PRESET_DEMAND_S + 1.0)
    ctrl.on_event(_tx(ctrl, a, "A1", "started"))
    ca = ctrl.state.chargers[a]
    # Before: a car arriving a day later was held at 0 A once it had 2 kWh, weighted 10.
    assert (ca.energy_requested_kwh, ca.priority) == (None, 1.0)


def test_a_departure_already_past_is_refused_on_an_empty_charger() -> None:
    ctrl, clock, _facade, a, _b = _pair()
    with pytest.raises(ValueError, match=r"departure .* is not after now"):
        ctrl.set_session(a, departure=clock.now() - 60.0, energy_requested_kwh=10.0)
    ca = ctrl.state.chargers[a]
    assert (ca.departure, ca.energy_requested_kwh) == (None, None)  # nothing of it taken
