"""A charger that reports Faulted (or Unavailable) in the middle of a transaction and comes back.

OCPP ends a transaction with StopTransaction (1.6) or TransactionEvent(Ended) (2.0.1), not with a
connector status: a charger may report Faulted for a moment (a transient ground fault, a pilot
error) and carry on with the same transaction, under the TxProfile it holds for it. The edge ended
the session on the status alone: it then counted the charger at its TxDefault while its car could
draw that TxProfile again, raised the other car into the room, and never sent the transaction a
TxProfile again (a 1.6 charger sends no TransactionEvent(Updated) to bring it back).
"""

from __future__ import annotations

from typing import Any

from edge_testkit import ToldGateway, controller_tx, counted, settle, stepped_controller
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import StatusEvent, TransactionEvent


def _status(ctrl: Any, cid: str, status: str) -> StatusEvent:
    c = ctrl.state.chargers[cid]
    return StatusEvent(
        charger_id=cid,
        ocpp_id=c.ocpp_id,
        evse_id=1,
        connector_id=1,
        status=status,
        error_code="GroundFailure" if status == "Faulted" else "NoError",
        at=ctrl.clock.now(),
    )


def _tx(ctrl: Any, cid: str, kind: str) -> TransactionEvent:
    return controller_tx(ctrl, cid, f"T-{cid}", kind)


async def test_a_fault_status_mid_transaction_keeps_the_session_and_its_txprofile_counted() -> None:
    # One 32 A feeder, two 32 A chargers; failsafe levels 16 A each.
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    gw = ToldGateway()
    ctrl, clock = stepped_controller(table, gw)
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    for cid in (a, b):
        ctrl.on_event(_status(ctrl, cid, "Charging"))
        ctrl.on_event(_tx(ctrl, cid, "started"))
    ctrl.set_session(a, priority=10.0)  # A gets the room: 26 A, B its minimum, 6 A
    await settle(ctrl, clock, 6)
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    assert (ca.sent, ca.accepted, cb.sent) == (26.0, True, 6.0)

    # A reports Faulted, then charges again: the same transaction, no TransactionEvent at all.
    ctrl.on_event(_status(ctrl, a, "Faulted"))
    await settle(ctrl, clock, 2)
    ctrl.on_event(_status(ctrl, a, "Charging"))
    await settle(ctrl, clock, 4)

    # What A's transaction may draw now: the last TxProfile the edge sent for it (nothing of
    # its TxDefault changes that), and the core must count A at least at that.
    a_tx = [kw for cid, kw in gw.calls if cid == a and kw["purpose"] == "tx"]
    b_tx = [kw for cid, kw in gw.calls if cid == b and kw["purpose"] == "tx"]
    a_limit = a_tx[-1]["limit_a"]
    assert all(kw["transaction_id"] == f"T-{a}" for kw in a_tx)
    assert counted(ctrl, a)[0] >= a_limit - 1e-9, (counted(ctrl, a), a_limit)
    # The two transactions' TxProfiles fit the feeder (before: A kept 26 A, B was raised to
    # 16 A: 42 A on 32 A).
    assert a_limit + b_tx[-1]["limit_a"] <= 32.0 + 1e-9, (a_tx[-1], b_tx[-1])
    assert ca.transaction_id == f"T-{a}"  # before: None, the session ended on a status


async def test_available_after_a_fault_still_ends_the_session() -> None:
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    ctrl, clock = stepped_controller(table, ToldGateway())
    a = next(iter(ctrl.state.chargers))
    await settle(ctrl, clock)
    ctrl.on_event(_status(ctrl, a, "Charging"))
    ctrl.on_event(_tx(ctrl, a, "started"))
    await settle(ctrl, clock, 2)
    ctrl.on_event(_status(ctrl, a, "Faulted"))
    ctrl.on_event(_status(ctrl, a, "Available"))  # the car is gone (its stop was lost)
    assert ctrl.state.chargers[a].transaction_id is None
