"""The SQL core shared by the embedded (SQLite) and PostgreSQL stores.

Each database connection is owned by one worker thread (a single-thread executor), so blocking
drivers (``sqlite3``, psycopg's synchronous connection) never block the event loop and one
connection never sees two transactions at once. Every public method is one transaction. SQL is
written once with ``?`` placeholders; the PostgreSQL backend rewrites them to ``%s``.

This module must never interpret a record beyond the keys it indexes by, and never rewrite one.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol, Self, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

from evcore.store.base import (
    AuditChainConflict,
    AuditHead,
    SessionRecord,
    SetpointRecord,
    StoredAuditRow,
    StoreError,
    StoreUnavailable,
    TransactionRecord,
)
from evcore.store.migrations import Migration, statements
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.meter_pb2 import MeterSample
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.station_event_pb2 import StationEvent, StationEventKind
from evcore.v1.status_pb2 import ChargerStatus
from evcore.v1.transaction_pb2 import TransactionEvent, TransactionEventKind

log = logging.getLogger("evcore.store")

T = TypeVar("T")
Row = tuple[Any, ...]
#: How much longer than ``read_timeout_s`` a caller waits for a read at most: time for the
#: backend's own bound to end it with a precise message (a PostgreSQL server's statement timeout,
#: then the connection dropped when the server does not answer at all); past it the caller gets
#: :class:`StoreUnavailable` even while the worker thread is still held (by a write waiting for a
#: lock, or I/O that hangs).
READ_GRACE_S = 1.0
# Bound parameters per multi-row INSERT (SQLite allows 32766, PostgreSQL 65535).
INSERT_CHUNK_PARAMS = 3000


class Cursor(Protocol):
    """The part of a DB-API cursor we use (placeholders already in the backend's style)."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx:
    """One transaction's cursor; SQL uses ``?`` placeholders whatever the backend."""

    def __init__(
        self, cursor: Cursor, translate: Callable[[str], str], *, copy: bool = False
    ) -> None:
        self._cur = cursor
        self._translate = translate
        # PostgreSQL: bulk rows go through COPY (one stream instead of parsing thousands of params).
        self._copy = copy

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(self._translate(sql), tuple(params))
        return int(self._cur.rowcount)

    def insert_many(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        """Multi-row ``INSERT … VALUES (…), (…)`` in chunks: one round trip per chunk, not per row
        (a 1000-charger decision is 2 statements, not 1000)."""
        if not rows:
            return
        if self._copy:
            cur: Any = self._cur
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return
        self._insert_values(table, columns, rows)

    def upsert_many(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        on_conflict: str,
    ) -> None:
        """Multi-row ``INSERT … VALUES (…), (…) ON CONFLICT …`` in chunks (never COPY, which
        cannot upsert). ``rows`` must not repeat a conflict key: PostgreSQL refuses to update
        one row twice in a statement."""
        if not rows:
            return
        self._insert_values(table, columns, rows, " " + on_conflict)

    def insert_new(
        self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], key: str
    ) -> list[Row]:
        """Multi-row ``INSERT … ON CONFLICT (key) DO NOTHING``: rows whose key is stored already
        (or comes earlier in ``rows``) are skipped. Returns the key columns of the rows inserted
        (``RETURNING key``), so that the caller can tell which rows met a stored one."""
        if not rows:
            return []
        tail = f" ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
        if self._copy:
            # PostgreSQL: COPY into a temporary twin, then one INSERT … SELECT (10,000 meter
            # samples: about 85 ms against 150 ms by multi-row INSERTs; 60 ms by COPY alone).
            temp = f"new_{table}"
            cols = ", ".join(columns)
            self._cur.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {temp} (LIKE {table}) ON COMMIT DELETE ROWS"
            )
            cur: Any = self._cur
            with cur.copy(f"COPY {temp} ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            self._cur.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM {temp}" + tail)
            return [tuple(r) for r in self._cur.fetchall()]
        inserted: list[Row] = []
        self._insert_values(table, columns, rows, tail, returned=inserted)
        return inserted

    def _insert_values(
        self,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        tail: str = "",
        *,
        returned: list[Row] | None = None,
    ) -> int:
        """Multi-row ``INSERT … VALUES (…), (…)`` + ``tail``, in chunks under the parameter cap;
        returns the rows the statements changed. With ``returned`` (``tail`` holding a
        ``RETURNING``), what each chunk returns is added to it."""
        width = len(columns)
        per_chunk = max(1, INSERT_CHUNK_PARAMS // width)
        head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
        one = "(" + ", ".join("?" * width) + ")"
        changed = 0
        for start in range(0, len(rows), per_chunk):
            chunk = rows[start : start + per_chunk]
            params = [v for row in chunk for v in row]
            sql = head + ", ".join([one] * len(chunk)) + tail
            self._cur.execute(self._translate(sql), params)
            if returned is not None:
                got = [tuple(r) for r in self._cur.fetchall()]
                returned.extend(got)
                changed += len(got)
            else:
                changed += max(0, int(self._cur.rowcount))
        return changed

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cur.execute(self._translate(sql), tuple(params))
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(self._translate(sql), tuple(params))
        return [tuple(r) for r in self._cur.fetchall()]


class Backend(abc.ABC):
    """One database connection, its thread, and how to open a transaction on it.

    ``read_timeout_s`` (None: unbounded) bounds a read (``transaction(read_only=True)``): the
    backend makes its own wait end about then, and :meth:`BackendStore._read` stops waiting
    ``READ_GRACE_S`` later whatever the worker thread is doing. ``write_timeout_s`` (None:
    unbounded) bounds a write the same way inside the backend (a lock wait, a server that does not
    answer), so that one write cannot hold the worker thread, and every call queued behind it,
    for long. A backend that cannot end a write's wait itself in every case
    (``caller_bounds_writes``: SQLite, whose file I/O may hang) has the caller stop waiting
    ``READ_GRACE_S`` after ``write_timeout_s`` (see :meth:`BackendStore._run`).
    ``open_timeout_s`` (None: unbounded) bounds opening (connecting, each migration's
    transaction) inside the backend, and :meth:`BackendStore.open` stops waiting for the whole
    ``READ_GRACE_S`` later whatever the worker thread is doing (file I/O that hangs)."""

    #: Whether the caller bounds a write's wait (``write_timeout_s`` plus ``READ_GRACE_S``): the
    #: backend's own bound does not cover everything a write may wait for (SQLite: file I/O).
    caller_bounds_writes = False

    def __init__(
        self,
        name: str,
        *,
        read_timeout_s: float | None = None,
        write_timeout_s: float | None = None,
        open_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        #: Writes whose caller stopped waiting while they ran (they may still commit, before any
        #: later write of this backend: one worker thread takes its calls in order); each is
        #: logged when it ends. Close does not wait for one still running.
        self.late_writes: set[concurrent.futures.Future[Any]] = set()
        self.read_timeout_s = read_timeout_s
        self.write_timeout_s = write_timeout_s
        self.open_timeout_s = open_timeout_s
        #: What opening is doing (for the message when it does not end in time).
        self.step = "connecting"
        #: Migrations found at open that this code does not know (version, name): see migrate.
        self.newer_migrations: list[tuple[int, str]] = []
        #: Opening did not end in time: the worker thread may be held for good, so ``close``
        #: does not wait for it.
        self.stuck = False
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"evcore-store-{name}")

    def bound_of(
        self, *, read_only: bool, bounded: bool, opening: bool
    ) -> tuple[str, float] | None:
        """The ``[store]`` key bounding a transaction and its value; None: unbounded."""
        if opening:
            return None if self.open_timeout_s is None else ("open_timeout_s", self.open_timeout_s)
        if not bounded:
            return None
        if read_only:
            return None if self.read_timeout_s is None else ("read_timeout_s", self.read_timeout_s)
        return None if self.write_timeout_s is None else ("write_timeout_s", self.write_timeout_s)

    @property
    def label(self) -> str:
        """The store as error messages name it (``SQLite store /var/…/records.sqlite``)."""
        return f"store {self.name}"

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the connection if it is not open (called in the worker thread)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def release(self) -> None:  # noqa: B027 (optional hook; most backends run nothing beside)
        """After the last ``close``: stop what the backend runs beside its worker thread."""

    @abc.abstractmethod
    def transaction(
        self, *, read_only: bool = False, bounded: bool = True, opening: bool = False
    ) -> contextlib.AbstractContextManager[Tx]:
        """One transaction; ``read_only`` promises the body only reads (it may then wait less
        for locks). ``bounded``: it waits at most ``read_timeout_s`` (a read) or
        ``write_timeout_s`` (a write) when set; ``opening`` (a migration): ``open_timeout_s``."""

    @abc.abstractmethod
    def migrations(self) -> Sequence[Migration]: ...

    @abc.abstractmethod
    def lock_for_migration(self, tx: Tx) -> None:
        """Keep other processes from migrating at the same time (inside the migration's tx)."""

    def on_error(self, exc: BaseException) -> BaseException:
        """Map a driver error to the store's errors (and drop a broken connection)."""
        return exc

    def migrate(self) -> int:
        """Connect and apply pending migrations, each in its own transaction (each waits at most
        ``open_timeout_s``); returns the schema version."""
        self.step = "connecting and creating schema_migrations"
        with self.transaction(opening=True) as tx:
            self.lock_for_migration(tx)
            tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
        version = 0
        for m in self.migrations():
            self.step = f"applying migration {m.version} ({m.name})"
            with self.transaction(opening=True) as tx:
                self.lock_for_migration(tx)
                if tx.one("SELECT 1 FROM schema_migrations WHERE version = ?", (m.version,)):
                    version = m.version
                    continue
                for stmt in statements(m.sql):
                    tx.execute(stmt)
                tx.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at)"
                    " VALUES (?, ?, CURRENT_TIMESTAMP)",
                    (m.version, m.name),
                )
                log.info("store %s: applied migration %d (%s)", self.name, m.version, m.name)
                version = m.version
        self.step = "checking for migrations of a newer evcore"
        known = max((m.version for m in self.migrations()), default=0)
        with self.transaction(read_only=True, opening=True) as tx:
            newer = tx.all(
                "SELECT version, name FROM schema_migrations WHERE version > ? ORDER BY version",
                (known,),
            )
        self.newer_migrations = [(int(r[0]), str(r[1])) for r in newer]
        self.step = "opened"
        return version

    def schema_version(self) -> int:
        with self.transaction(read_only=True) as tx:
            row = tx.one("SELECT MAX(version) FROM schema_migrations")
        return int(row[0]) if row and row[0] is not None else 0


def ts_s(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def ts_us(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _same_status(status: ChargerStatus, stored: bytes) -> bool:
    """``stored`` (a status_history payload) reports what ``status`` does, whenever received."""
    other = ChargerStatus.FromString(stored)
    other.received_at.CopyFrom(status.received_at)
    if not status.HasField("received_at"):
        other.ClearField("received_at")
    return other == status


def sample_time_s(msg: MeterSample | ChargerStatus) -> float:
    """When a sample/status happened: the charger's stamp, else the edge's receive time."""
    if isinstance(msg, MeterSample):
        if msg.HasField("sampled_at"):
            return ts_s(msg.sampled_at)
    elif msg.HasField("reported_at"):
        return ts_s(msg.reported_at)
    if msg.HasField("received_at"):
        return ts_s(msg.received_at)
    raise ValueError(
        f"{type(msg).__name__} for charger {msg.charger_id!r} has neither "
        f"{'sampled_at' if isinstance(msg, MeterSample) else 'reported_at'} nor received_at"
    )


#: A meter sample's optional measurements, merged one by one (``_merge_sample``).
_SAMPLE_SCALARS: tuple[
    Literal["power_w", "energy_register_wh", "offered_current_a", "offered_power_w", "soc_percent"],
    ...,
] = (
    "power_w",
    "energy_register_wh",
    "offered_current_a",
    "offered_power_w",
    "soc_percent",
)
#: Its per-phase measurements (NaN: that phase not measured).
_SAMPLE_PHASES = ("current_a", "voltage_v")


def _copy_sample(s: MeterSample) -> MeterSample:
    c = MeterSample()
    c.CopyFrom(s)
    return c


def _same_value(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _merge_sample(kept: MeterSample, new: MeterSample) -> tuple[bool, list[str]]:
    """Add to ``kept`` what ``new``, a reading of the same charger and time, measured and
    ``kept`` did not: a station may send one instant's register in one MeterValues and its phase
    currents in the next. A value both measured stays as ``kept`` has it (the first stored);
    each that differs is named in the list returned. Also takes the transaction and EVSE when
    ``kept`` names none. Returns whether ``kept`` changed, and the disagreements."""
    changed = False
    disagreements: list[str] = []
    for name in _SAMPLE_SCALARS:
        if not new.HasField(name):
            continue
        value = getattr(new, name)
        if not kept.HasField(name):
            setattr(kept, name, value)
            changed = True
        elif not _same_value(getattr(kept, name), value):
            disagreements.append(f"{name} {getattr(kept, name)!r} kept, {value!r} not")
    for per_phase in _SAMPLE_PHASES:
        mine = getattr(kept, per_phase)
        theirs = list(getattr(new, per_phase))
        for phase, value in enumerate(theirs):
            if math.isnan(value):
                continue
            if phase >= len(mine):
                mine.extend([math.nan] * (phase + 1 - len(mine)))
            if math.isnan(mine[phase]):
                mine[phase] = value
                changed = True
            elif mine[phase] != value:
                disagreements.append(f"{per_phase}[{phase}] {mine[phase]!r} kept, {value!r} not")
    if not kept.transaction_id and new.transaction_id:
        kept.transaction_id = new.transaction_id
        changed = True
    if not kept.evse_id and new.evse_id:
        kept.evse_id = new.evse_id
        changed = True
    return changed, disagreements


def _log_disagreements(kept: MeterSample, merged: tuple[bool, list[str]]) -> None:
    """Name a second reading of one instant that measured a value otherwise: the first is kept
    (one sample per charger and time); the bus has both."""
    if merged[1]:
        log.warning(
            "meter sample of %s at %s measured again otherwise: %s (one sample per charger and"
            " time; the first value stays)",
            kept.charger_id,
            sample_time_s(kept),
            "; ".join(merged[1]),
        )


def _opt(v: Any) -> float | None:
    return None if v is None else float(v)


_SESSION_COLS = (
    "session_id, charger_id, started_at_s, transaction_id, id_tag, departure_s,"
    " energy_requested_kwh, priority, meter_start_wh, energy_delivered_kwh, ended_at_s,"
    " updated_at_s"
)
_SETPOINT_COLS = (
    "charger_id",
    "decision_id",
    "payload",
    "sent_at_s",
    "confirmed",
    "confirmed_at_s",
)
_TX_COLS = (
    "charger_id, transaction_id, evse_id, id_tag, started_at_s, meter_start_wh, ended_at_s,"
    " meter_stop_wh, stop_reason, event_count"
)


def _session(row: Row) -> SessionRecord:
    return SessionRecord(
        session_id=row[0],
        charger_id=row[1],
        started_at_s=float(row[2]),
        transaction_id=row[3],
        id_tag=row[4],
        departure_s=_opt(row[5]),
        energy_requested_kwh=_opt(row[6]),
        priority=float(row[7]),
        meter_start_wh=_opt(row[8]),
        energy_delivered_kwh=float(row[9]),
        ended_at_s=_opt(row[10]),
        updated_at_s=float(row[11]),
    )


def _transaction(row: Row) -> TransactionRecord:
    return TransactionRecord(
        charger_id=row[0],
        transaction_id=row[1],
        evse_id=int(row[2]),
        id_tag=row[3],
        started_at_s=_opt(row[4]),
        meter_start_wh=_opt(row[5]),
        ended_at_s=_opt(row[6]),
        meter_stop_wh=_opt(row[7]),
        stop_reason=row[8],
        event_count=int(row[9]),
    )


def _setpoint(row: Row) -> SetpointRecord:
    sp = Setpoint()
    sp.ParseFromString(bytes(row[0]))
    return SetpointRecord(
        setpoint=sp, sent_at_s=float(row[1]), confirmed=bool(row[2]), confirmed_at_s=_opt(row[3])
    )


def _select(
    sql: str, filters: Sequence[tuple[str, Any]], order_by: str, limit: int | None
) -> tuple[str, list[Any]]:
    """``sql`` with a WHERE of every ``(clause, value)`` whose value is not None (each clause
    holds one ``?``), the ORDER BY and an optional LIMIT; returns the SQL and its parameters."""
    given = [(clause, value) for clause, value in filters if value is not None]
    params: list[Any] = [value for _, value in given]
    if given:
        sql += " WHERE " + " AND ".join(clause for clause, _ in given)
    sql += " ORDER BY " + order_by
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return sql, params


#: A purge deletes expired rows about this many at a time, each piece its own transaction.
PURGE_BATCH_ROWS = 10_000
#: An audit read is taken in pieces of at most this many records ...
AUDIT_PAGE_RECORDS = 256
#: ... and about this many payload bytes (at least one record), each piece a read of its own.
AUDIT_PAGE_BYTES = 1024 * 1024


def stored_audit_row(r: Sequence[Any]) -> StoredAuditRow:
    """An ``audit_records`` row (seq, decision_id, decided_at_s, prev_hash, hash, payload) as it
    is, for verification. A column holding a value of another type (SQLite keeps whatever it is
    given: text in the REAL or BLOB column, a blob in a TEXT one) is named in ``problems`` and
    given as NaN or empty, so that verify reports that record by its seq and goes on; before, the
    reader raised and verify said the whole store could not be read."""
    problems: list[str] = []

    def wrong(column: str, value: Any, want: str) -> None:
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        problems.append(
            f"{column} column holds {type(value).__name__} {shown}, not {want} (a value of the "
            "wrong type)"
        )

    decided_at_s = r[2]
    if isinstance(decided_at_s, bool) or not isinstance(decided_at_s, int | float):
        wrong("time", decided_at_s, "a number")
        decided_at_s = math.nan
    texts: list[str] = []
    for column, value in (("decision id", r[1]), ("prev_hash", r[3]), ("hash", r[4])):
        if isinstance(value, str):
            texts.append(value)
        else:
            wrong(column, value, "text")
            texts.append("")
    payload = r[5]
    if not isinstance(payload, bytes | bytearray | memoryview):
        wrong("payload", payload, "bytes")
        payload = b""
    return StoredAuditRow(
        int(r[0]),
        texts[0],
        float(decided_at_s),
        texts[1],
        texts[2],
        bytes(payload),
        tuple(problems),
    )


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def audit_head_of(row: Sequence[Any], label: str) -> AuditHead:
    """The chain head from its ``audit_head`` row (seq, hash). A column holding a value of another
    type (SQLite keeps text, a fraction or a blob in the INTEGER seq column) raises
    :class:`StoreError` naming the row, the column and the value: the head is the chain's anchor,
    never guessed at (``int(4.5)`` is 4; ``int('four')`` raised a bare ValueError, which callers
    take for bad input of theirs)."""
    seq, hash_ = row[0], row[1]
    for column, value, ok, want in (
        ("seq", seq, _is_integer(seq), "an integer"),
        ("hash", hash_, isinstance(hash_, str), "text"),
    ):
        if not ok:
            shown = repr(value)
            if len(shown) > 60:
                shown = shown[:57] + "..."
            raise StoreError(
                f"{label}: audit chain head (table audit_head, id 1): {column} column holds "
                f"{type(value).__name__} {shown}, not {want} (a value of the wrong type), written "
                "behind the store's back"
            )
    return AuditHead(seq=int(seq), hash=str(hash_))


def parse_message(cls: Callable[[], T], payload: Any) -> T:
    """A protobuf message of type ``cls`` from a stored payload (bytes or a driver's buffer)."""
    msg = cls()
    msg.ParseFromString(bytes(payload))  # type: ignore[attr-defined]
    return msg


def _require_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    _text(value, what)


def _text(value: str, what: str) -> str:
    """``value``, for a text column of the store's own. A NUL character is refused, as PostgreSQL
    refuses it (the driver's DataError, a bug for the API) where SQLite kept it, and so is a lone
    surrogate (what ``json.loads`` makes of ``"\\ud800"``), which neither can encode: alike on
    both stores, naming the field, before anything is written."""
    if "\x00" in value:
        raise ValueError(f"{what} holds a NUL character ({value!r}); nothing was stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{what} is not valid Unicode text ({value!r}: a lone surrogate); nothing was stored"
        ) from None
    return value


def _holds_nul(*keys: str | None) -> bool:
    """A lookup key holding a NUL character: no stored key holds one (PostgreSQL never took one,
    and ``_text`` refuses them on both stores), so the lookup finds nothing; PostgreSQL would
    refuse the parameter itself (the driver's DataError, a bug for the API)."""
    return any(k is not None and "\x00" in k for k in keys)


def _finite(value: float, what: str) -> float:
    """``value`` as a float, refused unless finite: SQLite turns NaN into NULL (a NOT NULL
    column fails, a nullable one silently says "none"), PostgreSQL keeps NaN (above every time:
    ``t < NaN`` holds for every row), and an infinite time or quantity means nothing here."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}; nothing was stored")
    return number


def _opt_finite(value: float | None, what: str) -> float | None:
    return None if value is None else _finite(value, what)


def audit_charger_ids(record: AuditRecord) -> list[str]:
    """Chargers an audit record concerns: those with a setpoint or a binding in it."""
    found = {sp.charger_id for sp in record.setpoints} | {b.charger_id for b in record.bindings}
    return sorted(c for c in found if c)


def guarded(b: Backend, fn: Callable[[], T]) -> Callable[[], T]:
    """``fn`` with a driver's error turned into the backend's :class:`StoreError` (``on_error``);
    a ``StoreError`` or ``ValueError`` passes as it is."""

    def run() -> T:
        try:
            return fn()
        except (StoreError, ValueError):
            raise
        except Exception as exc:
            raise b.on_error(exc) from exc

    return run


class BackendStore:
    """Two backends, committed records and telemetry, opened (connected and migrated), used and
    closed together; every call is one transaction on the backend's worker thread. The edge's
    :class:`SqlStore` and the cloud's store build on it."""

    #: How a closed store is named in the error of a later ``open()``.
    kind = "store"

    def __init__(self, records: Backend, telemetry: Backend, *, description: str) -> None:
        self._records = records
        self._telemetry = telemetry
        self._description = description
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False

    @property
    def description(self) -> str:
        return self._description

    def _backends(self) -> list[Backend]:
        return (
            [self._records]
            if self._telemetry is self._records
            else [
                self._records,
                self._telemetry,
            ]
        )

    async def open(self) -> None:
        async with self._open_lock:
            if self._closed:
                raise StoreError(f"{self.kind} {self._description} is closed")
            if self._opened:
                return
            for b in self._backends():
                await self._open_backend(b)
            self._say_newer_migrations()
            await self._check_opened()
            self._opened = True

    def _say_newer_migrations(self) -> None:
        """Log, once per database, the migrations a newer evcore applied (a rolled-back release).
        Opened all the same: a newer release's migrations add (tables, columns, indexes), and an
        edge that cannot open its store does not control. But writes this version makes may fail
        (a column it does not fill) or leave out what the newer one keeps."""
        said: set[str] = set()
        for b in self._backends():
            if not b.newer_migrations or b.label in said:
                continue  # (PostgreSQL: both backends are one schema)
            said.add(b.label)
            log.error(
                "%s was migrated by a newer evcore: it holds migration(s) %s, this version knows "
                "up to %d. Writes may fail or leave out what the newer version keeps: run that "
                "version again, or restore the store from before its upgrade (docs/store.md)",
                b.label,
                ", ".join(f"{v} ({name})" for v, name in b.newer_migrations),
                max((m.version for m in b.migrations()), default=0),
            )

    async def _open_backend(self, b: Backend) -> None:
        """Connect ``b`` and apply its migrations; with ``open_timeout_s`` set, wait at most
        that plus ``READ_GRACE_S`` (the backend's own bounds end a lock wait or a silent server
        first, with a precise message; past it, e.g. file I/O that hangs, the worker thread is
        left behind and the store cannot be used)."""
        job = asyncio.get_running_loop().run_in_executor(b.executor, guarded(b, b.migrate))
        if b.open_timeout_s is None:
            await job
            return
        wait_s = b.open_timeout_s + READ_GRACE_S
        try:
            async with asyncio.timeout(wait_s) as bound:
                await job
        except TimeoutError:
            if not bound.expired():
                raise
            b.stuck = True
            raise StoreUnavailable(
                f"{b.label}: opening got no answer within {wait_s:g} s while {b.step}"
                f" ([store] open_timeout_s = {b.open_timeout_s:g}); the store is not opened"
            ) from None

    async def _check_opened(self) -> None:
        """Run after the migrations, before the store counts as open; raise to refuse it."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        for b in self._backends():
            if b.stuck or any(not f.done() for f in b.late_writes):
                # Its worker is held (opening hung, or a write its caller stopped waiting for):
                # closing would queue behind it for ever.
                b.executor.shutdown(wait=False, cancel_futures=True)
                b.release()
                continue
            try:
                await loop.run_in_executor(b.executor, b.close)
            finally:
                b.executor.shutdown(wait=True)
                b.release()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, b: Backend, fn: Callable[[Tx], T]) -> T:
        """``fn``, a write, in one transaction of ``b``. With ``b.caller_bounds_writes`` and
        ``write_timeout_s`` set, the caller waits at most that plus ``READ_GRACE_S``, then gets
        :class:`StoreUnavailable` naming the store and the key: "nothing was committed" when the
        write had not started (it is dropped: it queued behind an earlier call that holds the
        worker thread), else "its outcome is unknown" (file I/O that hangs: it may still commit
        once the file system answers, before any later write of the backend, and how it ended is
        logged then). Before, such a write held its caller, and every write queued behind it,
        for as long as the I/O hung."""
        if not self._opened:
            await self.open()
        limit_s = b.write_timeout_s
        if not b.caller_bounds_writes or limit_s is None:
            return await self._exec(b, fn)
        job = self._submit(b, fn, read_only=False)
        started_s = time.monotonic()
        wait_s = limit_s + READ_GRACE_S
        result = asyncio.wrap_future(job)
        # Taken here whenever it ends: a write's outcome after its caller left is logged instead.
        result.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            await asyncio.wait({result}, timeout=wait_s)
        except asyncio.CancelledError:
            # The caller gave up on its own (its own bound): a write not started is dropped; one
            # under way runs on and is watched alike.
            if not job.cancel():
                self._watch_late_write(b, job, started_s)
            raise
        if job.done() and not job.cancelled():
            return job.result()  # (it ended as the wait did)
        if job.cancel():
            raise StoreUnavailable(
                f"{b.label}: a write got no answer within {wait_s:g} s ([store] "
                f"write_timeout_s = {limit_s:g}): it waited behind an earlier call that holds "
                "the connection and never started; nothing was committed"
            )
        self._watch_late_write(b, job, started_s)
        raise StoreUnavailable(
            f"{b.label}: a write got no answer within {wait_s:g} s ([store] write_timeout_s ="
            f" {limit_s:g}; file I/O that hangs?): its outcome is unknown: it may still commit "
            "once the file system answers, before any later write; how it ended is logged then"
        )

    @staticmethod
    def _watch_late_write(
        b: Backend, job: concurrent.futures.Future[Any], started_s: float
    ) -> None:
        """Log how a write its caller stopped waiting for ended (on its worker thread)."""
        b.late_writes.add(job)

        def ended(f: concurrent.futures.Future[Any]) -> None:
            b.late_writes.discard(f)
            took_s = time.monotonic() - started_s
            exc = f.exception() if not f.cancelled() else None
            if exc is None:
                log.error(
                    "%s: a write its caller stopped waiting for committed after all, %.1f s after"
                    " it was asked for (before any later write)",
                    b.label,
                    took_s,
                )
            else:
                log.error(
                    "%s: a write its caller stopped waiting for failed after %.1f s, nothing "
                    "committed: %s",
                    b.label,
                    took_s,
                    exc,
                )

        job.add_done_callback(ended)

    async def _read(self, b: Backend, fn: Callable[[Tx], T]) -> T:
        """``_run`` for ``fn`` that only reads: with ``b.read_timeout_s`` set, the caller waits at
        most that plus ``READ_GRACE_S``, then gets :class:`StoreUnavailable` naming the store (a
        read still queued behind an earlier call is then dropped, one under way runs on)."""
        if not self._opened:
            await self.open()
        limit_s = b.read_timeout_s
        if limit_s is None:
            return await self._exec(b, fn, read_only=True)
        wait_s = limit_s + READ_GRACE_S
        try:
            async with asyncio.timeout(wait_s) as bound:
                return await self._exec(b, fn, read_only=True)
        except TimeoutError:
            if not bound.expired():
                raise
            raise StoreUnavailable(
                f"{b.label}: a read got no answer within {wait_s:g} s ([store] read_timeout_s ="
                f" {limit_s:g}; the connection may be held by an earlier call)"
            ) from None

    async def _exec(self, b: Backend, fn: Callable[[Tx], T], *, read_only: bool = False) -> T:
        """``fn`` in one transaction of ``b`` on its worker thread (the store need not be open)."""
        return await asyncio.wrap_future(self._submit(b, fn, read_only=read_only))

    @staticmethod
    def _submit(
        b: Backend, fn: Callable[[Tx], T], *, read_only: bool
    ) -> concurrent.futures.Future[T]:
        def in_tx() -> T:
            # (The transaction connects if need be, inside its bound.)
            with b.transaction(read_only=read_only) as tx:
                return fn(tx)

        return b.executor.submit(guarded(b, in_tx))


class SqlStore(BackendStore):
    """:class:`evcore.store.base.Store` over two backends: committed records and telemetry.

    The two may be the same database (PostgreSQL: two connections to one schema) or two files
    (SQLite: ``records.sqlite`` with ``synchronous=FULL``, ``telemetry.sqlite`` with ``NORMAL``).
    """

    def __init__(
        self,
        records: Backend,
        telemetry: Backend,
        *,
        telemetry_retention_s: float,
        description: str,
    ) -> None:
        super().__init__(records, telemetry, description=description)
        self._retention_s = telemetry_retention_s

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def telemetry_retention_s(self) -> float:
        return self._retention_s

    async def schema_version(self) -> int:
        if not self._opened:
            await self.open()
        return await asyncio.get_running_loop().run_in_executor(
            self._records.executor, guarded(self._records, self._records.schema_version)
        )

    # -- sessions -------------------------------------------------------------------------------
    async def upsert_session(self, session: SessionRecord) -> None:
        _require_id(session.session_id, "session_id")
        of = f" of session {session.session_id!r}"
        _require_id(session.charger_id, "charger_id" + of)
        s = session
        params = (
            s.session_id,
            s.charger_id,
            _finite(s.started_at_s, "started_at_s" + of),
            _text(s.transaction_id, "transaction_id" + of),
            _text(s.id_tag, "id_tag" + of),
            _opt_finite(s.departure_s, "departure_s" + of),
            _opt_finite(s.energy_requested_kwh, "energy_requested_kwh" + of),
            _finite(s.priority, "priority" + of),
            _opt_finite(s.meter_start_wh, "meter_start_wh" + of),
            _finite(s.energy_delivered_kwh, "energy_delivered_kwh" + of),
            _opt_finite(s.ended_at_s, "ended_at_s" + of),
            _finite(s.updated_at_s, "updated_at_s" + of),
        )
        updates = ", ".join(
            f"{c.strip()} = excluded.{c.strip()}" for c in _SESSION_COLS.split(",")[1:]
        )

        def op(tx: Tx) -> None:
            tx.execute(
                f"INSERT INTO sessions ({_SESSION_COLS}) VALUES ({', '.join('?' * 12)})"
                f" ON CONFLICT (session_id) DO UPDATE SET {updates}",
                params,
            )

        await self._run(self._records, op)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        if _holds_nul(session_id):
            return None

        def op(tx: Tx) -> SessionRecord | None:
            row = tx.one(
                f"SELECT {_SESSION_COLS} FROM sessions WHERE session_id = ?", (session_id,)
            )
            return None if row is None else _session(row)

        return await self._read(self._records, op)

    async def list_open_sessions(self, charger_id: str | None = None) -> list[SessionRecord]:
        if _holds_nul(charger_id):
            return []

        def op(tx: Tx) -> list[SessionRecord]:
            sql = f"SELECT {_SESSION_COLS} FROM sessions WHERE ended_at_s IS NULL"
            params: tuple[Any, ...] = ()
            if charger_id is not None:
                sql += " AND charger_id = ?"
                params = (charger_id,)
            return [_session(r) for r in tx.all(sql + " ORDER BY started_at_s, session_id", params)]

        return await self._read(self._records, op)

    async def list_sessions(
        self, *, since_s: float | None = None, limit: int | None = None
    ) -> list[SessionRecord]:
        def op(tx: Tx) -> list[SessionRecord]:
            sql = f"SELECT {_SESSION_COLS} FROM sessions"
            params: list[Any] = []
            if since_s is not None:
                sql += " WHERE started_at_s >= ?"
                params.append(float(since_s))
            sql += " ORDER BY started_at_s DESC, session_id"
            if limit is not None:
                sql += " LIMIT ?"
                params.append(int(limit))
            return [_session(r) for r in tx.all(sql, params)]

        return await self._read(self._records, op)

    # -- transactions ---------------------------------------------------------------------------
    async def record_transaction(self, tx_event: TransactionEvent) -> bool:
        ev = TransactionEvent()
        ev.CopyFrom(tx_event)
        _require_id(ev.charger_id, "TransactionEvent.charger_id")
        _require_id(
            ev.transaction_id, f"TransactionEvent.transaction_id (charger {ev.charger_id!r})"
        )
        if ev.kind == TransactionEventKind.TRANSACTION_EVENT_KIND_UNSPECIFIED:
            raise ValueError(
                f"TransactionEvent {ev.transaction_id!r} of charger {ev.charger_id!r} has no kind"
            )
        if not ev.HasField("occurred_at"):
            raise ValueError(
                f"TransactionEvent {ev.transaction_id!r} of charger {ev.charger_id!r} "
                "has no occurred_at"
            )
        of = f" of TransactionEvent {ev.transaction_id!r} (charger {ev.charger_id!r})"
        _text(ev.id_tag, "id_tag" + of)
        _text(ev.stop_reason, "stop_reason" + of)
        occurred_s = ts_s(ev.occurred_at)
        key = (
            ev.charger_id,
            ev.transaction_id,
            int(ev.kind),
            int(ev.seq_no),
            ts_us(ev.occurred_at),
        )
        payload = ev.SerializeToString(deterministic=True)

        def op(tx: Tx) -> bool:
            inserted = tx.execute(
                "INSERT INTO transaction_events"
                " (charger_id, transaction_id, kind, seq_no, occurred_at_us, payload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (*key, payload),
            )
            if inserted == 0:
                return False
            tx.execute(
                "INSERT INTO transactions (charger_id, transaction_id, evse_id, id_tag)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (ev.charger_id, ev.transaction_id, int(ev.evse_id), ev.id_tag),
            )
            sets = ["event_count = event_count + 1"]
            params: list[Any] = []
            if ev.id_tag:
                sets.append("id_tag = ?")
                params.append(ev.id_tag)
            if ev.evse_id:
                sets.append("evse_id = ?")
                params.append(int(ev.evse_id))
            if ev.HasField("meter_start_wh"):
                sets.append("meter_start_wh = ?")
                params.append(ev.meter_start_wh)
            if ev.kind == TransactionEventKind.TRANSACTION_EVENT_KIND_STARTED:
                # The earliest start wins (a replayed start may arrive after an update).
                sets.append(
                    "started_at_s = CASE WHEN started_at_s IS NULL OR started_at_s > ? THEN ?"
                    " ELSE started_at_s END"
                )
                params += [occurred_s, occurred_s]
            elif ev.kind == TransactionEventKind.TRANSACTION_EVENT_KIND_ENDED:
                sets.append("ended_at_s = ?")
                params.append(occurred_s)
                sets.append("stop_reason = ?")
                params.append(ev.stop_reason)
                if ev.HasField("meter_stop_wh"):
                    sets.append("meter_stop_wh = ?")
                    params.append(ev.meter_stop_wh)
            # An update or end seen before its start (offline replay order): start no later than it.
            if ev.kind != TransactionEventKind.TRANSACTION_EVENT_KIND_STARTED:
                sets.append(
                    "started_at_s = CASE WHEN started_at_s IS NULL THEN ? ELSE started_at_s END"
                )
                params.append(occurred_s)
            tx.execute(
                f"UPDATE transactions SET {', '.join(sets)}"
                " WHERE charger_id = ? AND transaction_id = ?",
                (*params, ev.charger_id, ev.transaction_id),
            )
            return True

        return await self._run(self._records, op)

    async def get_transaction(
        self, charger_id: str, transaction_id: str
    ) -> TransactionRecord | None:
        if _holds_nul(charger_id, transaction_id):
            return None

        def op(tx: Tx) -> TransactionRecord | None:
            row = tx.one(
                f"SELECT {_TX_COLS} FROM transactions WHERE charger_id = ? AND transaction_id = ?",
                (charger_id, transaction_id),
            )
            return None if row is None else _transaction(row)

        return await self._read(self._records, op)

    async def list_open_transactions(self) -> list[TransactionRecord]:
        def op(tx: Tx) -> list[TransactionRecord]:
            rows = tx.all(
                f"SELECT {_TX_COLS} FROM transactions WHERE ended_at_s IS NULL"
                " ORDER BY charger_id, transaction_id"
            )
            return [_transaction(r) for r in rows]

        return await self._read(self._records, op)

    async def transaction_events(
        self, charger_id: str, transaction_id: str
    ) -> list[TransactionEvent]:
        if _holds_nul(charger_id, transaction_id):
            return []

        def op(tx: Tx) -> list[TransactionEvent]:
            rows = tx.all(
                "SELECT payload FROM transaction_events WHERE charger_id = ? AND transaction_id = ?"
                " ORDER BY occurred_at_us, seq_no, kind",
                (charger_id, transaction_id),
            )
            return [parse_message(TransactionEvent, r[0]) for r in rows]

        return await self._read(self._records, op)

    # -- setpoints ------------------------------------------------------------------------------
    async def record_setpoint_sent(self, setpoint: Setpoint, sent_at_s: float) -> None:
        await self.add_setpoints([(setpoint, sent_at_s)])

    async def add_setpoints(self, sent: Iterable[tuple[Setpoint, float]]) -> int:
        rows: dict[str, tuple[str, str, bytes, float, bool, None]] = {}
        for i, (setpoint, sent_at_s) in enumerate(sent):
            _require_id(setpoint.charger_id, f"Setpoint.charger_id (#{i})")
            _text(setpoint.decision_id, f"Setpoint.decision_id (#{i})")
            if not setpoint.HasField("setpoint_a") and not setpoint.HasField("setpoint_w"):
                raise ValueError(
                    f"Setpoint #{i} for charger {setpoint.charger_id!r} has neither setpoint_a "
                    "nor setpoint_w; nothing was stored"
                )
            at = float(sent_at_s)
            if not math.isfinite(at):
                raise ValueError(
                    f"Setpoint #{i} for charger {setpoint.charger_id!r}: sent_at_s must be "
                    f"finite, got {sent_at_s!r}; nothing was stored"
                )
            payload = setpoint.SerializeToString(deterministic=True)
            # A charger named twice: the later one wins, as two calls in a row would leave it.
            rows.pop(setpoint.charger_id, None)
            rows[setpoint.charger_id] = (
                setpoint.charger_id,
                setpoint.decision_id,
                payload,
                at,
                False,
                None,
            )
        if not rows:
            return 0
        # In charger id order: PostgreSQL locks an upsert's rows in the order of its VALUES, so
        # two writers naming the same chargers in different orders deadlocked (40P01), one of
        # them failing as unavailable.
        batch = [rows[c] for c in sorted(rows)]

        def op(tx: Tx) -> int:
            tx.upsert_many(
                "setpoints_last",
                _SETPOINT_COLS,
                batch,
                "ON CONFLICT (charger_id) DO UPDATE SET"
                " decision_id = excluded.decision_id, payload = excluded.payload,"
                " sent_at_s = excluded.sent_at_s, confirmed = excluded.confirmed,"
                " confirmed_at_s = NULL",
            )
            return len(batch)

        return await self._run(self._records, op)

    async def confirm_setpoint(
        self, charger_id: str, decision_id: str, confirmed_at_s: float
    ) -> bool:
        return await self.confirm_setpoints([(charger_id, decision_id, confirmed_at_s)]) > 0

    async def confirm_setpoints(self, confirmed: Iterable[tuple[str, str, float]]) -> int:
        batch = [
            (
                True,
                _finite(at, f"confirmed_at_s (#{i})"),
                _text(cid, f"charger_id (#{i})"),
                _text(did, f"decision_id (#{i})"),
            )
            for i, (cid, did, at) in enumerate(confirmed)
        ]
        if not batch:
            return 0
        # Rows locked in charger id order, as add_setpoints locks them (no deadlock between two).
        batch.sort(key=lambda row: (row[2], row[3]))

        def op(tx: Tx) -> int:
            n = 0
            for row in batch:
                n += tx.execute(
                    "UPDATE setpoints_last SET confirmed = ?, confirmed_at_s = ?"
                    " WHERE charger_id = ? AND decision_id = ?",
                    row,
                )
            return n

        return await self._run(self._records, op)

    async def last_setpoint(self, charger_id: str) -> SetpointRecord | None:
        if _holds_nul(charger_id):
            return None

        def op(tx: Tx) -> SetpointRecord | None:
            row = tx.one(
                "SELECT payload, sent_at_s, confirmed, confirmed_at_s FROM setpoints_last"
                " WHERE charger_id = ?",
                (charger_id,),
            )
            return None if row is None else _setpoint(row)

        return await self._read(self._records, op)

    async def last_setpoints(self) -> dict[str, SetpointRecord]:
        def op(tx: Tx) -> dict[str, SetpointRecord]:
            rows = tx.all(
                "SELECT payload, sent_at_s, confirmed, confirmed_at_s, charger_id"
                " FROM setpoints_last ORDER BY charger_id"
            )
            return {r[4]: _setpoint(r) for r in rows}

        return await self._read(self._records, op)

    # -- telemetry ------------------------------------------------------------------------------
    async def append_meter_samples(self, samples: Iterable[MeterSample]) -> int:
        # One sample per charger and time: what a batch holds twice at one time is one reading
        # (the register in one MeterValues, the phase currents in the next, stamped alike).
        merged: dict[tuple[str, float], MeterSample] = {}
        copied: set[tuple[str, float]] = set()
        for i, s in enumerate(samples):
            if not s.charger_id:
                raise ValueError(f"meter sample #{i} has no charger_id; nothing was stored")
            _text(s.charger_id, f"charger_id of meter sample #{i}")
            key = (s.charger_id, sample_time_s(s))
            kept = merged.get(key)
            if kept is None:
                merged[key] = s
                continue
            if key not in copied:  # the caller's message is not changed
                kept = merged[key] = _copy_sample(kept)
                copied.add(key)
            _log_disagreements(kept, _merge_sample(kept, s))
        if not merged:
            return 0
        new_rows = [(c, t, m.SerializeToString(deterministic=True)) for (c, t), m in merged.items()]

        def op(tx: Tx) -> int:
            inserted = tx.insert_new(
                "meter_samples", ("charger_id", "t_s", "payload"), new_rows, "charger_id, t_s"
            )
            if len(inserted) == len(new_rows):
                return len(inserted)
            # Some met a sample stored before at their time: a station's resend after a lost
            # answer (adds nothing: stored once) or another message's reading of that instant
            # (adds what it measured to the stored sample).
            fresh = {(str(c), float(t)) for c, t in inserted}
            stored = len(inserted)
            for key, sample in merged.items():
                if key in fresh:
                    continue
                row = tx.one(
                    "SELECT payload FROM meter_samples WHERE charger_id = ? AND t_s = ?", key
                )
                if row is None:  # purged meanwhile (a DO NOTHING saw it; a purge took it)
                    continue
                kept = parse_message(MeterSample, row[0])
                changed, disagreements = _merge_sample(kept, sample)
                _log_disagreements(kept, (changed, disagreements))
                if changed:
                    tx.execute(
                        "UPDATE meter_samples SET payload = ? WHERE charger_id = ? AND t_s = ?",
                        (kept.SerializeToString(deterministic=True), *key),
                    )
                    stored += 1
            return stored

        return await self._run(self._telemetry, op)

    async def record_status(self, status: ChargerStatus) -> None:
        _require_id(status.charger_id, "ChargerStatus.charger_id")
        row = (
            status.charger_id,
            sample_time_s(status),
            status.SerializeToString(deterministic=True),
        )

        def op(tx: Tx) -> None:
            # A status stored before (a station's resend after a lost answer: the same status at
            # the same time, received again) is not history twice.
            if not any(
                _same_status(status, bytes(r[0]))
                for r in tx.all(
                    "SELECT payload FROM status_history WHERE charger_id = ? AND t_s = ?", row[:2]
                )
            ):
                tx.execute(
                    "INSERT INTO status_history (charger_id, t_s, payload) VALUES (?, ?, ?)", row
                )
            # The latest by time wins: a late, older status does not overwrite a newer one.
            tx.execute(
                "INSERT INTO status_latest (charger_id, t_s, payload) VALUES (?, ?, ?)"
                " ON CONFLICT (charger_id) DO UPDATE SET t_s = excluded.t_s,"
                " payload = excluded.payload WHERE status_latest.t_s <= excluded.t_s",
                row,
            )

        await self._run(self._telemetry, op)

    @staticmethod
    def _range(
        sql: str, charger_id: str, since_s: float | None, until_s: float | None
    ) -> tuple[str, list[Any]]:
        params: list[Any] = [charger_id]
        if since_s is not None:
            sql += " AND t_s >= ?"
            params.append(float(since_s))
        if until_s is not None:
            sql += " AND t_s < ?"
            params.append(float(until_s))
        return sql + " ORDER BY t_s", params

    async def meter_samples(
        self,
        charger_id: str,
        *,
        since_s: float | None = None,
        until_s: float | None = None,
        limit: int | None = None,
    ) -> list[MeterSample]:
        if _holds_nul(charger_id):
            return []
        sql, params = self._range(
            "SELECT payload FROM meter_samples WHERE charger_id = ?", charger_id, since_s, until_s
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))

        def op(tx: Tx) -> list[MeterSample]:
            return [parse_message(MeterSample, r[0]) for r in tx.all(sql, params)]

        return await self._read(self._telemetry, op)

    async def status_history(
        self, charger_id: str, *, since_s: float | None = None, until_s: float | None = None
    ) -> list[ChargerStatus]:
        if _holds_nul(charger_id):
            return []
        sql, params = self._range(
            "SELECT payload FROM status_history WHERE charger_id = ?", charger_id, since_s, until_s
        )

        def op(tx: Tx) -> list[ChargerStatus]:
            return [parse_message(ChargerStatus, r[0]) for r in tx.all(sql, params)]

        return await self._read(self._telemetry, op)

    async def latest_statuses(self) -> dict[str, ChargerStatus]:
        def op(tx: Tx) -> dict[str, ChargerStatus]:
            rows = tx.all("SELECT charger_id, payload FROM status_latest ORDER BY charger_id")
            return {r[0]: parse_message(ChargerStatus, r[1]) for r in rows}

        return await self._read(self._telemetry, op)

    async def purge_telemetry(self, older_than_s: float) -> int:
        # (NaN: PostgreSQL deleted every row, t_s < NaN holding for all; SQLite none.)
        cutoff = _finite(older_than_s, "older_than_s")
        n = await self._purge(self._telemetry, "meter_samples", "t_s", cutoff)
        return n + await self._purge(self._telemetry, "status_history", "t_s", cutoff)

    async def _purge(self, b: Backend, table: str, column: str, cutoff: float) -> int:
        """Delete the rows of ``table`` whose ``column`` (a time, indexed) is below ``cutoff``,
        oldest first, about ``PURGE_BATCH_ROWS`` at a time, each piece a write of its own: a
        write waits at most ``write_timeout_s``, so one DELETE of a long backlog (the first purge
        after an outage, a shortened retention) would be cancelled every time, nothing deleted,
        however healthy the store. Returns how many rows went."""
        total = 0
        # Each piece starts above the last one's edge: what went is gone from the table but not
        # from PostgreSQL's index until a vacuum, so a piece that searched from the oldest time
        # walked every entry deleted before it, O(n^2) over a backlog (one 300,000-row purge's
        # later pieces ran into a 0.05 s statement timeout on a loaded machine).
        after = -math.inf

        def op(tx: Tx) -> tuple[int, bool, float]:
            # The time of the PURGE_BATCH_ROWS-th oldest expired row: everything up to it goes
            # (rows sharing that time too: a few more at most), else all that is left.
            edge = tx.one(
                f"SELECT {column} FROM {table} WHERE {column} > ? AND {column} < ?"
                f" ORDER BY {column} LIMIT 1 OFFSET ?",
                (after, cutoff, PURGE_BATCH_ROWS - 1),
            )
            if edge is None:
                n = tx.execute(f"DELETE FROM {table} WHERE {column} < ?", (cutoff,))
                return n, True, after
            n = tx.execute(
                f"DELETE FROM {table} WHERE {column} > ? AND {column} <= ?", (after, edge[0])
            )
            return n, False, float(edge[0])

        while True:
            n, done, after = await self._run(b, op)
            total += n
            if done:
                return total

    async def purge_expired(self, now_s: float) -> int:
        return await self.purge_telemetry(now_s - self._retention_s)

    # -- station events -------------------------------------------------------------------------
    async def record_station_event(self, event: StationEvent) -> bool:
        _require_id(event.station_id, "StationEvent.station_id")
        _text(event.code, f"code of StationEvent of station {event.station_id!r}")
        if event.kind == StationEventKind.STATION_EVENT_KIND_UNSPECIFIED:
            raise ValueError(f"StationEvent of station {event.station_id!r} has no kind")
        if event.HasField("occurred_at"):
            at = event.occurred_at
        elif event.HasField("received_at"):
            at = event.received_at
        else:
            raise ValueError(
                f"StationEvent of station {event.station_id!r} has neither occurred_at nor "
                "received_at"
            )
        row = (
            event.station_id,
            int(event.kind),
            event.code,
            ts_us(at),
            ts_s(at),
            event.SerializeToString(deterministic=True),
        )

        def op(tx: Tx) -> bool:
            n = tx.execute(
                "INSERT INTO station_events (station_id, kind, code, at_us, at_s, payload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            )
            return n > 0

        return await self._run(self._records, op)

    async def station_events(
        self,
        station_id: str | None = None,
        *,
        kind: StationEventKind.ValueType | None = None,
        since_s: float | None = None,
        until_s: float | None = None,
        limit: int | None = None,
    ) -> list[StationEvent]:
        if _holds_nul(station_id):
            return []
        sql, params = _select(
            "SELECT payload FROM station_events",
            [
                ("station_id = ?", station_id),
                ("kind = ?", None if kind is None else int(kind)),
                ("at_s >= ?", None if since_s is None else float(since_s)),
                ("at_s < ?", None if until_s is None else float(until_s)),
            ],
            "at_us, station_id, kind, code",
            limit,
        )

        def op(tx: Tx) -> list[StationEvent]:
            return [parse_message(StationEvent, r[0]) for r in tx.all(sql, params)]

        return await self._read(self._records, op)

    # -- audit ----------------------------------------------------------------------------------
    async def append_audit(self, record: AuditRecord) -> None:
        if not record.hash:
            raise ValueError(f"audit record {record.decision_id!r} is not sealed (empty hash)")
        _require_id(record.decision_id, "AuditRecord.decision_id")
        if not record.HasField("decided_at"):
            raise ValueError(f"audit record {record.decision_id!r} has no decided_at")
        of = f" of audit record {record.decision_id!r}"
        _text(record.hash, "hash" + of)
        _text(record.prev_hash, "prev_hash" + of)
        payload = record.SerializeToString(deterministic=True)
        chargers = [_text(c, "charger_id" + of) for c in audit_charger_ids(record)]
        seq = int(record.seq)
        label = self._records.label

        def op(tx: Tx) -> None:
            same = tx.one(
                "SELECT seq, hash FROM audit_records WHERE decision_id = ?", (record.decision_id,)
            )
            if same is not None:
                if int(same[0]) == seq and same[1] == record.hash:
                    return  # a retry of a committed append: already durable
                raise AuditChainConflict(
                    f"decision {record.decision_id!r} is already recorded as seq {same[0]}"
                )
            row = tx.one("SELECT seq, hash FROM audit_head WHERE id = 1")
            head = None if row is None else audit_head_of(row, label)
            want_seq = 0 if head is None else head.seq + 1
            want_prev = "" if head is None else head.hash
            if seq != want_seq or record.prev_hash != want_prev:
                raise AuditChainConflict(
                    f"audit record {record.decision_id!r} (seq {seq}, "
                    f"prev {record.prev_hash[:12]!r})"
                    f" does not extend the head (next seq {want_seq}, head {want_prev[:12]!r})"
                )
            inserted = tx.execute(
                "INSERT INTO audit_records"
                " (seq, decision_id, decided_at_s, prev_hash, hash, payload)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    seq,
                    record.decision_id,
                    ts_s(record.decided_at),
                    record.prev_hash,
                    record.hash,
                    payload,
                ),
            )
            if inserted == 0:
                # PostgreSQL: another transaction held this seq or decision id uncommitted when
                # we looked, and committed it while the INSERT waited; a new statement sees it.
                # It is this very record when an earlier attempt of this append (cut short by
                # write_timeout_s, its outcome unknown) committed late: a retry, done. (SQLite
                # takes the write lock before looking: only a row put there behind the store's
                # back gets here.)
                same = tx.one(
                    "SELECT seq, hash FROM audit_records WHERE decision_id = ?",
                    (record.decision_id,),
                )
                if same is not None and int(same[0]) == seq and same[1] == record.hash:
                    return
                raise AuditChainConflict(
                    f"audit record {record.decision_id!r} (seq {seq}): that seq or decision id"
                    " was stored by another writer meanwhile"
                )
            tx.insert_many("audit_chargers", ("charger_id", "seq"), [(c, seq) for c in chargers])
            tx.execute(
                "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) ON CONFLICT (id)"
                " DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (seq, record.hash),
            )

        await self._run(self._records, op)

    async def audit_head(self) -> AuditHead | None:
        label = self._records.label

        def op(tx: Tx) -> AuditHead | None:
            row = tx.one("SELECT seq, hash FROM audit_head WHERE id = 1")
            return None if row is None else audit_head_of(row, label)

        return await self._read(self._records, op)

    async def audit_records(
        self,
        *,
        charger_id: str | None = None,
        since_s: float | None = None,
        until_s: float | None = None,
        after_seq: int | None = None,
        before_seq: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AuditRecord]:
        if _holds_nul(charger_id):
            return []
        base = "FROM audit_records r"
        if charger_id is not None:
            base += " JOIN audit_chargers c ON c.seq = r.seq"
        filters: list[tuple[str, Any]] = [
            ("c.charger_id = ?", charger_id),
            ("r.decided_at_s >= ?", None if since_s is None else float(since_s)),
            ("r.decided_at_s < ?", None if until_s is None else float(until_s)),
            ("r.seq > ?", None if after_seq is None else int(after_seq)),
            ("r.seq < ?", None if before_seq is None else int(before_seq)),
        ]
        out: list[AuditRecord] = []
        async for page in self._audit_pages(base, filters, "r.payload", limit, newest_first):
            out += [parse_message(AuditRecord, r[0]) for r in page]
        return out

    async def audit_rows(self, *, after_seq: int = -1, limit: int = 1000) -> list[StoredAuditRow]:
        out: list[StoredAuditRow] = []
        async for page in self._audit_pages(
            "FROM audit_records r",
            [("r.seq > ?", int(after_seq))],
            "r.seq, r.decision_id, r.decided_at_s, r.prev_hash, r.hash, r.payload",
            limit,
            False,
        ):
            out += [stored_audit_row(r) for r in page]
        return out

    async def _audit_pages(
        self,
        base: str,
        filters: list[tuple[str, Any]],
        columns: str,
        limit: int | None,
        newest_first: bool,
    ) -> AsyncIterator[list[Any]]:
        """The audit rows ``base`` and ``filters`` select, in seq order (``newest_first``:
        descending), at most ``limit``, read in pieces of at most ``AUDIT_PAGE_RECORDS`` records
        and about ``AUDIT_PAGE_BYTES`` of payload, each piece its own read: a read is bounded by
        ``read_timeout_s``, so a long backlog (the edge's journal check after a store outage,
        ``audit show --limit`` of a whole chain, a page of ``verify`` over large records) read at
        once could be cut by it however healthy the store. Pieces are taken by seq (keyset),
        so records appended meanwhile are after them, never repeated or skipped."""
        direction = " DESC" if newest_first else ""
        beyond = "r.seq < ?" if newest_first else "r.seq > ?"
        cursor: int | None = None
        taken = 0
        while limit is None or taken < limit:
            want = AUDIT_PAGE_RECORDS if limit is None else min(AUDIT_PAGE_RECORDS, limit - taken)
            where = [*filters, (beyond, cursor)]
            sizes_sql, sizes_params = _select(
                f"SELECT r.seq, length(r.payload) {base}", where, "r.seq" + direction, want
            )

            def op(
                tx: Tx,
                sizes_sql: str = sizes_sql,
                sizes_params: list[Any] = sizes_params,
                want: int = want,
            ) -> tuple[list[Any], int | None, bool]:
                sizes = tx.all(sizes_sql, sizes_params)
                if not sizes:
                    return [], None, False
                # At least one record, however large; then as many as fit the byte budget.
                n, total = 0, 0
                for _seq, size in sizes:
                    total += int(size or 0)
                    if n and total > AUDIT_PAGE_BYTES:
                        break
                    n += 1
                first, last = int(sizes[0][0]), int(sizes[n - 1][0])
                low, high = min(first, last), max(first, last)
                rows_sql, rows_params = _select(
                    f"SELECT {columns} {base}",
                    [*filters, ("r.seq >= ?", low), ("r.seq <= ?", high)],
                    "r.seq" + direction,
                    None,
                )
                more = n < len(sizes) or len(sizes) == want
                return list(tx.all(rows_sql, rows_params)), last, more

            rows, last, more = await self._read(self._records, op)
            if rows:
                yield rows
            taken += len(rows)
            if not more or last is None:
                return
            cursor = last

    async def audit_charger_index(self, *, after_seq: int, upto_seq: int) -> dict[int, list[str]]:
        def op(tx: Tx) -> dict[int, list[str]]:
            rows = tx.all(
                "SELECT seq, charger_id FROM audit_chargers WHERE seq > ? AND seq <= ?"
                " ORDER BY seq, charger_id",
                (int(after_seq), int(upto_seq)),
            )
            out: dict[int, list[str]] = {}
            for seq, charger_id in rows:
                # A seq SQLite keeps as a fraction (2.5) is no index row of record 2: the
                # charger lookup (a join on seq) does not find it either, so neither may verify.
                if _is_integer(seq):
                    out.setdefault(seq, []).append(str(charger_id))
            # In code point order, as audit_charger_ids gives a record's: the SQL ORDER BY sorts
            # by the database's collation, a language's on many PostgreSQL servers ("a1" before
            # "B1"), and verify compared the two lists as they came.
            return {seq: sorted(ids) for seq, ids in out.items()}

        return await self._read(self._records, op)

    # -- meta -----------------------------------------------------------------------------------
    async def get_meta(self, key: str) -> str | None:
        if _holds_nul(key):
            return None

        def op(tx: Tx) -> str | None:
            row = tx.one("SELECT value FROM meta WHERE key = ?", (key,))
            return None if row is None else str(row[0])

        return await self._read(self._records, op)

    async def set_meta(self, key: str, value: str) -> None:
        _text(key, "meta key")
        _text(value, f"value of meta key {key!r}")

        def op(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._run(self._records, op)

    # -- processed ids --------------------------------------------------------------------------
    async def mark_processed(self, consumer: str, event_id: str, at_s: float) -> bool:
        _require_id(consumer, "consumer")
        _require_id(event_id, "event_id")
        at = _finite(at_s, f"at_s of event {event_id!r}")

        def op(tx: Tx) -> bool:
            n = tx.execute(
                "INSERT INTO processed_events (consumer, event_id, processed_at_s) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (consumer, event_id, at),
            )
            return n > 0

        return await self._run(self._records, op)

    async def is_processed(self, consumer: str, event_id: str) -> bool:
        if _holds_nul(consumer, event_id):
            return False

        def op(tx: Tx) -> bool:
            row = tx.one(
                "SELECT 1 FROM processed_events WHERE consumer = ? AND event_id = ?",
                (consumer, event_id),
            )
            return row is not None

        return await self._read(self._records, op)

    async def purge_processed(self, older_than_s: float) -> int:
        cutoff = _finite(older_than_s, "older_than_s")
        return await self._purge(self._records, "processed_events", "processed_at_s", cutoff)


def identity(sql: str) -> str:
    return sql


@functools.lru_cache(maxsize=512)
def qmark_to_format(sql: str) -> str:
    """``?`` → ``%s`` for psycopg (our SQL has no literal ``?`` or ``%``)."""
    return sql.replace("%", "%%").replace("?", "%s")
