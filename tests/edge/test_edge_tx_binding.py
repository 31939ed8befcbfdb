"""A TxProfile belongs to the session it was decided for (review HIGH 2, 2026-12-05).

The edge names the session on every TxProfile it sends (``LimitOrder.transaction_id``): a
TxProfile queued at the central system for session 1 that would leave after session 2 started on
the same EVSE is not sent (``TransactionChanged``) and is not credited. Before, it left with
session 2's transactionId and the station applied session 1's limit to session 2.

The edge's send path and result handling (no control loop: the test decides what leaves), the
OCPP central system on loopback and a simulated 2.0.1 station.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from edge_testkit import FAST, until
from evcore.clock import WallClock
from evcore.edge.app import build_controller
from evcore.edge.config import EdgeConfig
from evcore.edge.coreio import RustCore
from evcore.edge.dispatch import Change, ChangeKind
from evcore.edge.sitegen import depot_table
from evcore.ocpp import CentralSystem, LimitOrder
from evcore.sim.ev import EV
from evcore.sim.fleet import Fleet
from evcore.site import load_site

pytestmark = pytest.mark.timeout(60)


async def test_a_txprofile_queued_for_session_1_never_reaches_session_2() -> None:
    table = depot_table(1, per_feeder=1, grid_share=1.0)
    table["ocpp"]["call_timeout_s"] = 1.5
    site = load_site(table)
    clock = WallClock()
    cs = CentralSystem(site, clock=clock)
    [cid] = [c["id"] for c in table["chargers"]]
    ctrl = build_controller(
        table, core=RustCore(site, table), gateway=cs, clock=clock, cfg=EdgeConfig(**FAST)
    )
    results: list[Any] = []
    cs.add_listener(ctrl.on_event)
    await cs.start()
    fleet = Fleet(
        site,
        url=f"ws://127.0.0.1:{cs.port}/ocpp",
        clock=clock,
        version="2.0.1",
        apply_delay_s=0.1,
        tick_s=0.05,
        sample_interval_s=1.0,
        reconnect_delay_s=0.2,
    )
    sim, evse = fleet.station(cid)
    c = ctrl.state.chargers[cid]
    try:
        await fleet.start()
        await fleet.wait_connected()
        fleet.plug_in(cid, EV(soc=0.3))
        await until(lambda: c.transaction_id is not None, 10, "session 1 at the edge")
        tx1 = c.transaction_id
        await sim.wait_idle()
        # The station is slow to answer: a TxDefault in flight, the edge's TxProfile for session
        # 1 queued behind it.
        sim.misbehaviour.unanswered_actions = {"SetChargingProfile"}
        [d] = cs.send_limits([LimitOrder(cid, limit_a=10.0, purpose="tx_default")])
        assert d.sent_mono is not None
        ctrl._send_all(
            1,
            [("tx", Change(cid, None, 20.0, ChangeKind.INCREASE), clock.now() + 30.0)],
            clock.monotonic(),
        )
        assert c.sent == 20.0
        handles = [f for f in ctrl._sends if not f.done()]
        assert handles, "the TxProfile is queued at the central system"
        for f in handles:
            f.add_done_callback(lambda fut: results.append(fut.result()))
        fleet.unplug(cid)
        await until(lambda: c.transaction_id is None, 10, "session 1 ended at the edge")
        fleet.plug_in(cid, EV(soc=0.3))
        await until(lambda: c.transaction_id not in (None, tx1), 10, "session 2 at the edge")
        tx2 = c.transaction_id
        sim.misbehaviour.unanswered_actions = set()
        await asyncio.wait_for(asyncio.gather(*handles, return_exceptions=True), 10)
        await asyncio.sleep(0.5)
        tx_frames = [
            p["chargingProfile"]
            for a, p in sim.received
            if a == "SetChargingProfile"
            and p["chargingProfile"]["chargingProfilePurpose"] == "TxProfile"
        ]
        # Never on the wire for session 2, never held for it, not credited to it.
        assert [f.get("transactionId") for f in tx_frames] == [], tx_frames
        assert not any(q.purpose == "tx" for q in sim.profiles), sim.profiles
        assert [r.status for r in results] == ["TransactionChanged"]
        assert c.transaction_id == tx2 and not c.tx_profile_held
        assert sim.limit_at(evse, clock.now()) != 20.0
    finally:
        ctrl.stop()
        await asyncio.gather(*ctrl._sends, return_exceptions=True)
        await fleet.stop()
        await cs.stop()
