"""What the central system keeps per transaction stays bounded: an ended transaction whose end the
bus and store took is forgotten ``TX_KEEP_S`` after it ended (a replay within it is still one),
and a 2.0.1 transaction's seqNos fold into a contiguous prefix instead of one set entry per
message (a 10 s meter interval gave 2,900 entries per 8 h session, kept for good)."""

from __future__ import annotations

import pytest
from evcore.ocpp import server
from evcore.ocpp.server import SEQ_KEEP, TxState
from evcore.sim.ev import EV
from ocpp_testsite import rig

pytestmark = pytest.mark.timeout(60)


def test_seq_nos_in_order_leave_no_set_entries_and_a_retry_is_seen_again() -> None:
    tx = TxState("t", "cp", 1, None, None)
    for seq in range(1000):
        assert not tx.seq_seen(seq)
        tx.see_seq(seq)
    assert tx.seq_low == 999 and tx.seen_seq == set()
    assert tx.seq_seen(0) and tx.seq_seen(999) and not tx.seq_seen(1000)
    # Out of order: 1002 before 1000 and 1001.
    tx.see_seq(1002)
    assert tx.seq_seen(1002) and not tx.seq_seen(1001) and tx.seen_seq == {1002}
    tx.see_seq(1000)
    tx.see_seq(1001)
    assert tx.seq_low == 1002 and tx.seen_seq == set()
    # A message not handled in full is processed again on its retry, the others not.
    tx.unsee_seq(1001)
    assert not tx.seq_seen(1001)
    assert tx.seq_seen(1000) and tx.seq_seen(1002) and tx.seq_seen(5)
    tx.see_seq(1001)
    assert tx.seq_low == 1002 and tx.seen_seq == set()


def test_seq_nos_that_never_close_a_gap_stay_bounded() -> None:
    tx = TxState("t", "cp", 1, None, None)
    # A station whose numbers start at 1 (0 never comes) and skip every other one.
    for seq in range(1, 6 * SEQ_KEEP, 2):
        tx.see_seq(seq)
        assert len(tx.seen_seq) <= SEQ_KEEP
    assert tx.seq_seen(6 * SEQ_KEEP - 1) and not tx.seq_seen(6 * SEQ_KEEP)


async def test_an_ended_transaction_is_forgotten_after_the_keep_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig() as r:
        for cid, ocpp_id in (("cp-a", "CPA"), ("cp-b", "CPB")):  # 1.6 and 2.0.1
            st = r.cs._stations[ocpp_id]
            r.fleet.plug_in(cid, EV(soc=0.3))
            await r.until(lambda st=st: bool(st.active_tx.get(1)))
            first = st.active_tx[1]
            tx = st.transactions[first]
            # Meter values went through the 2.0.1 TransactionEvents: no set entry each.
            await r.until(lambda tx=tx, ocpp_id=ocpp_id: ocpp_id == "CPA" or tx.seq_low >= 2)
            assert len(tx.seen_seq) <= 1
            r.fleet.unplug(cid)
            await r.until(lambda tx=tx: tx.ended and "ended" in tx.published)
            # A new session within the keep time: the ended one is still known.
            r.fleet.plug_in(cid, EV(soc=0.3))
            await r.until(lambda st=st, first=first: st.active_tx.get(1) not in (None, first))
            second = st.active_tx[1]
            assert first in st.transactions
            r.fleet.unplug(cid)
            await r.until(lambda st=st, second=second: st.transactions[second].ended)
            await r.until(lambda st=st, second=second: "ended" in st.transactions[second].published)
            # Past it (made 0 s here): the next session's start forgets both.
            monkeypatch.setattr(server, "TX_KEEP_S", 0.0)
            r.fleet.plug_in(cid, EV(soc=0.3))
            await r.until(lambda st=st, second=second: st.active_tx.get(1) not in (None, second))
            third = st.active_tx[1]
            assert set(st.transactions) == {third}
            assert set(st.start_keys.values()) <= {third}
            monkeypatch.setattr(server, "TX_KEEP_S", 24 * 3600.0)
            r.fleet.unplug(cid)
