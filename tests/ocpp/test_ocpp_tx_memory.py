"""What the central system keeps per transaction stays bounded: an ended transaction whose end the
bus and store took is forgotten ``tx_keep_s`` after it ended (a replay within it is still one),
and a 2.0.1 transaction's seqNos fold into a contiguous prefix instead of one set entry per
message (a 10 s meter interval gave 2,900 entries per 8 h session, kept for good). Past the keep
time a 2.0.1 station's retry or replay of an ended transaction's events never starts it again:
the store's record says it ended; without a store, an Updated of a transaction unknown here
starts it only when it shows it going on (online, current), over a real WebSocket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from evcore.ocpp import MeterSample, TransactionEvent
from evcore.ocpp.server import SEQ_KEEP, START_KEYS_KEEP, TX_KEEP_S, TxState
from evcore.sim.ev import EV
from ocpp_testsite import (
    make_site,
    one_session,
    open_sqlite,
    raw_csms,
    rig,
    start_16,
    starts_and_ends,
    stop_16,
    tx_event,
)

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


def test_a_retry_far_below_the_folded_prefix_stays_small() -> None:
    """A station counting seqNos across transactions (here from 1,000,000, every other one, so
    the prefix folds above 1,000,000) renumbers after a reboot, and its event 3 is not handled
    in full (a publish failed). Before, taking 3 out of the prefix put every number between into
    the set: 1,006,140 entries here, 10^9 and the process's memory for a counter that high."""
    tx = TxState("t", "cp", 1, None, None)
    for seq in range(1_000_000, 1_000_000 + 2 * (SEQ_KEEP + 1), 2):
        tx.see_seq(seq)
    assert tx.seq_low > 1_000_000
    tx.unsee_seq(3)
    assert len(tx.seen_seq) <= SEQ_KEEP
    assert not tx.seq_seen(3) and tx.seq_seen(2) and tx.seq_seen(4) and tx.seq_seen(1_000_000)
    tx.see_seq(3)
    assert tx.seq_seen(3)


def test_seq_nos_that_never_close_a_gap_stay_bounded() -> None:
    tx = TxState("t", "cp", 1, None, None)
    # A station whose numbers start at 1 (0 never comes) and skip every other one.
    for seq in range(1, 6 * SEQ_KEEP, 2):
        tx.see_seq(seq)
        assert len(tx.seen_seq) <= SEQ_KEEP
    assert tx.seq_seen(6 * SEQ_KEEP - 1) and not tx.seq_seen(6 * SEQ_KEEP)


async def test_an_ended_transaction_is_forgotten_after_the_keep_time() -> None:
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
            r.cs.tx_keep_s = 0.0
            r.fleet.plug_in(cid, EV(soc=0.3))
            await r.until(lambda st=st, second=second: st.active_tx.get(1) not in (None, second))
            third = st.active_tx[1]
            assert set(st.transactions) == {third}
            # 1.6 start keys outlive their transactions, bounded by count (START_KEYS_KEEP).
            assert len(st.start_keys) <= START_KEYS_KEEP
            r.cs.tx_keep_s = TX_KEEP_S
            r.fleet.unplug(cid)


async def test_a_replayed_event_of_a_forgotten_ended_transaction_never_starts_it_again(
    tmp_path: Path,
) -> None:
    """With a store: its record says the transaction ended, so the station's retry or replay of
    any of its events (a lost answer, then a day offline; here ``tx_keep_s=0``) is answered and
    changes nothing. Before, the CSMS had forgotten it and took the event for a new transaction:
    published as started again, the EVSE's transaction (TxProfiles), open in the store. The
    timestamps are recent, so only the store can tell."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store, tx_keep_s=0.0) as r:
        st = await r.station("CPB")
        t = r.clock.now() - 200
        first = one_session("T1", t)
        for p in first:
            assert (await st.call("TransactionEvent", p))[0] == 3
        # The next session's start forgets T1 (ended, its end stored, kept 0 s).
        for p in one_session("T2", t + 130)[::2]:
            assert (await st.call("TransactionEvent", p))[0] == 3
        assert "T1" not in r.cs._stations["CPB"].transactions
        for p in first:  # the station sends T1's events again
            answer = await st.call("TransactionEvent", p)
            assert answer[0] == 3, answer
        assert starts_and_ends(r.events, "T1") == ["started", "ended"]
        assert r.cs.station_state("CPB").active_transactions == {}
        assert await store.list_open_transactions() == []
        rec = await store.get_transaction("cp-b", "T1")
        assert rec is not None and rec.ended_at_s == pytest.approx(t + 120, abs=1e-3)
        assert rec.stop_reason == "EVDisconnected"
        res = await r.cs.set_limit("cp-b", limit_a=10.0)
        assert not res.accepted
        assert [p for a, p in st.calls if a == "SetChargingProfile"] == []


async def test_an_old_or_offline_update_of_an_unknown_transaction_does_not_start_it() -> None:
    """Without a store: an Updated of a transaction unknown here starts it only when it shows
    it going on (sent online, no older than ``max_clock_skew_s``). The station's retry of an
    hour-old Updated of a transaction ended and forgotten is recorded (its samples published)
    and not started; before, it was published as started and became the EVSE's transaction.
    An online, current Updated of an unknown transaction (one started before a restart of the
    CSMS) still starts it, as does the next online one of a transaction heard first offline."""
    async with raw_csms(tx_keep_s=0.0) as r:
        st = await r.station("CPB")
        t = r.clock.now() - 3600
        first = one_session("T1", t)
        for p in first:
            assert (await st.call("TransactionEvent", p))[0] == 3
        now = r.clock.now()
        for p in one_session("T2", now - 130)[::2]:
            assert (await st.call("TransactionEvent", p))[0] == 3
        assert "T1" not in r.cs._stations["CPB"].transactions
        # T1's Updated again (its answer was lost): recorded, not started.
        assert (await st.call("TransactionEvent", first[1]))[0] == 3
        assert starts_and_ends(r.events, "T1") == ["started", "ended"]
        assert r.cs.station_state("CPB").active_transactions == {}
        samples = [e for e in r.of(MeterSample) if e.transaction_id == "T1"]
        assert [s.at for s in samples] == pytest.approx([t, t + 60, t + 120, t + 60], abs=1e-3)
        # T3, unknown here: heard first in an event queued offline, then online and current.
        offline = tx_event("T3", 5, "Updated", "MeterValuePeriodic", now - 20, offline=True)
        assert (await st.call("TransactionEvent", offline))[0] == 3
        assert starts_and_ends(r.events, "T3") == []
        live = tx_event("T3", 6, "Updated", "MeterValuePeriodic", now - 1)
        assert (await st.call("TransactionEvent", live))[0] == 3
        assert starts_and_ends(r.events, "T3") == ["started"]
        assert r.cs.station_state("CPB").active_transactions == {1: "T3"}


async def test_a_1_6_start_resent_after_its_transaction_was_forgotten_gets_the_same_id() -> None:
    """A 1.6 station that lost the answer to its StartTransaction resends it (it queues its
    transaction messages): it must get the transactionId it got the first time, also once the
    central system has forgotten the ended transaction (``tx_keep_s``, made 0 s here), and its
    resent StopTransaction is a replay (no second end). Before, the start key was dropped with
    the transaction: the resend got a new transactionId and was published as a new session,
    open for good, and the resent stop published a second end."""
    async with raw_csms(tx_keep_s=0.0) as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        first = await st.call("StartTransaction", start_16(t, 1000))
        tx1 = first[2]["transactionId"]
        assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
        # The next session's start forgets the first (ended, kept 0 s).
        second = await st.call("StartTransaction", start_16(t + 300, 3000))
        tx2 = second[2]["transactionId"]
        assert tx2 != tx1
        assert str(tx1) not in r.cs._stations["CPA"].transactions
        again = await st.call("StartTransaction", start_16(t, 1000))
        assert again[2]["transactionId"] == tx1, (tx1, again)
        assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
        assert starts_and_ends(r.events, str(tx1)) == ["started", "ended"]
        assert r.cs.station_state("CPA").active_transactions == {1: str(tx2)}
        # The keys are bounded by count: the oldest go first.
        for i in range(START_KEYS_KEEP):
            assert (await st.call("StartTransaction", start_16(t + 400 + i, 4000 + i)))[0] == 3
        keys = r.cs._stations["CPA"].start_keys
        assert len(keys) == START_KEYS_KEEP and str(tx2) not in keys.values()


async def test_a_1_6_start_resent_after_a_restart_gets_the_same_id(tmp_path: Path) -> None:
    """With a store, also across a restart of the central system: the station's last start keys
    are in the store (meta ``START_KEYS_META``) and the transaction's record says it ended, so
    the resent StartTransaction gets its first transactionId and its resent StopTransaction is
    a replay. Before, the restarted central system knew only the store's open transactions: a
    new transactionId, a second session published and left open in the store for good."""
    site = make_site(configure_on_boot=False)
    async with open_sqlite(tmp_path) as store:
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPA", "1.6")
            t = r.clock.now() - 600
            tx1 = (await st.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
            assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
        # A second later: a new central system's 1.6 ids start from its clock's second.
        await asyncio.sleep(1.1)
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPA", "1.6")
            again = await st.call("StartTransaction", start_16(t, 1000))
            assert again[2]["transactionId"] == tx1, (tx1, again)
            assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
            assert starts_and_ends(r.events, str(tx1)) == []
            assert await store.list_open_transactions() == []
            # A new session still gets a new id, never one handed out before.
            tx2 = (await st.call("StartTransaction", start_16(t + 300, 3000)))[2]["transactionId"]
            assert tx2 > tx1


async def test_a_1_6_stop_resent_after_its_transaction_was_forgotten_is_a_replay(
    tmp_path: Path,
) -> None:
    """With a store: a StopTransaction of a transaction forgotten since it ended (its start not
    resent) is recognised from the store's record: no second end. Before, it was taken for a
    transaction never seen started: the listeners heard a second `ended`, without a meter
    start or session energy."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store, tx_keep_s=0.0) as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        tx1 = (await st.call("StartTransaction", start_16(t, 1000)))[2]["transactionId"]
        assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
        assert (await st.call("StartTransaction", start_16(t + 300, 3000)))[0] == 3
        assert str(tx1) not in r.cs._stations["CPA"].transactions
        assert (await st.call("StopTransaction", stop_16(tx1, t + 120, 3000)))[0] == 3
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [(e.transaction_id, e.session_energy_wh) for e in ended] == [(str(tx1), 2000.0)]


async def test_a_late_1_6_start_of_an_older_transaction_leaves_the_evse_to_the_newer() -> None:
    """A StartTransaction older than the connector's open transaction (a resend whose key was
    no longer kept, an offline start delivered late) does not make it the connector's: the
    TxProfiles go on naming the newer one, as on 2.0.1 (``_take_evse``). Before, the late start
    took the connector, and every TxProfile named a transaction the station had ended."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")
        t = r.clock.now() - 600
        newer = (await st.call("StartTransaction", start_16(t + 300, 3000)))[2]["transactionId"]
        assert (await st.call("StartTransaction", start_16(t, 1000)))[0] == 3
        assert r.cs.station_state("CPA").active_transactions == {1: str(newer)}
