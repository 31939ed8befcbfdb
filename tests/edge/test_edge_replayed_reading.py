"""A meter reading a station sends late (queued while it was offline, replayed after a newer one)
is not the charger's draw now.

The edge took every ``MeterSample`` as taken when it arrived, whatever its own timestamp: a
reading an hour old, replayed by a 2.0.1 station beside its live ones, replaced the live reading
as fresh. A decrease waiting to be seen in force (the charger drew above it) was then "shown" in
force by the old reading below it, and the increases held behind it left before the charger had
applied the decrease.
"""

from __future__ import annotations

from typing import Any

from edge_testkit import ToldGateway, settle, stepped_controller
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import MeterSample, TransactionEvent


def _meter(ctrl: Any, cid: str, amps: float, at: float) -> MeterSample:
    return MeterSample(
        charger_id=cid,
        ocpp_id=ctrl.state.chargers[cid].ocpp_id,
        at=at,
        site_phase_a=(amps, amps, amps),
        terminal_a=(amps, amps, amps),
        power_w=None,
        energy_register_wh=None,
        offered_a=None,
        soc_percent=None,
        transaction_id=f"T-{cid}",
        session_energy_wh=None,
    )


async def _decide(ctrl: Any) -> None:
    """One decision, its profiles handed to the gateway and answered."""
    await ctrl.decide("test")
    for task in list(ctrl._sends):
        await task


async def test_a_replayed_old_reading_does_not_show_a_decrease_in_force() -> None:
    # One 32 A feeder, two 32 A chargers, both charging at 16 A.
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    gw = ToldGateway()
    ctrl, clock = stepped_controller(table, gw)
    a, b = ctrl.state.chargers
    await settle(ctrl, clock)
    for cid in (a, b):
        ctrl.on_event(
            TransactionEvent(
                charger_id=cid,
                ocpp_id=ctrl.state.chargers[cid].ocpp_id,
                transaction_id=f"T-{cid}",
                kind="started",
                at=clock.now(),
                id_tag=None,
                meter_start_wh=0.0,
                meter_now_wh=0.0,
                session_energy_wh=0.0,
            )
        )
    await settle(ctrl, clock, 3)
    for cid in (a, b):
        ctrl.on_event(_meter(ctrl, cid, 16.0, clock.now()))
    ca, cb = ctrl.state.chargers[a], ctrl.state.chargers[b]
    assert (ca.sent, cb.sent) == (16.0, 16.0)

    # The operator favours B: A comes down to 6 A (it draws 16: a reading can show it in force),
    # B's raise to 26 A waits for that.
    ctrl.set_session(b, priority=10.0)
    n = len(gw.calls)
    await _decide(ctrl)
    assert [(cid, kw["limit_a"]) for cid, kw in gw.calls[n:]] == [(a, 6.0)]
    assert ctrl.pending[a].meter_proves and ctrl.pending[a].accepted
    clock.advance(0.5)

    # A's station replays a reading taken an hour ago, at 4 A, after its live one.
    ctrl.on_event(_meter(ctrl, a, 4.0, clock.now() - 3600.0))
    n = len(gw.calls)
    await _decide(ctrl)
    assert not [kw for cid, kw in gw.calls[n:] if cid == b], gw.calls[n:]  # before: B to 26 A
    assert ca.measured_max_a() == 16.0  # the live reading still counts

    # A live reading at the new limit shows the decrease in force: B rises.
    clock.advance(0.5)
    ctrl.on_event(_meter(ctrl, a, 6.0, clock.now()))
    n = len(gw.calls)
    await _decide(ctrl)
    assert [(cid, kw["limit_a"]) for cid, kw in gw.calls[n:]] == [(b, 26.0)]


async def test_a_reading_of_the_last_transaction_does_not_count_for_the_next() -> None:
    table = depot_table(2, per_feeder=2, grid_share=1.0)
    ctrl, clock = stepped_controller(table, ToldGateway())
    a = next(iter(ctrl.state.chargers))
    c = ctrl.state.chargers[a]
    ctrl.on_event(
        TransactionEvent(
            charger_id=a,
            ocpp_id=c.ocpp_id,
            transaction_id="T2",
            kind="started",
            at=clock.now(),
            id_tag=None,
            meter_start_wh=0.0,
            meter_now_wh=0.0,
            session_energy_wh=0.0,
        )
    )
    # The last transaction's end, replayed late, carries its 20 kWh (and no reading is held).
    old = _meter(ctrl, a, 0.0, clock.now() - 600.0)
    ctrl.on_event(
        MeterSample(
            **{
                **{f: getattr(old, f) for f in old.__dataclass_fields__},
                "transaction_id": "T1",
                "session_energy_wh": 20_000.0,
            }
        )
    )
    assert c.transaction_id == "T2"
    assert c.session_energy_wh == 0.0  # before: 20,000 Wh: T2 looked done
