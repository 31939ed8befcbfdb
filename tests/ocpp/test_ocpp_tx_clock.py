"""Transactions stamped by a station clock far from ours (review of the OCPP room, session 16),
over a real WebSocket: a start or end stamped hours ahead is taken, not refused, and what the
edge hears is never later than its receipt; an offline start stamped in 2000 is not taken as
26 years old; the station's own time stays in the record."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from evcore.ocpp import TransactionEvent
from evcore.ocpp.v16 import iso
from ocpp_testsite import (
    make_site,
    meter,
    open_sqlite,
    raw_csms,
    start_16,
    stop_16,
    tx_event,
)

pytestmark = pytest.mark.timeout(60)

YEAR_2000 = 946_684_800.0


async def test_a_start_and_end_stamped_an_hour_ahead_are_taken_as_received(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1.6 station whose clock runs an hour ahead. Before, its StartTransaction got a CALLERROR
    (PropertyConstraintViolation, timestamp in the future), every retry too: the station gave up
    after its attempts and the session was never started nor ended."""
    async with raw_csms() as r:
        st = await r.station("CPA", "1.6")
        ahead = r.clock.now() + 3600
        answer = await st.call("StartTransaction", start_16(ahead, 1000))
        assert answer[0] == 3, answer
        tx = answer[2]["transactionId"]
        answer = await st.call("StopTransaction", stop_16(tx, ahead + 60, 2000))
        assert answer[0] == 3, answer
        now = r.clock.now()
        events = r.of(TransactionEvent)
        assert [(e.kind, e.session_energy_wh) for e in events] == [
            ("started", 0.0),
            ("ended", 1000.0),
        ]
        for e in events:
            assert now - 5 < e.at <= now  # never later than its receipt
        assert [e.station_at for e in events] == [
            pytest.approx(ahead, abs=0.01),
            pytest.approx(ahead + 60, abs=0.01),
        ]
        # The skew is logged; such a stamp is not taken for the station's clock (one garbage
        # year would be its offset for 10 minutes): what it sends within the skew is.
        assert "s ahead of the central system's clock: taken as received" in caplog.text


async def test_an_offline_start_stamped_in_2000_is_no_older_than_the_outage(
    tmp_path: Path,
) -> None:
    """A 2.0.1 station whose clock went back to 2000 while it was away sends its offline start.
    What the edge takes as the start (an offline start's time) is no earlier than when the
    station dropped off; the store keeps the station's own time. Before, the edge heard a
    session started 26 years ago."""
    site = make_site(configure_on_boot=False)
    async with open_sqlite(tmp_path) as store, raw_csms(store=store, site=site) as r:
        st = await r.station("CPB")
        await st.close()
        for _ in range(250):
            if not r.cs.is_connected("CPB"):
                break
            await asyncio.sleep(0.02)
        gone = r.clock.now()
        st = await r.station("CPB")
        started = tx_event("T1", 0, "Started", "CablePluggedIn", YEAR_2000,
                           evse={"id": 1, "connectorId": 1}, offline=True,
                           meterValue=meter(YEAR_2000, 1000, 16))  # fmt: skip
        assert (await st.call("TransactionEvent", started))[0] == 3
        [ev] = r.of(TransactionEvent)
        assert ev.offline and ev.station_at == YEAR_2000
        assert gone - 1 <= ev.at <= r.clock.now()
        rec = await store.get_transaction("cp-b", "T1")
        assert rec is not None and rec.started_at_s == YEAR_2000


async def test_a_timestamp_with_a_lowercase_t_and_z_is_read() -> None:
    """RFC 3339 (section 5.6) lets "T" and "Z" be lowercase, and the OCPP schemas' date-time
    format takes them. Before, the central system refused them (PropertyConstraintViolation,
    not a valid RFC 3339 timestamp): a station stamping so had every StartTransaction and
    TransactionEvent refused, no session started."""
    async with raw_csms() as r:
        st16 = await r.station("CPA", "1.6")
        st201 = await r.station("CPB")
        t = r.clock.now() - 60
        start = start_16(t, 1000)
        start["timestamp"] = start["timestamp"].replace("T", "t").replace("Z", "z")
        assert (await st16.call("StartTransaction", start))[0] == 3
        evse = {"id": 1, "connectorId": 1}
        started = tx_event("T1", 0, "Started", "CablePluggedIn", t, evse=evse,
                           meterValue=meter(t, 1000, 16))  # fmt: skip
        for p in (started, started["meterValue"][0]):
            p["timestamp"] = p["timestamp"].lower()
        answer = await st201.call("TransactionEvent", started)
        assert answer[0] == 3, answer
        events = r.of(TransactionEvent)
        assert [(e.charger_id, e.kind, e.station_at) for e in events] == [
            ("cp-a", "started", pytest.approx(t, abs=0.001)),
            ("cp-b", "started", pytest.approx(t, abs=0.001)),
        ]


async def test_a_time_the_record_cannot_hold_never_fails_the_message(tmp_path: Path) -> None:
    """Timestamps the schemas take but no protobuf Timestamp holds (years 1 to 9999 UTC): a
    StartTransaction stamped 9999-12-31T23:59:59-01:00 is taken at the last time the record
    holds (its resend the same transaction), and does not make the station's clock look 8,000
    years ahead; a MeterValues stamped 0001-01-01T00:00:00+01:00 is refused naming the field.
    Before, both failed in the publisher (InternalError 'could not be handled') on every retry,
    the start after the listeners had heard it; and a clock 8,000 years ahead (from the start
    taken since 43cdc58) would have been the station's offset."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        st = await r.station("CPA", "1.6")
        start = {"connectorId": 1, "idTag": "A", "meterStart": 0,
                 "timestamp": "9999-12-31T23:59:59-01:00"}  # fmt: skip
        first = await st.call("StartTransaction", start)
        assert first[0] == 3, first
        again = await st.call("StartTransaction", start)
        assert again[2]["transactionId"] == first[2]["transactionId"]
        [ev] = r.of(TransactionEvent)
        assert ev.station_at == 253_402_300_799.0 and ev.at <= r.clock.now()
        offset = r.cs.clock_offset_s("CPA")
        assert offset is None or offset < 60
        rec = await store.get_transaction("cp-a", str(first[2]["transactionId"]))
        assert rec is not None and rec.started_at_s == 253_402_300_799.0
        register = {"value": "1", "measurand": "Energy.Active.Import.Register"}
        mv = [{"timestamp": "0001-01-01T00:00:00+01:00", "sampledValue": [register]}]
        answer = await st.call("MeterValues", {"connectorId": 1, "meterValue": mv})
        assert answer[2] == "PropertyConstraintViolation", answer
        assert answer[3].startswith("meterValue[0].timestamp: "), answer


async def test_a_security_event_stamped_an_hour_ahead_is_kept(tmp_path: Path) -> None:
    """A security event from a station whose clock runs an hour ahead (as after a wrong time
    setting: the very SettingSystemTime event that says so). Before, it got a CALLERROR
    (timestamp in the future) on every retry and never reached the operator; now it is stored
    with the station's time and logged as ahead."""
    async with open_sqlite(tmp_path) as store, raw_csms(store=store) as r:
        st = await r.station("CPB")
        ahead = r.clock.now() + 3600
        event = {"type": "SettingSystemTime", "timestamp": iso(ahead)}
        answer = await st.call("SecurityEventNotification", event)
        assert answer[0] == 3, answer
        [stored] = await store.station_events("CPB")
        assert stored.code == "SettingSystemTime"
        assert stored.occurred_at.ToNanoseconds() / 1e9 == pytest.approx(ahead, abs=0.001)
