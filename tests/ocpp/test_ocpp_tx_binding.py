"""A TxProfile asked for one session never lands on the next: with ``transaction_id`` the frame is
built only while that transaction is the active one on the EVSE (``TransactionChanged`` else).
Over real WebSockets, against simulated stations."""

from __future__ import annotations

from typing import Any

import pytest
from evcore.ocpp import LimitOrder, ProfileResult
from evcore.sim.ev import EV
from ocpp_testsite import Rig, rig

pytestmark = pytest.mark.timeout(60)


def tx_sets(r: Rig, ocpp_id: str) -> list[dict[str, Any]]:
    sim = r.fleet.stations[ocpp_id]
    return [
        p
        for a, p in sim.received
        if a == "SetChargingProfile"
        and (p.get("chargingProfile") or p.get("csChargingProfiles") or {}).get(
            "chargingProfilePurpose"
        )
        == "TxProfile"
    ]


async def next_session(r: Rig, charger: str, before: str) -> str:
    r.fleet.unplug(charger)
    await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is None)
    r.fleet.plug_in(charger, EV(soc=0.3))
    await r.until(
        lambda: r.cs.station_state(charger).active_transactions.get(1) not in (None, before)
    )
    return r.cs.station_state(charger).active_transactions[1]


async def first_session(r: Rig, charger: str) -> str:
    r.fleet.plug_in(charger, EV(soc=0.3))
    await r.until(lambda: r.cs.station_state(charger).active_transactions.get(1) is not None)
    return r.cs.station_state(charger).active_transactions[1]


@pytest.mark.parametrize(("charger", "ocpp_id"), [("cp-b", "CPB"), ("cp-a", "CPA")])
async def test_a_queued_txprofile_for_an_ended_session_is_not_sent_to_the_next(
    charger: str, ocpp_id: str
) -> None:
    async with rig() as r:
        sim = r.fleet.stations[ocpp_id]
        tx1 = await first_session(r, charger)
        await sim.wait_idle()
        # The station leaves one call unanswered: the TxProfile waits in the queue behind it.
        sim.misbehaviour.unanswered_actions = {"SetChargingProfile"}
        [d] = r.cs.send_limits([LimitOrder(charger, limit_a=10, purpose="tx_default")])
        [t] = r.cs.send_limits([LimitOrder(charger, limit_a=32, transaction_id=tx1)])
        assert d.sent_mono is not None and t.sent_mono is None
        tx2 = await next_session(r, charger, tx1)
        sim.misbehaviour.unanswered_actions = set()
        res = await t.result
        assert res.status == "TransactionChanged" and not res.accepted
        assert tx1 in res.detail and tx2 in res.detail
        assert res.sent_mono is None and t.sent_mono is None
        assert tx_sets(r, ocpp_id) == []  # nothing left for session 2
        assert [q for q in sim.profiles if q.purpose == "tx"] == []
        assert [x.status for x in r.of(ProfileResult) if x.purpose == "tx"] == [
            "TransactionChanged"
        ]


async def test_a_limit_for_a_session_that_is_not_the_active_one_is_not_written() -> None:
    async with rig() as r:
        sim = r.fleet.stations["CPB"]
        tx1 = await first_session(r, "cp-b")
        tx2 = await next_session(r, "cp-b", tx1)
        await sim.wait_idle()
        # The edge still thinks of session 1: neither path writes it.
        [stale] = r.cs.send_limits([LimitOrder("cp-b", limit_a=20, transaction_id=tx1)])
        assert stale.sent_mono is None
        assert (await stale.result).status == "TransactionChanged"
        res = await r.cs.set_limit("cp-b", limit_a=20, transaction_id=tx1)
        assert res.status == "TransactionChanged" and res.sent_at is None
        assert tx_sets(r, "CPB") == []
        # For the active session it goes as before, straight onto the socket.
        [ok] = r.cs.send_limits([LimitOrder("cp-b", limit_a=20, transaction_id=tx2)])
        assert ok.sent_mono is not None and (await ok.result).accepted
        [frame] = tx_sets(r, "CPB")
        assert frame["chargingProfile"]["transactionId"] == tx2
        # Without a transaction_id: the active one, as before.
        assert (await r.cs.set_limit("cp-b", limit_a=18)).accepted
        # A TxDefault is for the EVSE: a transaction_id given with it changes nothing.
        res = await r.cs.set_limit("cp-b", limit_a=16, purpose="tx_default", transaction_id=tx1)
        assert res.accepted
