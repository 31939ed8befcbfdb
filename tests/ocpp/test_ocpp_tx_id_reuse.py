"""A 2.0.1 station that reuses a transaction id after a reboot (its counter starts again), over a
real WebSocket: the second session is a session of its own, under an id of ours, while the
station's own id stays on the wire (TxProfiles); a restart of the central system with a store
keeps the two apart (review of the OCPP room, session 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
from evcore.ocpp import LimitOrder, TransactionEvent
from ocpp_testsite import BOOT_201, make_site, one_session, open_sqlite, raw_csms, tx_event

pytestmark = pytest.mark.timeout(60)


def _txs(events: list[object]) -> list[tuple[str, str, float | None]]:
    return [
        (e.transaction_id, e.kind, e.session_energy_wh)
        for e in events
        if isinstance(e, TransactionEvent)
    ]


async def test_a_transaction_id_reused_after_a_reboot_is_a_new_session(tmp_path: Path) -> None:
    """Before, the second session's Started was taken for the ended first one (its end was
    published again only if not taken): nothing of the second session was published, the EVSE
    had no active transaction, no TxProfile could be sent for it."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        st = await r.station("CPB")
        t = r.clock.now() - 900
        for p in one_session("T1", t):
            assert (await st.call("TransactionEvent", p))[0] == 3
        assert (await st.call("BootNotification", BOOT_201))[0] == 3  # rebooted: ids from 1 again
        second = one_session("T1", t + 600)
        for p in second[:2]:
            assert (await st.call("TransactionEvent", p))[0] == 3
        [(first_id, *_), *_, (new_id, *_)] = _txs(r.events)
        assert first_id == "T1" and new_id != "T1"
        assert _txs(r.events) == [
            ("T1", "started", 0.0),
            ("T1", "updated", 500.0),
            ("T1", "ended", 1000.0),
            (new_id, "started", 0.0),
            (new_id, "updated", 500.0),
        ]
        assert r.cs.station_state("CPB").active_transactions == {1: new_id}
        res = await r.cs.set_limit("cp-b", limit_a=10.0, transaction_id=new_id)
        assert res.accepted, res
        sent = [p for a, p in st.calls if a == "SetChargingProfile"]
        assert sent[-1]["chargingProfile"]["transactionId"] == "T1"  # the station's id
        # The edge's direct path too.
        [order] = r.cs.send_limits([LimitOrder("cp-b", limit_a=8.0, transaction_id=new_id)])
        assert (await order.result).accepted
        sent = [p for a, p in st.calls if a == "SetChargingProfile"]
        assert sent[-1]["chargingProfile"]["transactionId"] == "T1"
        assert (
            sent[-1]["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"]
            == 8.0
        )
        # A late copy of the first session's Ended is still the first session's (a replay).
        assert (await st.call("TransactionEvent", one_session("T1", t)[2]))[0] == 3
        assert (await st.call("TransactionEvent", second[2]))[0] == 3
        assert _txs(r.events)[5:] == [(new_id, "ended", 1000.0)]
        stored = {
            (rec.transaction_id, rec.started_at_s, rec.ended_at_s)
            for rec in [await store.get_transaction("cp-b", i) for i in ("T1", new_id)]
            if rec is not None
        }
        assert len(stored) == 2


async def test_a_restart_keeps_a_reused_id_apart(tmp_path: Path) -> None:
    """The second session of a reused id open when the central system restarts (with its store):
    the station's next events of "T1" are that session's, not the first's."""
    site = make_site(configure_on_boot=False)
    async with open_sqlite(tmp_path) as store:
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPB")
            t = r.clock.now() - 900
            for p in one_session("T1", t):
                assert (await st.call("TransactionEvent", p))[0] == 3
            for p in one_session("T1", t + 600)[:2]:
                assert (await st.call("TransactionEvent", p))[0] == 3
            new_id = r.cs.station_state("CPB").active_transactions[1]
            assert new_id != "T1"
        async with raw_csms(store=store, site=site) as r:
            assert r.cs.station_state("CPB").active_transactions == {1: new_id}
            st = await r.station("CPB")
            res = await r.cs.set_limit("cp-b", limit_a=10.0, transaction_id=new_id)
            assert res.accepted, res
            sent = [p for a, p in st.calls if a == "SetChargingProfile"]
            assert sent[-1]["chargingProfile"]["transactionId"] == "T1"
            update = tx_event("T1", 2, "Updated", "MeterValuePeriodic", t + 700)
            assert (await st.call("TransactionEvent", update))[0] == 3
            assert (await st.call("TransactionEvent", one_session("T1", t + 600)[2]))[0] == 3
            assert [(i, k) for i, k, _ in _txs(r.events)] == [
                (new_id, "updated"),
                (new_id, "ended"),
            ]
            rec = await store.get_transaction("cp-b", "T1")
            assert rec is not None and rec.ended_at_s == pytest.approx(t + 120, abs=0.01)


async def test_a_reused_id_after_a_reboot_that_set_the_clock_back_is_a_new_session(
    tmp_path: Path,
) -> None:
    """The station's clock went back an hour at the reboot: its new session under "T1" is
    stamped before the first one's end (and its start). A BootNotification came between the
    first session's end and the new Started, whose time is not the first Started's: a new
    session. A copy of the first session's Started resent after the boot (its time that of the
    first) is still a replay. Before, the new Started (seqNo 0, stamped no later than the first
    session's last event) was answered as a replay: nothing of the new session was published,
    the EVSE had no transaction, no TxProfile could name it."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        st = await r.station("CPB")
        t = r.clock.now() - 900
        first = one_session("T1", t)
        for p in first:
            assert (await st.call("TransactionEvent", p))[0] == 3
        assert (await st.call("BootNotification", BOOT_201))[0] == 3
        assert (await st.call("TransactionEvent", first[0]))[0] == 3  # a late copy: a replay
        assert len(_txs(r.events)) == 3
        second = one_session("T1", t - 3600)
        for p in second[:2]:
            assert (await st.call("TransactionEvent", p))[0] == 3
        new_id = r.cs.station_state("CPB").active_transactions.get(1)
        assert new_id is not None and new_id != "T1", _txs(r.events)
        assert _txs(r.events)[3:] == [(new_id, "started", 0.0), (new_id, "updated", 500.0)]
        res = await r.cs.set_limit("cp-b", limit_a=10.0, transaction_id=new_id)
        assert res.accepted, res
        sent = [p for a, p in st.calls if a == "SetChargingProfile"]
        assert sent[-1]["chargingProfile"]["transactionId"] == "T1"
        assert (await st.call("TransactionEvent", second[2]))[0] == 3
        assert _txs(r.events)[5:] == [(new_id, "ended", 1000.0)]
        rec = await store.get_transaction("cp-b", new_id)
        assert rec is not None and rec.started_at_s == pytest.approx(t - 3600, abs=0.01)


async def test_after_a_restart_a_reused_id_with_the_clock_set_back_is_a_new_session(
    tmp_path: Path,
) -> None:
    """The same across a restart of the central system: the first session's end is in the
    store only (taken back: it ended before any boot this process saw)."""
    site = make_site(configure_on_boot=False)
    async with open_sqlite(tmp_path) as store:
        t = 0.0
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPB")
            t = r.clock.now() - 900
            for p in one_session("T1", t):
                assert (await st.call("TransactionEvent", p))[0] == 3
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPB")  # its BootNotification
            assert (await st.call("TransactionEvent", one_session("T1", t)[0]))[0] == 3
            assert _txs(r.events) == []  # the first Started resent: a replay
            for p in one_session("T1", t - 3600)[:2]:
                assert (await st.call("TransactionEvent", p))[0] == 3
            new_id = r.cs.station_state("CPB").active_transactions.get(1)
            assert new_id is not None and new_id != "T1"
            assert _txs(r.events) == [(new_id, "started", 0.0), (new_id, "updated", 500.0)]
