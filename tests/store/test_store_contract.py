"""One suite, both stores: every test runs on the embedded SQLite store and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
from evcore.audit import AuditLog, Decision, verify_chain
from evcore.clock import ManualClock
from evcore.store import (
    AuditChainConflict,
    SessionRecord,
    SqlStore,
    Store,
    StoreConfigError,
    StoreUnavailable,
    open_store,
    open_store_url,
    run_retention,
)
from evcore.store.migrations import POSTGRES, SQLITE_RECORDS
from evcore.store.sqlite import SqliteBackend
from evcore.v1.audit_pb2 import AuditRecord, ChargerBinding
from evcore.v1.meter_pb2 import MeterSample
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.station_event_pb2 import StationEvent, StationEventKind
from evcore.v1.status_pb2 import ChargerStatus, ConnectorState
from evcore.v1.transaction_pb2 import TransactionEvent, TransactionEventKind
from google.protobuf.timestamp_pb2 import Timestamp

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
T0 = 1_767_225_600.0
K = TransactionEventKind


def ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.seconds = int(seconds)
    t.nanos = round((seconds - int(seconds)) * 1e9)
    return t


def tx_event(
    kind: int, charger: str = "C1", tx: str = "T1", at: float = T0, **kw: object
) -> TransactionEvent:
    ev = TransactionEvent(charger_id=charger, transaction_id=tx, kind=kind, **kw)  # type: ignore[arg-type]
    ev.occurred_at.CopyFrom(ts(at))
    return ev


def sample(charger: str, at: float, amps: float) -> MeterSample:
    s = MeterSample(
        charger_id=charger, current_a=[amps, amps, amps], energy_register_wh=1000 + at - T0
    )
    s.sampled_at.CopyFrom(ts(at))
    return s


def status(charger: str, at: float, state: int) -> ChargerStatus:
    s = ChargerStatus(charger_id=charger, state=state, connected=True)  # type: ignore[arg-type]
    s.reported_at.CopyFrom(ts(at))
    return s


async def test_migrations_are_versioned_and_reopening_keeps_data(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    latest = (
        POSTGRES[-1].version if store_section["kind"] == "postgres" else SQLITE_RECORDS[-1].version
    )
    assert await store.schema_version() == latest
    await store.upsert_session(SessionRecord("S1", "C1", T0))
    await store.close()
    again = open_store(store_section, tmp_path)
    await again.open()
    try:
        assert await again.schema_version() == latest
        got = await again.get_session("S1")
        assert got is not None and got.charger_id == "C1"
    finally:
        await again.close()


async def test_sessions_upsert_get_and_list_open(store: SqlStore) -> None:
    await store.upsert_session(SessionRecord("S1", "C1", T0, transaction_id="T1", priority=1))
    await store.upsert_session(SessionRecord("S2", "C2", T0 + 60, departure_s=T0 + 3600))
    await store.upsert_session(SessionRecord("S3", "C3", T0 + 120, ended_at_s=T0 + 500))
    # An update replaces every field.
    await store.upsert_session(
        SessionRecord("S1", "C1", T0, transaction_id="T1", priority=5, energy_requested_kwh=20.0)
    )
    s1 = await store.get_session("S1")
    assert s1 is not None
    assert (s1.priority, s1.energy_requested_kwh, s1.is_open) == (5, 20.0, True)
    assert await store.get_session("nope") is None
    open_ids = [s.session_id for s in await store.list_open_sessions()]
    assert open_ids == ["S1", "S2"]
    assert [s.session_id for s in await store.list_open_sessions("C2")] == ["S2"]
    recent = await store.list_sessions(since_s=T0 + 30)
    assert [s.session_id for s in recent] == ["S3", "S2"]
    assert len(await store.list_sessions(limit=1)) == 1
    with pytest.raises(ValueError, match="session_id"):
        await store.upsert_session(SessionRecord("", "C1", T0))


async def test_transactions_are_idempotent_by_charger_and_id(store: SqlStore) -> None:
    start = tx_event(K.TRANSACTION_EVENT_KIND_STARTED, id_tag="TAG", meter_start_wh=1000.0)
    assert await store.record_transaction(start) is True
    # A reconnect repeats the same start: stored once.
    assert await store.record_transaction(start) is False
    upd = tx_event(K.TRANSACTION_EVENT_KIND_UPDATED, at=T0 + 60, seq_no=2)
    assert await store.record_transaction(upd) is True
    # The same transaction id on another charger is another transaction.
    assert await store.record_transaction(tx_event(K.TRANSACTION_EVENT_KIND_STARTED, charger="C2"))
    opened = await store.list_open_transactions()
    assert [(t.charger_id, t.transaction_id) for t in opened] == [("C1", "T1"), ("C2", "T1")]
    end = tx_event(
        K.TRANSACTION_EVENT_KIND_ENDED,
        at=T0 + 3600,
        meter_stop_wh=12_000.0,
        stop_reason="EVDisconnected",
    )
    assert await store.record_transaction(end) is True
    assert await store.record_transaction(end) is False
    t = await store.get_transaction("C1", "T1")
    assert t is not None
    assert t.started_at_s == pytest.approx(T0)
    assert t.ended_at_s == pytest.approx(T0 + 3600)
    assert t.energy_wh == pytest.approx(11_000.0)
    assert (t.id_tag, t.stop_reason, t.event_count, t.is_open) == (
        "TAG",
        "EVDisconnected",
        3,
        False,
    )
    events = await store.transaction_events("C1", "T1")
    assert [e.kind for e in events] == [
        K.TRANSACTION_EVENT_KIND_STARTED,
        K.TRANSACTION_EVENT_KIND_UPDATED,
        K.TRANSACTION_EVENT_KIND_ENDED,
    ]
    assert [(t.charger_id) for t in await store.list_open_transactions()] == ["C2"]


async def test_offline_replay_out_of_order_keeps_earliest_start(store: SqlStore) -> None:
    # The end arrives before the start (offline queue replay): the start time is still the start's.
    await store.record_transaction(
        tx_event(K.TRANSACTION_EVENT_KIND_ENDED, at=T0 + 900, meter_stop_wh=5.0)
    )
    await store.record_transaction(
        tx_event(K.TRANSACTION_EVENT_KIND_STARTED, at=T0, meter_start_wh=1.0)
    )
    t = await store.get_transaction("C1", "T1")
    assert (
        t is not None and t.started_at_s == pytest.approx(T0) and t.energy_wh == pytest.approx(4.0)
    )


async def test_bad_transaction_event_is_refused_and_nothing_stored(store: SqlStore) -> None:
    with pytest.raises(ValueError, match="no kind"):
        await store.record_transaction(tx_event(K.TRANSACTION_EVENT_KIND_UNSPECIFIED))
    no_time = TransactionEvent(
        charger_id="C1", transaction_id="T9", kind=K.TRANSACTION_EVENT_KIND_STARTED
    )
    with pytest.raises(ValueError, match="occurred_at"):
        await store.record_transaction(no_time)
    with pytest.raises(ValueError, match="charger_id"):
        await store.record_transaction(tx_event(K.TRANSACTION_EVENT_KIND_STARTED, charger=""))
    assert await store.list_open_transactions() == []


async def test_setpoints_last_sent_and_confirmation(store: SqlStore) -> None:
    sp = Setpoint(charger_id="C1", setpoint_a=16.0, decision_id="D1", reason="held at 16 A")
    await store.record_setpoint_sent(sp, T0)
    last = await store.last_setpoint("C1")
    assert last is not None and last.setpoint.setpoint_a == 16.0 and not last.confirmed
    # A confirmation for an older decision does not confirm the newer setpoint.
    assert await store.confirm_setpoint("C1", "D0", T0 + 1) is False
    assert await store.confirm_setpoint("C1", "D1", T0 + 2) is True
    last = await store.last_setpoint("C1")
    assert last is not None and last.confirmed and last.confirmed_at_s == pytest.approx(T0 + 2)
    # A new setpoint is unconfirmed again.
    await store.record_setpoint_sent(
        Setpoint(charger_id="C1", setpoint_a=10.0, decision_id="D2"), T0 + 5
    )
    await store.record_setpoint_sent(
        Setpoint(charger_id="DC1", setpoint_w=50_000.0, decision_id="D2"), T0 + 5
    )
    all_last = await store.last_setpoints()
    assert sorted(all_last) == ["C1", "DC1"]
    assert all_last["C1"].setpoint.setpoint_a == 10.0 and not all_last["C1"].confirmed
    assert all_last["DC1"].setpoint.setpoint_w == 50_000.0
    with pytest.raises(ValueError, match="neither setpoint_a nor setpoint_w"):
        await store.record_setpoint_sent(Setpoint(charger_id="C2", decision_id="D3"), T0)
    assert await store.last_setpoint("C2") is None


async def test_setpoints_of_a_decision_are_added_in_one_batch(store: SqlStore) -> None:
    await store.record_setpoint_sent(
        Setpoint(charger_id="C0", setpoint_a=32.0, decision_id="D0"), T0 - 10
    )
    assert await store.confirm_setpoint("C0", "D0", T0 - 9) is True
    # 1200 chargers: more rows than one multi-row statement holds (chunks within one commit).
    batch = [
        (Setpoint(charger_id=f"C{i}", setpoint_a=6.0 + i % 26, decision_id="D1"), T0 + i / 1000)
        for i in range(1200)
    ]
    batch.append((Setpoint(charger_id="DC1", setpoint_w=50_000.0, decision_id="D1"), T0))
    # A charger named twice keeps the later one, as two single calls would.
    batch.append((Setpoint(charger_id="C5", setpoint_a=7.5, decision_id="D1"), T0 + 2))
    assert await store.add_setpoints(batch) == 1201
    assert await store.add_setpoints([]) == 0
    last = await store.last_setpoints()
    assert len(last) == 1201
    assert last["C0"].setpoint.setpoint_a == 6.0 and not last["C0"].confirmed
    assert last["C0"].confirmed_at_s is None  # the new setpoint replaced the confirmed one
    assert last["C1199"].setpoint.setpoint_a == 6.0 + 1199 % 26
    assert last["C1199"].sent_at_s == pytest.approx(T0 + 1.199)
    assert last["C5"].setpoint.setpoint_a == 7.5 and last["C5"].sent_at_s == pytest.approx(T0 + 2)
    assert last["DC1"].setpoint.setpoint_w == 50_000.0
    # Confirmations in one batch: only those still naming the charger's last decision count.
    got = await store.confirm_setpoints(
        [("C1", "D1", T0 + 5), ("C2", "D0", T0 + 5), ("C3", "D1", T0 + 6), ("nope", "D1", T0)]
    )
    assert got == 2
    last = await store.last_setpoints()
    assert last["C1"].confirmed and last["C1"].confirmed_at_s == pytest.approx(T0 + 5)
    assert last["C3"].confirmed and not last["C2"].confirmed
    assert await store.confirm_setpoints([]) == 0
    # One bad pair refuses the whole batch: nothing of it is stored.
    for bad, match in (
        (Setpoint(charger_id="C1", decision_id="D2"), "#1 .*neither setpoint_a nor setpoint_w"),
        (Setpoint(charger_id="", setpoint_a=6.0, decision_id="D2"), r"charger_id \(#1\)"),
    ):
        with pytest.raises(ValueError, match=match):
            await store.add_setpoints(
                [(Setpoint(charger_id="C9", setpoint_a=9.0, decision_id="D2"), T0 + 9), (bad, T0)]
            )
    with pytest.raises(ValueError, match="finite"):
        await store.add_setpoints(
            [(Setpoint(charger_id="C9", setpoint_a=9.0, decision_id="D2"), float("nan"))]
        )
    c9 = await store.last_setpoint("C9")
    assert c9 is not None and c9.setpoint.decision_id == "D1" and c9.confirmed is False


async def test_telemetry_append_query_and_retention(store: SqlStore) -> None:
    n = await store.append_meter_samples(sample("C1", T0 + i, float(i)) for i in range(10))
    assert n == 10
    await store.append_meter_samples([sample("C2", T0 + 5, 7.0)])
    got = await store.meter_samples("C1", since_s=T0 + 3, until_s=T0 + 6)
    assert [s.current_a[0] for s in got] == [3.0, 4.0, 5.0]
    assert len(await store.meter_samples("C1", limit=4)) == 4
    assert [s.charger_id for s in await store.meter_samples("C2")] == ["C2"]
    # A batch with one bad sample is refused whole.
    bad = [sample("C1", T0 + 100, 1.0), MeterSample(current_a=[1.0])]
    with pytest.raises(ValueError, match="#1 has no charger_id"):
        await store.append_meter_samples(bad)
    assert len(await store.meter_samples("C1")) == 10
    # Retention: purge what is older than now - retention.
    removed = await store.purge_expired(T0 + 5 + store.telemetry_retention_s)
    assert removed == 5
    assert [s.current_a[0] for s in await store.meter_samples("C1")] == [5.0, 6.0, 7.0, 8.0, 9.0]


async def test_a_resent_meter_sample_or_status_is_stored_once(store: SqlStore) -> None:
    first = sample("C1", T0, 10.0)
    first.received_at.CopyFrom(ts(T0 + 1))
    assert await store.append_meter_samples([first]) == 1
    # The station's resend after a lost answer: the same sample, received later; and a batch
    # holding the same sample twice beside a new one.
    again = sample("C1", T0, 10.0)
    again.received_at.CopyFrom(ts(T0 + 31))
    assert await store.append_meter_samples([again]) == 0
    later = sample("C1", T0 + 10, 11.0)
    assert await store.append_meter_samples([later, later, sample("C2", T0, 5.0)]) == 2
    got = await store.meter_samples("C1")
    assert [(s.current_a[0], s.received_at.seconds) for s in got] == [
        (10.0, int(T0 + 1)),
        (11.0, 0),
    ]
    assert len(await store.meter_samples("C2")) == 1
    # Statuses: the same status at the same time is history once; a different status at the
    # same time (two notifications within one second's stamp) is history too.
    charging = ConnectorState.CONNECTOR_STATE_CHARGING
    for received in (T0 + 1, T0 + 31):
        st = status("C1", T0, ConnectorState.CONNECTOR_STATE_PREPARING)
        st.received_at.CopyFrom(ts(received))
        await store.record_status(st)
    await store.record_status(status("C1", T0, charging))
    history = await store.status_history("C1")
    assert sorted(h.state for h in history) == [ConnectorState.CONNECTOR_STATE_PREPARING, charging]


async def test_upgrading_keeps_one_of_each_meter_sample_stored_twice(
    store: SqlStore, store_section: dict[str, object], tmp_path: Path
) -> None:
    # The schema before the key, holding a sample stored twice (the old store's resend bug).
    version = 5 if store_section["kind"] == "postgres" else 2
    await store.append_meter_samples([sample("C1", T0, 1.0), sample("C1", T0 + 1, 2.0)])

    def downgrade(tx: Any) -> None:
        tx.execute("DROP INDEX meter_samples_key")
        tx.execute("CREATE INDEX meter_samples_charger_time ON meter_samples (charger_id, t_s)")
        tx.execute("DELETE FROM schema_migrations WHERE version = ?", (version,))

    await store._run(store._telemetry, downgrade)
    await store._run(
        store._telemetry,
        lambda tx: tx.insert_many(
            "meter_samples",
            ("charger_id", "t_s", "payload"),
            [("C1", T0, sample("C1", T0, 1.0).SerializeToString())],
        ),
    )
    assert len(await store.meter_samples("C1")) == 3
    await store.close()
    again = open_store(store_section, tmp_path)
    await again.open()
    try:
        assert [s.current_a[0] for s in await again.meter_samples("C1")] == [1.0, 2.0]
        assert await again.append_meter_samples([sample("C1", T0, 1.0)]) == 0
    finally:
        await again.close()


async def test_status_history_and_latest(store: SqlStore) -> None:
    await store.record_status(status("C1", T0, ConnectorState.CONNECTOR_STATE_AVAILABLE))
    await store.record_status(status("C1", T0 + 10, ConnectorState.CONNECTOR_STATE_CHARGING))
    # A late, older status is history but does not replace the latest.
    await store.record_status(status("C1", T0 + 5, ConnectorState.CONNECTOR_STATE_PREPARING))
    latest = await store.latest_statuses()
    assert latest["C1"].state == ConnectorState.CONNECTOR_STATE_CHARGING
    hist = await store.status_history("C1")
    assert [h.state for h in hist] == [
        ConnectorState.CONNECTOR_STATE_AVAILABLE,
        ConnectorState.CONNECTOR_STATE_PREPARING,
        ConnectorState.CONNECTOR_STATE_CHARGING,
    ]
    assert await store.purge_telemetry(T0 + 7) == 2
    assert len(await store.status_history("C1")) == 1
    assert "C1" in await store.latest_statuses()  # the latest survives the purge
    with pytest.raises(ValueError, match="neither reported_at nor received_at"):
        await store.record_status(ChargerStatus(charger_id="C1"))


def _sealed(seq: int, prev: str, decision: str, chargers: list[str]) -> AuditRecord:
    r = AuditRecord(seq=seq, prev_hash=prev, decision_id=decision, trigger="tick", hash=f"h{seq}")
    r.decided_at.CopyFrom(ts(T0 + seq))
    for c in chargers:
        r.setpoints.append(Setpoint(charger_id=c, setpoint_a=6.0, reason="r"))
    r.bindings.append(ChargerBinding(charger_id="C9", reason="no session"))
    return r


async def test_audit_append_extends_head_only(store: SqlStore) -> None:
    assert await store.audit_head() is None
    await store.append_audit(_sealed(0, "", "D0", ["C1"]))
    await store.append_audit(_sealed(1, "h0", "D1", ["C2"]))
    head = await store.audit_head()
    assert head is not None and (head.seq, head.hash) == (1, "h1")
    # A retry of the committed append is a no-op.
    await store.append_audit(_sealed(1, "h0", "D1", ["C2"]))
    with pytest.raises(AuditChainConflict):
        await store.append_audit(_sealed(1, "h0", "D1b", ["C2"]))  # seq already taken
    with pytest.raises(AuditChainConflict):
        await store.append_audit(_sealed(2, "wrong", "D2", ["C2"]))  # does not link to the head
    with pytest.raises(AuditChainConflict):
        await store.append_audit(_sealed(2, "h1", "D0", ["C2"]))  # decision id reused
    with pytest.raises(ValueError, match="not sealed"):
        r = _sealed(2, "h1", "D2", [])
        r.hash = ""
        await store.append_audit(r)
    head = await store.audit_head()
    assert head is not None and head.seq == 1
    assert [r.decision_id for r in await store.audit_records(charger_id="C1")] == ["D0"]
    assert [r.decision_id for r in await store.audit_records(charger_id="C9")] == ["D0", "D1"]
    assert [r.decision_id for r in await store.audit_records(newest_first=True, limit=1)] == ["D1"]
    assert [r.decision_id for r in await store.audit_records(since_s=T0 + 0.5)] == ["D1"]
    rows = await store.audit_rows(after_seq=0)
    assert [(r.seq, r.prev_hash) for r in rows] == [(1, "h0")]


def station_event(
    station: str, kind: int, code: str, *, at: float | None = None, received: float = T0
) -> StationEvent:
    ev = StationEvent(station_id=station, kind=kind, code=code, ocpp_version="2.0.1")  # type: ignore[arg-type]
    if at is not None:
        ev.occurred_at.CopyFrom(ts(at))
    ev.received_at.CopyFrom(ts(received))
    return ev


async def test_station_events_are_idempotent_and_queried(store: SqlStore) -> None:
    SK = StationEventKind
    tamper = station_event(
        "CP.1", SK.STATION_EVENT_KIND_SECURITY, "TamperDetectionActivated", at=T0
    )
    tamper.tech_info = "lid open"
    assert await store.record_station_event(tamper) is True
    # The station replays it after a reconnect: stored once.
    assert await store.record_station_event(tamper) is False
    # A status notification has no time of its own: the receive time keys it.
    fw = station_event("CP.1", SK.STATION_EVENT_KIND_FIRMWARE_STATUS, "Installed", received=T0 + 5)
    fw.request_id = 7
    assert await store.record_station_event(fw) is True
    log = station_event("CP-2", SK.STATION_EVENT_KIND_LOG_STATUS, "Uploaded", received=T0 + 10)
    assert await store.record_station_event(log) is True
    everything = await store.station_events()
    assert [(e.station_id, e.code) for e in everything] == [
        ("CP.1", "TamperDetectionActivated"),
        ("CP.1", "Installed"),
        ("CP-2", "Uploaded"),
    ]
    assert everything[0] == tamper and everything[0].tech_info == "lid open"
    assert everything[1].HasField("request_id") and everything[1].request_id == 7
    assert not everything[2].HasField("request_id")
    assert [e.code for e in await store.station_events("CP.1")] == [
        "TamperDetectionActivated",
        "Installed",
    ]
    security = await store.station_events(kind=SK.STATION_EVENT_KIND_SECURITY)
    assert [e.code for e in security] == ["TamperDetectionActivated"]
    assert [e.code for e in await store.station_events(since_s=T0 + 1, until_s=T0 + 10)] == [
        "Installed"
    ]
    assert len(await store.station_events(limit=2)) == 2
    # Station events are records, not telemetry: a telemetry purge keeps them.
    await store.purge_telemetry(T0 + 3600)
    assert len(await store.station_events()) == 3
    with pytest.raises(ValueError, match="station_id"):
        await store.record_station_event(station_event("", SK.STATION_EVENT_KIND_SECURITY, "x"))
    with pytest.raises(ValueError, match="no kind"):
        await store.record_station_event(station_event("CP.1", 0, "x"))
    with pytest.raises(ValueError, match="neither occurred_at nor received_at"):
        await store.record_station_event(
            StationEvent(station_id="CP.1", kind=SK.STATION_EVENT_KIND_SECURITY, code="x")
        )
    assert len(await store.station_events()) == 3


async def test_an_older_schema_is_upgraded_keeping_its_data(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    """A store created before its last two migrations (SQLite records: station events and the
    audit index; PostgreSQL: the audit index and the meter sample key) gains them on the next
    open, and what it held stays readable and verifiable."""
    old = open_store(store_section, tmp_path)
    newest = old._records.migrations()
    for backend in (old._records, old._telemetry):  # PostgreSQL: both run the one list
        if backend.migrations() is newest:
            backend.migrations = lambda: newest[:-2]  # type: ignore[method-assign]
    await old.open()
    try:
        assert await old.schema_version() == newest[-3].version
        await old.upsert_session(SessionRecord("S1", "C1", T0))
        log = AuditLog(old, clock=ManualClock())
        for i in range(3):
            sp = Setpoint(charger_id=f"C{i}", setpoint_a=6.0, reason="held at 6 A: minimum")
            await log.append(Decision(f"D{i}", "tick", decided_at_s=T0 + i, setpoints=[sp]))
    finally:
        await old.close()
    new = open_store(store_section, tmp_path)
    await new.open()
    try:
        assert await new.schema_version() == newest[-1].version
        assert (await new.get_session("S1")) is not None
        ev = station_event("CP.1", StationEventKind.STATION_EVENT_KIND_SECURITY, "x", at=T0)
        assert await new.record_station_event(ev) is True
        assert await new.station_events() == [ev]
        assert await new.audit_charger_index(after_seq=-1, upto_seq=9) == {
            0: ["C0"],
            1: ["C1"],
            2: ["C2"],
        }
        report = await verify_chain(new)
        assert report.ok and report.records == 3, report.problems
    finally:
        await new.close()


async def test_processed_ids_and_meta(store: SqlStore) -> None:
    assert await store.mark_processed("edge", "ev-1", T0) is True
    assert await store.mark_processed("edge", "ev-1", T0 + 1) is False
    assert await store.mark_processed("cloud", "ev-1", T0) is True
    assert await store.is_processed("edge", "ev-1")
    assert not await store.is_processed("edge", "ev-2")
    assert await store.purge_processed(T0 + 0.5) == 2
    assert not await store.is_processed("edge", "ev-1")
    assert await store.get_meta("k") is None
    await store.set_meta("k", "1")
    await store.set_meta("k", "2")
    assert await store.get_meta("k") == "2"


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(StoreConfigError, match="unknown key"):
        open_store({"kind": "embedded", "pth": "x"}, tmp_path)
    with pytest.raises(StoreConfigError, match="kind must be"):
        open_store({"kind": "mongo"}, tmp_path)
    with pytest.raises(StoreConfigError, match="needs dsn"):
        open_store({"kind": "postgres"}, tmp_path)
    with pytest.raises(StoreConfigError, match="telemetry_retention_s"):
        open_store({"telemetry_retention_s": -1}, tmp_path)
    with pytest.raises(StoreConfigError, match="schema"):
        open_store({"kind": "postgres", "dsn": "host=x", "schema": "a; drop"}, tmp_path)
    with pytest.raises(StoreConfigError, match="scheme"):
        open_store_url("mysql://x/y")
    s = open_store({"path": "var/s"}, tmp_path)
    assert s.description == f"sqlite:{tmp_path / 'var/s'}"
    pg = open_store_url("postgresql://postgres@127.0.0.1:5432/test?schema=abc")
    assert pg.description.endswith("/test#abc")


async def test_read_only_tools_do_not_create_a_store(tmp_path: Path) -> None:
    s = open_store_url(str(tmp_path / "missing"), must_exist=True)
    with pytest.raises(StoreUnavailable, match="no embedded store"):
        await s.open()
    assert not (tmp_path / "missing").exists()


async def test_unreachable_postgres_is_a_clear_error(tmp_path: Path) -> None:
    s = open_store(
        {
            "kind": "postgres",
            "dsn": "host=127.0.0.1 port=1 user=postgres dbname=test",
            "connect_timeout_s": 1,
        },
        tmp_path,
    )
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await s.open()
    await s.close()


def terminate_backends(schema: str) -> int:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
            (f"evcore-store:{schema}:%",),
        ).fetchall()
    return len(rows)


async def test_postgres_connection_dropped_by_the_server_is_reopened(
    pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="evcore.store")
    s = open_store({"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}, tmp_path)
    await s.open()
    try:
        await s.upsert_session(SessionRecord("S1", "C1", T0))
        assert terminate_backends(pg_schema) >= 1  # e.g. a database restart while the edge idles
        await s.upsert_session(SessionRecord("S2", "C1", T0 + 1))
        assert [x.session_id for x in await s.list_open_sessions()] == ["S1", "S2"]
        assert "connection lost while idle; reconnected" in caplog.text
    finally:
        await s.close()


async def test_retention_task_purges_on_the_edge_clock(store: SqlStore) -> None:
    assert isinstance(store, Store)
    clock = ManualClock(start=T0)
    await store.append_meter_samples([sample("C1", T0 + i * 3600, float(i)) for i in range(5)])
    await store.mark_processed("edge", "old", T0)
    task = asyncio.create_task(run_retention(store, clock, every_s=3600, processed_ids_keep_s=60))
    try:
        for _ in range(100):  # the first round runs at once
            if not await store.is_processed("edge", "old"):
                break
            await asyncio.sleep(0.01)
        assert len(await store.meter_samples("C1")) == 5  # nothing older than the retention yet
        clock.advance(store.telemetry_retention_s + 2 * 3600 + 1)  # wakes the task
        for _ in range(200):
            if len(await store.meter_samples("C1")) == 2:
                break
            await asyncio.sleep(0.01)
        assert [s.current_a[0] for s in await store.meter_samples("C1")] == [3.0, 4.0]
        assert not await store.is_processed("edge", "old")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_full_sqlite_store_says_it_is_full(tmp_path: Path) -> None:
    """Review of session 12: when SQLite rolls a transaction back by itself (SQLITE_FULL with
    the page cache spilled), the store's unconditional ROLLBACK raised "cannot rollback - no
    transaction is active", which hid the cause. (A page cap stands in for a full disk.)"""
    backend = SqliteBackend(tmp_path / "r.sqlite", synchronous="FULL", migrations=[], name="r")
    backend.connect()
    conn = backend._conn
    assert conn is not None
    conn.execute("CREATE TABLE t (x BLOB)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 3}")
    with pytest.raises(sqlite3.OperationalError, match="full"), backend.transaction() as tx:
        for _ in range(100):
            tx.execute("INSERT INTO t VALUES (?)", (b"x" * 4000,))
    assert isinstance(backend.on_error(sqlite3.OperationalError("full")), StoreUnavailable)
    # Nothing of it stayed, and the store goes on.
    with backend.transaction() as tx:
        assert tx.one("SELECT COUNT(*) FROM t") == (0,)
    backend.close()
