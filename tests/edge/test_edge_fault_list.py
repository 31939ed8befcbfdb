"""The faults the edge API reports (``GetSiteState``) are the chargers faulted now.

``ControllerFacade.site_state`` listed every fault the controller had ever reported: a fault an
operator cleared (``ClearFault``) was still reported, and a charger faulted again was listed once
more, for as long as the edge ran.
"""

from __future__ import annotations

from typing import Any

from edge_testkit import ToldGateway, settle, stepped_controller
from evcore.edge.facade import ControllerFacade
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import MeterSample, TransactionEvent


def _meter(ctrl: Any, cid: str, amps: float) -> MeterSample:
    return MeterSample(
        charger_id=cid,
        ocpp_id=ctrl.state.chargers[cid].ocpp_id,
        at=ctrl.clock.now(),
        site_phase_a=(amps, amps, amps),
        terminal_a=(amps, amps, amps),
        power_w=None,
        energy_register_wh=None,
        offered_a=None,
        soc_percent=None,
        transaction_id=None,
        session_energy_wh=None,
    )


async def _fault(ctrl: Any, clock: Any, cid: str) -> None:
    """Readings far above what ``cid`` holds until the controller marks it faulted."""
    for _ in range(100):
        ctrl.on_event(_meter(ctrl, cid, 30.0))
        await ctrl.decide("test")
        if ctrl.state.chargers[cid].faulted:
            return
        clock.advance(2.0)
    raise AssertionError(f"{cid} was not faulted")


async def test_a_cleared_fault_is_no_longer_reported_and_a_repeat_is_listed_once() -> None:
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    ctrl, clock = stepped_controller(table, ToldGateway())
    facade = ControllerFacade(ctrl)
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    for cid in (a, b):
        c = ctrl.state.chargers[cid]
        ctrl.on_event(
            TransactionEvent(
                charger_id=cid,
                ocpp_id=c.ocpp_id,
                transaction_id=f"T-{cid}",
                kind="started",
                at=clock.now(),
                id_tag=None,
                meter_start_wh=0.0,
                meter_now_wh=0.0,
                session_energy_wh=0.0,
            )
        )
    await settle(ctrl, clock)
    assert ctrl.state.chargers[a].holding == 16.0

    await _fault(ctrl, clock, a)
    assert [f["charger_id"] for f in facade.site_state()["faults"]] == [a]
    facade.clear_fault(a, "by alice: contactor replaced")
    assert facade.site_state()["faults"] == []  # before: still [a]

    ctrl.on_event(_meter(ctrl, a, 10.0))  # within its profile again
    await settle(ctrl, clock)
    await _fault(ctrl, clock, a)
    faults = facade.site_state()["faults"]
    assert [f["charger_id"] for f in faults] == [a]  # before: [a, a]
    assert "ignores its profile" in faults[0]["reason"]
    assert ctrl.stats.faults_reported and len(ctrl.stats.faults_reported) == 2  # the count stays
