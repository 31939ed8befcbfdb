"""Strings a station chooses (its 2.0.1 transaction ids, security event types, message ids) that
hold CR/LF or other control characters, over a real WebSocket against the central system with
an in-process bus and a SQLite store: bus event ids and log lines stay one line, and the record
keeps what the station sent."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from bus_testkit import collecting
from evcore.bus.inprocess import InProcessBus
from evcore.ocpp import TransactionEvent
from evcore.v1 import station_event_pb2, transaction_pb2
from ocpp_testsite import meter, open_sqlite, raw_csms, start_16, tx_event

pytestmark = pytest.mark.timeout(30)

#: A transaction id with a line break and an escape sequence (36 characters at most: the schema).
TX = "T1\r\nWARNING forged\x1b[2J%0A"


async def test_control_characters_in_station_strings_keep_ids_and_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a 2.0.1 TransactionEvent whose transactionId held CR/LF got CALLERROR
    InternalError on every retry (the bus refuses an event id of more than one line: ValueError
    out of the publisher), so its session never started on the bus or in the store; a
    SecurityEventNotification whose type held one was never kept either; and the log lines that
    name them were split in two (a forged line)."""
    bus = InProcessBus("ocpp-test")
    await bus.start()
    got = await collecting(bus, "evcore.ocpp-test.>")
    caplog.set_level(logging.INFO, logger="evcore.ocpp")
    try:
        async with open_sqlite(tmp_path) as store, raw_csms(store=store, bus=bus) as r:
            st = await r.station("CPB")
            t = r.clock.now() - 60
            evse = {"id": 1, "connectorId": 1}
            # Unknown here and queued offline: the central system logs it naming the id.
            updated = tx_event(TX, 0, "Updated", "MeterValuePeriodic", t, evse=evse,
                               offline=True, meterValue=meter(t, 1000, 16))  # fmt: skip
            answer = await st.call("TransactionEvent", updated)
            assert answer[0] == 3, answer
            started = tx_event(TX, 1, "Started", "CablePluggedIn", t + 1, evse=evse,
                               meterValue=meter(t + 1, 1000, 16))  # fmt: skip
            answer = await st.call("TransactionEvent", started)
            assert answer[0] == 3, answer
            tamper = {"type": "Tamper\r\nDetected", "timestamp": "2026-12-06T12:00:00Z"}
            answer = await st.call("SecurityEventNotification", tamper)
            assert answer[0] == 3, answer
            # A CALLRESULT for an id we never sent: logged naming it.
            await st.ws.send(json.dumps([3, "x\r\nERROR forged", {}]))
            assert (await st.call("Heartbeat", {}))[0] == 3
            await bus.flush()
            # The record keeps what the station sent.
            assert [e.transaction_id for e in r.of(TransactionEvent)] == [TX]
            rec = await store.get_transaction("cp-b", TX)
            assert rec is not None and rec.transaction_id == TX
            sent = [transaction_pb2.TransactionEvent.FromString(m.data) for m in got
                    if ".transaction." in m.subject]  # fmt: skip
            assert [e.transaction_id for e in sent] == [TX]
            codes = [station_event_pb2.StationEvent.FromString(m.data).code for m in got
                     if ".station_event." in m.subject]  # fmt: skip
            assert codes == ["Tamper\r\nDetected"]
        ids = [m.event_id for m in got]
        assert ids and all(i.isprintable() for i in ids), ids
        tx_id = next(i for i in ids if i.startswith("tx:"))
        assert "T1%0D%0AWARNING forged%1B[2J%250A" in tx_id, tx_id
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "evcore.ocpp"]
        assert any("forged" in line for line in lines), lines
        assert all(line.isprintable() for line in lines), [x for x in lines if "forged" in x]
    finally:
        await bus.close()


async def test_a_string_no_record_can_hold_is_named_not_an_internal_error(tmp_path: Path) -> None:
    """A NUL character or a lone surrogate (JSON's "\\u0000", "\\ud800") in what a station sends:
    the store (PostgreSQL refuses NUL) and protobuf (UTF-8 only) hold neither. Before, each got
    CALLERROR InternalError from deep in the store, after local listeners had heard the start.
    Now a 2.0.1 transactionId holding one is refused naming the field, before any state; an id
    tag, a security event's type or techInfo holding one is kept escaped (``%00``, ``%uD800``)
    and the message taken."""
    bus = InProcessBus("ocpp-test")
    await bus.start()
    try:
        async with open_sqlite(tmp_path) as store, raw_csms(store=store, bus=bus) as r:
            st = await r.station("CPB")
            t = r.clock.now() - 60
            evse = {"id": 1, "connectorId": 1}
            for bad in ("N\x00UL", "S\ud800"):
                started = tx_event(bad, 0, "Started", "CablePluggedIn", t, evse=evse)
                answer = await st.call("TransactionEvent", started)
                assert answer[2:4] == [
                    "PropertyConstraintViolation",
                    f"transactionInfo.transactionId: {bad!r} holds a NUL character or a lone "
                    "surrogate, which no record can keep",
                ], answer
            assert r.of(TransactionEvent) == []
            token = {"idToken": "TAG\x00\ud800", "type": "ISO14443"}
            started = tx_event("T9", 0, "Started", "Authorized", t, evse=evse, idToken=token)
            answer = await st.call("TransactionEvent", started)
            assert answer[0] == 3, answer
            tamper = {"type": "Tamper\x00", "timestamp": "2026-12-06T12:00:00Z",
                      "techInfo": "lid\ud800"}  # fmt: skip
            answer = await st.call("SecurityEventNotification", tamper)
            assert answer[0] == 3, answer
            rec = await store.get_transaction("cp-b", "T9")
            assert rec is not None and rec.id_tag == "TAG%00%uD800"
            a = await r.station("CPA", "1.6")
            answer = await a.call("StartTransaction", start_16(t, 1000, "A\x00"))
            assert answer[0] == 3, answer
            rec = await store.get_transaction("cp-a", str(answer[2]["transactionId"]))
            assert rec is not None and rec.id_tag == "A%00"
            [event] = await store.station_events("CPB")
            assert (event.code, event.tech_info) == ("Tamper%00", "lid%uD800")
    finally:
        await bus.close()
