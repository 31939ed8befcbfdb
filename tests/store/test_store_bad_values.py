"""Text and numbers a store column cannot keep the same way on both stores are bad input: a
``ValueError`` naming the field, nothing written, on SQLite and PostgreSQL alike (docs/store.md,
"Bad input"). Real SQLite files and a real PostgreSQL.

Before:
- a NUL character in a text the store keeps in a column of its own (a session id, an idTag, a
  station event's code, a processed event id, a meta value, a charger id in a setpoint or meter
  sample) was stored by SQLite and refused by PostgreSQL with the driver's DataError, which the
  API answers INTERNAL (a bug), so an edge on PostgreSQL lost what one on SQLite kept;
- a lone surrogate (what ``json.loads`` makes of ``"\\ud800"``) raised a bare UnicodeEncodeError
  naming no field;
- a NaN or infinite time or quantity of a session, a processed id or a confirmation: SQLite
  turned NaN into NULL (a departure of NaN came back as no departure at all, a confirmation time
  as none) or failed a NOT NULL constraint (IntegrityError, a bug), PostgreSQL kept NaN (a
  processed id stamped NaN was never purged: NaN sorts above every time there).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest
from evcore.audit.chain import seal
from evcore.audit.log import build_record
from evcore.store import SessionRecord, SqlStore
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.meter_pb2 import MeterSample
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.station_event_pb2 import StationEvent, StationEventKind
from evcore.v1.transaction_pb2 import TransactionEvent, TransactionEventKind
from google.protobuf.timestamp_pb2 import Timestamp

T0 = 1_767_225_600.0
NUL = "\x00"
SURROGATE = "\ud800"


def _ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def _tx(**kw: object) -> TransactionEvent:
    ev = TransactionEvent(charger_id="C1", transaction_id="T1", **kw)  # type: ignore[arg-type]
    if not ev.kind:
        ev.kind = TransactionEventKind.TRANSACTION_EVENT_KIND_STARTED
    ev.occurred_at.CopyFrom(_ts(T0))
    return ev


def _sample(charger: str) -> MeterSample:
    s = MeterSample(charger_id=charger, current_a=[1.0])
    s.sampled_at.CopyFrom(_ts(T0))
    return s


def _station_event(code: str) -> StationEvent:
    ev = StationEvent(station_id="C1", kind=StationEventKind.STATION_EVENT_KIND_SECURITY, code=code)
    ev.occurred_at.CopyFrom(_ts(T0))
    return ev


def _audit(charger: str) -> AuditRecord:
    record = build_record(
        AuditRecord(
            decision_id="D0",
            trigger="tick",
            decided_at=_ts(T0),
            setpoints=[Setpoint(charger_id=charger, setpoint_a=6.0, reason="minimum")],
        ),
        now_s=T0,
    )
    return seal(record, seq=0, prev_hash="")


Case = Callable[[SqlStore], Awaitable[object]]
CASES: dict[str, tuple[Case, str]] = {
    "session id NUL": (
        lambda s: s.upsert_session(SessionRecord("S" + NUL, "C1", T0)),
        "session_id",
    ),
    "session id surrogate": (
        lambda s: s.upsert_session(SessionRecord("S" + SURROGATE, "C1", T0)),
        "session_id",
    ),
    "session id_tag NUL": (
        lambda s: s.upsert_session(SessionRecord("S1", "C1", T0, id_tag="A" + NUL)),
        "id_tag",
    ),
    "session start NaN": (
        lambda s: s.upsert_session(SessionRecord("S1", "C1", math.nan)),
        "started_at_s",
    ),
    "session departure NaN": (
        lambda s: s.upsert_session(SessionRecord("S1", "C1", T0, departure_s=math.nan)),
        "departure_s",
    ),
    "session energy infinite": (
        lambda s: s.upsert_session(SessionRecord("S1", "C1", T0, energy_requested_kwh=math.inf)),
        "energy_requested_kwh",
    ),
    "session priority NaN": (
        lambda s: s.upsert_session(SessionRecord("S1", "C1", T0, priority=math.nan)),
        "priority",
    ),
    "transaction id_tag NUL": (
        lambda s: s.record_transaction(_tx(id_tag="A" + NUL)),
        "id_tag",
    ),
    "transaction stop reason NUL": (
        lambda s: s.record_transaction(
            _tx(kind=TransactionEventKind.TRANSACTION_EVENT_KIND_ENDED, stop_reason="x" + NUL)
        ),
        "stop_reason",
    ),
    "meter sample charger NUL": (
        lambda s: s.append_meter_samples([_sample("C1"), _sample("C" + NUL)]),
        "charger_id",
    ),
    "station event code NUL": (
        lambda s: s.record_station_event(_station_event("x" + NUL)),
        "code",
    ),
    "processed id NUL": (lambda s: s.mark_processed("edge", "e" + NUL, T0), "event_id"),
    "processed at NaN": (lambda s: s.mark_processed("edge", "e1", math.nan), "at_s"),
    "meta value NUL": (lambda s: s.set_meta("k", "v" + NUL), "value"),
    "setpoint decision id NUL": (
        lambda s: s.add_setpoints(
            [(Setpoint(charger_id="C1", decision_id="D" + NUL, setpoint_a=6.0), T0)]
        ),
        "decision_id",
    ),
    "confirmation at NaN": (
        lambda s: s.confirm_setpoints([("C1", "D1", math.nan)]),
        "confirmed_at_s",
    ),
    "audit setpoint charger NUL": (lambda s: s.append_audit(_audit("C" + NUL)), "charger_id"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_value_no_store_keeps_alike_is_a_value_error_naming_the_field(
    store: SqlStore, case: str
) -> None:
    call, field = CASES[case]
    await store.add_setpoints([(Setpoint(charger_id="C1", decision_id="D1", setpoint_a=6.0), T0)])
    with pytest.raises(ValueError, match=field) as err:
        await call(store)
    assert "nothing was stored" in str(err.value)
    # Nothing of it was written.
    assert await store.list_sessions() == []
    assert await store.list_open_transactions() == []
    assert await store.meter_samples("C1") == []
    assert await store.station_events() == []
    assert not await store.is_processed("edge", "e1")
    assert await store.get_meta("k") is None
    assert await store.audit_head() is None
    last = await store.last_setpoints()
    assert list(last) == ["C1"] and last["C1"].setpoint.decision_id == "D1"
    assert not last["C1"].confirmed


async def test_a_purge_before_nan_is_refused_not_everything_or_nothing(store: SqlStore) -> None:
    """Before: ``t_s < NaN`` held for every row on PostgreSQL (NaN sorts above every number),
    so a purge with a NaN cutoff removed all telemetry and every processed id; SQLite (NaN as
    NULL) removed none."""
    await store.append_meter_samples([_sample("C1")])
    await store.mark_processed("edge", "e1", T0)
    for purge in (store.purge_telemetry, store.purge_expired, store.purge_processed):
        with pytest.raises(ValueError, match="must be a finite number"):
            await purge(math.nan)
    assert len(await store.meter_samples("C1")) == 1
    assert await store.is_processed("edge", "e1")


READS: dict[str, tuple[Callable[[SqlStore], Awaitable[object]], object]] = {
    "get_session": (lambda s: s.get_session("S" + NUL), None),
    "list_open_sessions": (lambda s: s.list_open_sessions("C" + NUL), []),
    "get_transaction": (lambda s: s.get_transaction("C1", "T" + NUL), None),
    "transaction_events": (lambda s: s.transaction_events("C" + NUL, "T1"), []),
    "last_setpoint": (lambda s: s.last_setpoint("C" + NUL), None),
    "meter_samples": (lambda s: s.meter_samples("C" + NUL), []),
    "status_history": (lambda s: s.status_history("C" + NUL), []),
    "station_events": (lambda s: s.station_events("C" + NUL), []),
    "audit_records": (lambda s: s.audit_records(charger_id="C" + NUL), []),
    "get_meta": (lambda s: s.get_meta("k" + NUL), None),
    "is_processed": (lambda s: s.is_processed("edge", "e" + NUL), False),
}


@pytest.mark.parametrize("read", list(READS))
async def test_a_lookup_by_a_key_holding_a_nul_finds_nothing_on_both_stores(
    store: SqlStore, read: str
) -> None:
    """No stored key holds a NUL (PostgreSQL never took one; now neither store does), so a
    lookup by one (an API caller's charger_id filter) finds nothing. Before: PostgreSQL raised
    the driver's DataError (the API: INTERNAL), SQLite found nothing."""
    call, empty = READS[read]
    assert await call(store) == empty
