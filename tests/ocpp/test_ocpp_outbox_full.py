"""A transaction message that arrives while the bus outbox is at its cap (``[bus]
outbox_max_bytes``, the broker away) or the store is unavailable: the station is told why it was
not taken, its connection lives on, and its resend once the bus or store is back is published and
stored once. Real OCPP over real WebSockets, a real nats-server (private: it is stopped), the
embedded store and real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from bus_testkit import NatsServer, collecting, make_nats_bus, stored_msgs
from evcore.bus import InProcessBus, OutboxFull, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.ocpp import TransactionEvent
from evcore.store import open_store
from evcore.v1 import meter_pb2, transaction_pb2
from ocpp_testsite import meter, open_sqlite, raw_csms, start_16, tx_event
from pg_testkit import PG_DSN
from psycopg import sql

pytestmark = pytest.mark.timeout(30)


async def stream_payloads(bus: NatsBus, subject: str) -> list[bytes]:
    """What the stream holds on ``subject``, in stream order."""
    return [m.data or b"" for m in await stored_msgs(bus, subject)]


async def test_a_full_outbox_is_named_to_the_station_and_its_resend_is_published_once(
    tmp_path: Path,
) -> None:
    """Before: CALLERROR InternalError 'TransactionEvent could not be handled' (and a
    traceback in the log), nothing telling the station or its operator that the central system
    was out of room rather than failing on its message."""
    srv = NatsServer(tmp_path / "js")
    srv.start()
    s = Subjects("ocpp-test")
    bus = make_nats_bus("ocpp-test", srv.url, tmp_path / "outbox", outbox_max_bytes=3000)
    await bus.start()
    try:
        async with open_sqlite(tmp_path) as store, raw_csms(bus=bus, store=store) as r:
            st = await r.station("CPB")
            srv.kill()
            # Another publisher's critical events fill the outbox while the broker is away.
            with pytest.raises(OutboxFull):
                for i in range(1000):
                    await bus.publish(s.station_event("CPX"), b"x" * 20, event_id=f"f{i}",
                                      critical=True)  # fmt: skip
            t = r.clock.now() - 5
            started = tx_event("T1", 0, "Started", "CablePluggedIn", t,
                               evse={"id": 1, "connectorId": 1},
                               meterValue=meter(t, 1000, 16))  # fmt: skip
            refused = await st.call("TransactionEvent", started)
            assert refused[0] == 4 and refused[2] == "InternalError", refused
            assert "not recorded" in refused[3] and "outbox is full" in refused[3], refused
            # Neither stored nor acknowledged; the connection lives on.
            assert await store.transaction_events("cp-b", "T1") == []
            assert (await st.call("Heartbeat", {}))[0] == 3
            srv.start()
            assert await bus.flush(timeout_s=10)
            answer = await st.call("TransactionEvent", started)
            assert answer[0] == 3, answer
            assert await bus.flush(timeout_s=10)
            txs = await stream_payloads(bus, s.transaction("cp-b"))
            assert len(txs) == 1
            one = transaction_pb2.TransactionEvent.FromString(txs[0])
            assert one.transaction_id == "T1"
            assert one.kind == transaction_pb2.TRANSACTION_EVENT_KIND_STARTED
            stored = await store.transaction_events("cp-b", "T1")
            assert [e.kind for e in stored] == [transaction_pb2.TRANSACTION_EVENT_KIND_STARTED]
            # Its meter value, taken by both attempts, went out once.
            samples = await stream_payloads(bus, s.telemetry("cp-b"))
            assert len(samples) == 1
            sample = meter_pb2.MeterSample.FromString(samples[0])
            assert sample.energy_register_wh == 1000
            heard = [e.kind for e in r.of(TransactionEvent) if e.transaction_id == "T1"]
            assert heard == ["started"]
    finally:
        await bus.close()
        srv.kill()


async def test_a_store_away_is_named_to_the_station_and_its_resend_is_kept_once(
    pg_schema: str, tmp_path: Path
) -> None:
    """PostgreSQL does not take the write in time (its table locked by another session): the
    station is told the store is unavailable, not 'could not be handled'; once it is back the
    resend is stored once and the bus, which took the first copy, keeps one. Real PostgreSQL."""
    store = open_store(
        {"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema, "write_timeout_s": 0.3}, tmp_path
    )
    await store.open()
    locker = await psycopg.AsyncConnection.connect(PG_DSN)
    bus = InProcessBus("ocpp-test")
    await bus.start()
    got = await collecting(bus, "evcore.ocpp-test.transaction.*")
    try:
        async with raw_csms(bus=bus, store=store) as r:
            st = await r.station("CPB")
            await locker.execute(
                sql.SQL("LOCK TABLE {}.transaction_events IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(pg_schema)
                )
            )
            t = r.clock.now() - 5
            started = tx_event("T2", 0, "Started", "CablePluggedIn", t,
                               evse={"id": 1, "connectorId": 1})  # fmt: skip
            refused = await st.call("TransactionEvent", started)
            assert refused[0] == 4 and refused[2] == "InternalError", refused
            assert "not recorded" in refused[3] and "store is unavailable" in refused[3], refused
            await locker.rollback()
            assert (await st.call("Heartbeat", {}))[0] == 3
            assert (await st.call("TransactionEvent", started))[0] == 3
            stored = await store.transaction_events("cp-b", "T2")
            assert [e.kind for e in stored] == [transaction_pb2.TRANSACTION_EVENT_KIND_STARTED]
            await bus.flush()
            assert len(got) == 1
    finally:
        await locker.close()
        await bus.close()
        await store.close()


async def test_a_store_away_on_a_read_is_named_to_the_station_too(
    pg_schema: str, tmp_path: Path
) -> None:
    """A 1.6 StartTransaction reads the station's start keys from the store first (the first
    start since this process began): with that read timing out, the answer names the store as
    well. Before, 'StartTransaction could not be handled' and a traceback, as for a bug."""
    store = open_store(
        {"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema, "read_timeout_s": 0.3}, tmp_path
    )
    await store.open()
    locker = await psycopg.AsyncConnection.connect(PG_DSN)
    try:
        async with raw_csms(store=store) as r:
            st = await r.station("CPA", "1.6")
            await locker.execute(
                sql.SQL("LOCK TABLE {}.meta IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(pg_schema)
                )
            )
            start = start_16(r.clock.now() - 5, 1000)
            refused = await st.call("StartTransaction", start)
            assert refused[0] == 4 and refused[2] == "InternalError", refused
            assert "not recorded" in refused[3] and "store is unavailable" in refused[3], refused
            await locker.rollback()
            answer = await st.call("StartTransaction", start)
            assert answer[0] == 3 and answer[2]["idTagInfo"]["status"] == "Accepted", answer
    finally:
        await locker.close()
        await store.close()
