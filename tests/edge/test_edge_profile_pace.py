"""``[edge] restart_max_profiles_per_s`` below 1 paces profiles; it does not stop them.

The pace is a token bucket whose size was the rate itself: at 0.5 profiles/s it never held a
whole token, so no paced profile ever left — not a charger's first TxDefault (its failsafe), not
a re-send after a restart, not an increase. The edge sent nothing at all, for good, while every
charger kept whatever it allowed without it.
"""

from __future__ import annotations

from edge_testkit import FAST, ToldGateway, stepped_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.sitegen import depot_table
from evcore.ocpp.events import TransactionEvent


async def test_a_pace_below_one_profile_per_second_sends_one_profile_at_a_time() -> None:
    table = depot_table(4, per_feeder=2)
    gw = ToldGateway()
    cfg = EdgeConfig(**{**FAST, "restart_max_profiles_per_s": 0.5})
    ctrl, clock = stepped_controller(table, gw, cfg=cfg)
    first = next(iter(ctrl.state.chargers))
    c = ctrl.state.chargers[first]
    ctrl.on_event(
        TransactionEvent(
            charger_id=first,
            ocpp_id=c.ocpp_id,
            transaction_id="T1",
            kind="started",
            at=clock.now(),
            id_tag=None,
            meter_start_wh=0.0,
            meter_now_wh=0.0,
            session_energy_wh=0.0,
        )
    )
    sent_at: list[float] = []
    for _ in range(120):  # 60 s, a decision every 0.5 s
        n = len(gw.calls)
        await ctrl.decide("tick")
        for task in list(ctrl._sends):
            await task
        sent_at += [clock.monotonic()] * (len(gw.calls) - n)
        clock.advance(0.5)
    # Every charger holds its TxDefault, and the session its TxProfile (before: nothing sent).
    assert all(x.tx_default is not None for x in ctrl.state.chargers.values()), gw.calls
    assert any(cid == first and kw["purpose"] == "tx" for cid, kw in gw.calls)
    # Paced: at most one profile per 2 s after the first.
    assert sent_at and len(sent_at) <= 1 + (sent_at[-1] - sent_at[0]) * 0.5 + 1e-9, sent_at
