"""OCPP 2.0.1 transactions as stations run them (review of session 13), over a real WebSocket:
a transaction started before its EVSE is known (TxStartPoint Authorized on a station of two
EVSEs) is attributed when the EVSE comes; one whose end was lost is ended when the next starts on
its EVSE, and a restart takes back the newest as the EVSE's transaction; a StatusNotification is
triggered per connector (F06.FR.13)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from evcore.ocpp import TransactionEvent
from evcore.ocpp.events import MeterSample
from evcore.ocpp.v16 import iso
from ocpp_testsite import make_site, meter, open_sqlite, raw_csms, tx_event

pytestmark = pytest.mark.timeout(60)


async def test_a_transaction_whose_evse_comes_after_its_start_is_attributed_then() -> None:
    async with raw_csms() as r:
        cs, events = r.cs, r.events
        st = await r.station("CPM")  # two EVSEs: cp-m1, cp-m2
        t = r.clock.now() - 10
        token = {"idToken": {"idToken": "TAG1", "type": "ISO14443"}}
        steps = [
            tx_event("T1", 0, "Started", "Authorized", t, **token),
            tx_event(
                "T1", 1, "Updated", "CablePluggedIn", t + 1,
                evse={"id": 2, "connectorId": 1}, meterValue=meter(t + 1, 1000.0, 16.0),
            ),
            tx_event("T1", 2, "Updated", "MeterValuePeriodic", t + 2,
                     meterValue=meter(t + 2, 1500.0, 16.0)),
        ]  # fmt: skip
        for p in steps:
            assert (await st.call("TransactionEvent", p))[0] == 3
        assert cs.station_state("CPM").active_transactions == {2: "T1"}
        kinds = [(e.charger_id, e.kind) for e in events if isinstance(e, TransactionEvent)]
        assert kinds[0] == ("cp-m2", "started")
        assert len([e for e in events if isinstance(e, MeterSample)]) == 2
        res = await cs.set_limit("cp-m2", limit_a=10.0)
        assert res.accepted, res
        sent = [p for a, p in st.calls if a == "SetChargingProfile"]
        assert sent[-1]["chargingProfile"]["transactionId"] == "T1"
        end = tx_event("T1", 3, "Ended", "EVDeparted", t + 3, meterValue=meter(t + 3, 2000.0, 0))
        assert (await st.call("TransactionEvent", end))[0] == 3
        ended = [e for e in events if isinstance(e, TransactionEvent) and e.kind == "ended"]
        assert [(e.charger_id, e.session_energy_wh) for e in ended] == [("cp-m2", 1000.0)]


async def test_a_transaction_whose_end_was_lost_is_ended_by_the_next_and_a_restart_keeps_the_newest(
    tmp_path: Path,
) -> None:
    site = make_site(configure_on_boot=False)
    evse = {"id": 1, "connectorId": 1}
    async with open_sqlite(tmp_path) as store:
        async with raw_csms(store=store, site=site) as r:
            st = await r.station("CPB")
            t = r.clock.now() - 600
            # The old session's Ended never comes (the station gave up its retries). Its id
            # sorts after the new one's: the store's order put it last.
            old = tx_event("f-old", 0, "Started", "CablePluggedIn", t, evse=evse)
            new = tx_event("a-new", 0, "Started", "CablePluggedIn", t + 300, evse=evse)
            for p in (old, new):
                assert (await st.call("TransactionEvent", p))[0] == 3
            assert r.cs.station_state("CPB").active_transactions == {1: "a-new"}
            ends = [(e.transaction_id, e.reason) for e in r.of(TransactionEvent)]
            assert ("f-old", "Superseded") in ends
            assert [o.transaction_id for o in await store.list_open_transactions()] == ["a-new"]

        # A store holding both open (as before this fix): a restart takes the newest.
        await store._run(
            store._records,
            lambda tx: tx.execute(
                "UPDATE transactions SET ended_at_s = NULL, stop_reason = ''"
                " WHERE transaction_id = ?",
                ("f-old",),
            ),
        )
        assert len(await store.list_open_transactions()) == 2
        async with raw_csms(store=store, site=site) as r:
            assert r.cs.station_state("CPB").active_transactions == {1: "a-new"}


async def test_a_status_notification_is_triggered_per_connector() -> None:
    """F06.FR.12/13: a 2.0.1 station refuses a TriggerMessage(StatusNotification) without
    evse.connectorId; there is no station-wide status."""

    def responder(action: str, payload: dict[str, Any]) -> dict[str, Any]:
        if action == "TriggerMessage" and payload.get("requestedMessage") == "StatusNotification":
            ok = "connectorId" in payload.get("evse", {})
            return {"status": "Accepted" if ok else "Rejected"}
        return {"status": "Accepted"}

    async with raw_csms() as r:
        st = await r.station("CPM", responder=responder)
        for target in ("CPM", "cp-m2"):
            res = await r.cs.trigger_message(target, "StatusNotification")
            assert res.response_status == "Accepted", (target, res)
        evses = [p["evse"] for a, p in st.calls if a == "TriggerMessage"]
        assert evses == [
            {"id": 1, "connectorId": 1},
            {"id": 2, "connectorId": 1},
            {"id": 2, "connectorId": 1},
        ]


async def test_iso15118_schedules_and_station_limits_are_heard_not_refused() -> None:
    """They were CALLERRORs (NotImplemented); now answered and passed on as notifications."""
    async with raw_csms() as r:
        heard = r.events
        st = await r.station("CPB")
        now = iso(r.clock.now())
        schedule = {
            "id": 1,
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}],
        }
        event = {
            "eventId": 1,
            "timestamp": now,
            "trigger": "Delta",
            "actualValue": "Unavailable",
            "eventNotificationType": "HardWiredNotification",
            "component": {"name": "EVSE", "evse": {"id": 1}},
            "variable": {"name": "AvailabilityState"},
        }
        msgs = [
            (
                "NotifyEVChargingSchedule",
                {"timeBase": now, "evseId": 1, "chargingSchedule": schedule},
            ),
            ("NotifyChargingLimit", {"chargingLimit": {"chargingLimitSource": "EMS"}, "evseId": 1}),
            ("ClearedChargingLimit", {"chargingLimitSource": "EMS", "evseId": 1}),
            ("NotifyEvent", {"generatedAt": now, "seqNo": 0, "eventData": [event]}),
        ]
        for action, payload in msgs:
            answer = await st.call(action, payload)
            assert answer[0] == 3, (action, answer)
        actions = [getattr(e, "action", None) for e in heard]
        for action, _ in msgs:
            assert action in actions


async def test_a_station_that_numbers_its_events_from_0_again_after_a_reboot_is_heard() -> None:
    """A 2.0.1 station rebooting in the middle of a transaction that goes on after the reboot
    may number its TransactionEvents from 0 again (a counter kept in RAM; the lbbrhzn/ocpp Home
    Assistant integration clears its seqNo record at BootNotification for it, PR 2141). A
    seqNo seen before is a replay only if the event is no newer than the newest one handled:
    a replay is a copy of an earlier event. Before, every event after the reboot whose seqNo
    had been used was answered as a replay and dropped, the Ended too: its meter values lost
    and the transaction open until the next one on the EVSE superseded it."""
    async with raw_csms() as r:
        evse = {"id": 1, "connectorId": 1}
        t = r.clock.now() - 600
        st = await r.station("CPB")
        before = [
            tx_event("T1", 0, "Started", "CablePluggedIn", t, evse=evse,
                     meterValue=meter(t, 1000.0, 16.0)),
            tx_event("T1", 1, "Updated", "MeterValuePeriodic", t + 60,
                     meterValue=meter(t + 60, 1500.0, 16.0)),
            tx_event("T1", 2, "Updated", "MeterValuePeriodic", t + 120,
                     meterValue=meter(t + 120, 1800.0, 16.0)),
        ]  # fmt: skip
        for p in before:
            assert (await st.call("TransactionEvent", p))[0] == 3
        await st.close()
        st = await r.station("CPB")  # rebooted: BootNotification, numbering from 0
        stopped = {"transactionId": "T1", "stoppedReason": "EVDisconnected"}
        after = [
            tx_event("T1", 0, "Updated", "MeterValuePeriodic", t + 180,
                     meterValue=meter(t + 180, 2100.0, 16.0)),
            tx_event("T1", 1, "Ended", "EVDeparted", t + 240, transactionInfo=stopped,
                     meterValue=meter(t + 240, 2400.0, 0.0)),
        ]  # fmt: skip
        for p in after:
            assert (await st.call("TransactionEvent", p))[0] == 3
        ended = [e for e in r.of(TransactionEvent) if e.kind == "ended"]
        assert [(e.transaction_id, e.session_energy_wh) for e in ended] == [("T1", 1400.0)]
        assert r.cs.station_state("CPB").active_transactions == {}
        # A copy of an event from before the reboot is still a replay: nothing more is heard.
        heard = len(r.events)
        assert (await st.call("TransactionEvent", before[1]))[0] == 3
        assert len(r.events) == heard
