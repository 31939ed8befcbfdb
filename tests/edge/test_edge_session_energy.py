"""The energy of a session the store keeps when it ends.

``SessionKeeper`` saved a session at its start, when an operator steered it and when it ended;
at the end it wrote the energy it had saved last (0 kWh at the start, or whatever was delivered
when it was last steered), and the edge's state never took the final energy a transaction's end
carries (StopTransaction's meterStop, TransactionEvent(Ended)'s last reading). So every session
in the store ended with the energy of its start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_testkit import session_meter, session_tx
from evcore.clock import StepClock
from evcore.edge.app import build_controller
from evcore.edge.coreio import RustCore
from evcore.edge.recording import SessionKeeper
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store


async def test_a_session_ends_in_the_store_with_the_energy_it_delivered(tmp_path: Path) -> None:
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        table = depot_table(2, per_feeder=2)
        clock = StepClock()
        gateway: Any = None  # nothing is sent in this test
        ctrl = build_controller(
            table, core=RustCore(load_site(table), table), gateway=gateway, clock=clock
        )
        keeper = SessionKeeper(store, clock)
        ctrl.on_session = keeper
        cid = "cp-0001"

        ctrl.on_event(session_tx(cid, "T1", "started", clock.now(), 0.0))
        ctrl.set_session(cid, energy_requested_kwh=20.0, departure=clock.now() + 7200)
        clock.advance(1800)
        ctrl.on_event(session_meter(cid, clock.now(), 5_000.0))
        clock.advance(600)
        # The end carries the last register: 6.5 kWh into the car.
        ctrl.on_event(session_tx(cid, "T1", "ended", clock.now(), 6_500.0))
        await keeper.drain()
        got = await store.get_session(f"{cid}:T1")
        assert got is not None and got.ended_at_s is not None
        assert abs(got.energy_delivered_kwh - 6.5) < 1e-9, got  # before: 0.0

        # A session ended by the next one's start (its end was lost) keeps its own energy.
        ctrl.on_event(session_tx(cid, "T2", "started", clock.now(), 0.0))
        clock.advance(600)
        ctrl.on_event(session_meter(cid, clock.now(), 2_000.0))
        ctrl.on_event(session_tx(cid, "T3", "started", clock.now(), 0.0))
        await keeper.drain()
        t2 = await store.get_session(f"{cid}:T2")
        assert t2 is not None and t2.ended_at_s is not None
        assert abs(t2.energy_delivered_kwh - 2.0) < 1e-9, t2  # before: 0.0
    finally:
        await store.close()


async def test_an_end_that_comes_after_the_status_keeps_its_energy(tmp_path: Path) -> None:
    """The car unplugged: StatusNotification(Available) ended the session, and the transaction's
    end (StopTransaction's meterStop, TransactionEvent(Ended)) came a moment later with the
    energy since the last reading (up to a whole sampling interval, 15 min by many stations'
    default): it was ignored, the session stayed in the store with its last reading's energy."""
    from evcore.ocpp.events import StatusEvent

    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        table = depot_table(2, per_feeder=2)
        clock = StepClock()
        gateway: Any = None  # nothing is sent in this test
        ctrl = build_controller(
            table, core=RustCore(load_site(table), table), gateway=gateway, clock=clock
        )
        keeper = SessionKeeper(store, clock)
        ctrl.on_session = keeper
        cid = "cp-0001"
        ctrl.on_event(session_tx(cid, "T1", "started", clock.now(), 0.0))
        clock.advance(1800)
        ctrl.on_event(session_meter(cid, clock.now(), 5_000.0))
        clock.advance(600)
        ctrl.on_event(
            StatusEvent(
                charger_id=cid,
                ocpp_id="CP0001",
                evse_id=1,
                connector_id=1,
                status="Available",
                error_code="NoError",
                at=clock.now(),
            )
        )
        assert ctrl.state.chargers[cid].transaction_id is None
        ctrl.on_event(session_tx(cid, "T1", "ended", clock.now(), 6_500.0))
        await keeper.drain()
        got = await store.get_session(f"{cid}:T1")
        assert got is not None and got.ended_at_s is not None
        assert abs(got.energy_delivered_kwh - 6.5) < 1e-9, got  # before: 5.0
        # A repeat of that end, or an end of a transaction long gone, changes nothing.
        ctrl.on_event(session_tx(cid, "T1", "ended", clock.now(), 6_500.0))
        ctrl.on_event(session_tx(cid, "T0", "ended", clock.now(), 9_000.0))
        await keeper.drain()
        again = await store.get_session(f"{cid}:T1")
        assert again is not None and again.energy_delivered_kwh == got.energy_delivered_kwh
        assert await store.get_session(f"{cid}:T0") is None
    finally:
        await store.close()
