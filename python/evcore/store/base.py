"""The one persistence interface of the edge: sessions, transactions, setpoints, telemetry, the
audit chain and processed event ids.

This module owns the :class:`Store` protocol, the plain records it exchanges and its errors. Two
implementations share one SQL core (:mod:`evcore.store.sql`): the embedded SQLite store (default)
and PostgreSQL. A store records and returns; it never decides anything and never changes a record
it was given (the audit chain is checked, not repaired).

Times are seconds since the Unix epoch (UTC) as floats, named ``*_s``; protobuf messages keep their
``google.protobuf.Timestamp`` fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.meter_pb2 import MeterSample
from evcore.v1.setpoint_pb2 import Setpoint
from evcore.v1.station_event_pb2 import StationEvent, StationEventKind
from evcore.v1.status_pb2 import ChargerStatus
from evcore.v1.transaction_pb2 import TransactionEvent


class StoreError(Exception):
    """Base class of the store's own errors."""


class StoreConfigError(StoreError, ValueError):
    """The ``[store]`` section (or a store URL) is wrong; the message names the key."""


class StoreUnavailable(StoreError):
    """The database cannot serve now: it cannot be reached or opened, is locked, full or
    read-only, or did not answer a read within ``read_timeout_s`` or a write within
    ``write_timeout_s``; a later call may succeed. The message names the store, and for a write
    whether anything was committed ("nothing was committed", or the commit's "outcome is unknown":
    every write of the store is idempotent, so repeating it is safe). Any other error of a store
    call is a bug (docs/store.md)."""


class AuditChainConflict(StoreError):
    """An audit record does not extend the stored chain head (wrong ``seq`` or ``prev_hash``).

    Raised before anything is written: two writers raced, or the caller's idea of the head is stale.
    """


@dataclass(frozen=True)
class SessionRecord:
    """A vehicle's stay at a charger as the edge sees it (plug-in to departure)."""

    session_id: str
    charger_id: str
    started_at_s: float
    transaction_id: str = ""
    id_tag: str = ""
    # Expected departure; None when unknown.
    departure_s: float | None = None
    energy_requested_kwh: float | None = None
    # Higher is served first by the allocator; operators may change it through the API.
    priority: float = 0.0
    meter_start_wh: float | None = None
    energy_delivered_kwh: float = 0.0
    # None while the session is open.
    ended_at_s: float | None = None
    updated_at_s: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.ended_at_s is None


@dataclass(frozen=True)
class TransactionRecord:
    """One charging transaction, merged from its (idempotently recorded) events."""

    charger_id: str
    transaction_id: str
    evse_id: int = 0
    id_tag: str = ""
    started_at_s: float | None = None
    meter_start_wh: float | None = None
    ended_at_s: float | None = None
    meter_stop_wh: float | None = None
    stop_reason: str = ""
    # Number of distinct events stored for it (repeats are not counted).
    event_count: int = 0

    @property
    def is_open(self) -> bool:
        return self.ended_at_s is None

    @property
    def energy_wh(self) -> float | None:
        """Energy of the transaction (a difference of registers), when both ends are known."""
        if self.meter_start_wh is None or self.meter_stop_wh is None:
            return None
        return self.meter_stop_wh - self.meter_start_wh


@dataclass(frozen=True)
class SetpointRecord:
    """The last setpoint sent to a charger, and whether the charger confirmed it."""

    setpoint: Setpoint
    sent_at_s: float
    confirmed: bool = False
    confirmed_at_s: float | None = None

    @property
    def charger_id(self) -> str:
        return self.setpoint.charger_id


@dataclass(frozen=True)
class AuditHead:
    """The chain head, stored apart from the records (table ``audit_head``)."""

    seq: int
    hash: str

    # Number of records the chain holds according to the head (seq + 1).
    @property
    def count(self) -> int:
        return self.seq + 1


@dataclass(frozen=True)
class StoredAuditRow:
    """An audit record exactly as stored, for verification (columns and payload as they are)."""

    seq: int
    decision_id: str
    decided_at_s: float
    prev_hash: str
    hash: str
    payload: bytes
    #: Columns that hold a value of another type than theirs (SQLite keeps text in a REAL or
    #: BLOB column), each in words: such a column is given as NaN (``decided_at_s``) or empty
    #: (the others) rather than the reader failing on the whole chain.
    problems: tuple[str, ...] = ()


@runtime_checkable
class Store(Protocol):
    """What the edge controller, the OCPP central system, the audit log and the API persist through.

    Every method is a coroutine; a method returns only after its effect is committed (audit,
    sessions, transactions, setpoints: fsync/commit with full durability; telemetry: committed,
    durable against a killed process). Opening is lazy, but ``await store.open()`` at start-up
    surfaces errors early.
    """

    @property
    def description(self) -> str:
        """Where the data lives, for logs (``sqlite:/var/evcore/store``,
        ``postgresql://…/test#s``)."""
        ...

    @property
    def telemetry_retention_s(self) -> float:
        """How long meter samples and status history are kept (``purge_expired``)."""
        ...

    async def open(self) -> None:
        """Connect, create the database if needed and apply pending migrations."""
        ...

    async def close(self) -> None: ...

    async def schema_version(self) -> int:
        """Highest migration applied."""
        ...

    # -- sessions -------------------------------------------------------------------------------
    async def upsert_session(self, session: SessionRecord) -> None:
        """Insert or replace the session with this ``session_id``."""
        ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def list_open_sessions(self, charger_id: str | None = None) -> list[SessionRecord]: ...

    async def list_sessions(
        self, *, since_s: float | None = None, limit: int | None = None
    ) -> list[SessionRecord]:
        """Sessions started at or after ``since_s`` (all when None), newest first."""
        ...

    # -- transactions ---------------------------------------------------------------------------
    async def record_transaction(self, tx: TransactionEvent) -> bool:
        """Store one transaction event; False when this exact event was stored before (a replay or
        a reconnect repeat), in which case nothing changes."""
        ...

    async def get_transaction(
        self, charger_id: str, transaction_id: str
    ) -> TransactionRecord | None: ...

    async def list_open_transactions(self) -> list[TransactionRecord]: ...

    async def transaction_events(
        self, charger_id: str, transaction_id: str
    ) -> list[TransactionEvent]:
        """The stored events of one transaction in the order they occurred."""
        ...

    # -- setpoints ------------------------------------------------------------------------------
    async def record_setpoint_sent(self, setpoint: Setpoint, sent_at_s: float) -> None:
        """Remember ``setpoint`` as the last one sent to its charger (unconfirmed)."""
        ...

    async def add_setpoints(self, sent: Iterable[tuple[Setpoint, float]]) -> int:
        """Remember each ``(setpoint, sent_at_s)`` as the last one sent to its charger
        (unconfirmed), all in one transaction and one durable commit; returns how many chargers
        were written. A charger named twice keeps the later pair. A bad pair (no ``charger_id``,
        neither ``setpoint_a`` nor ``setpoint_w``, a non-finite time) refuses the whole batch
        with ``ValueError`` and nothing is stored. ``record_setpoint_sent`` is a batch of one."""
        ...

    async def confirm_setpoint(
        self, charger_id: str, decision_id: str, confirmed_at_s: float
    ) -> bool:
        """Mark the charger's last setpoint confirmed if it still is the one from
        ``decision_id``."""
        ...

    async def confirm_setpoints(self, confirmed: Iterable[tuple[str, str, float]]) -> int:
        """``confirm_setpoint`` for each ``(charger_id, decision_id, confirmed_at_s)`` in one
        transaction; returns how many setpoints were confirmed (a pair whose charger has since been
        sent a newer decision's setpoint confirms nothing)."""
        ...

    async def last_setpoint(self, charger_id: str) -> SetpointRecord | None: ...

    async def last_setpoints(self) -> dict[str, SetpointRecord]: ...

    # -- telemetry ------------------------------------------------------------------------------
    async def append_meter_samples(self, samples: Iterable[MeterSample]) -> int:
        """Append samples (each needs ``charger_id`` and a time); returns how many were stored."""
        ...

    async def record_status(self, status: ChargerStatus) -> None: ...

    async def meter_samples(
        self,
        charger_id: str,
        *,
        since_s: float | None = None,
        until_s: float | None = None,
        limit: int | None = None,
    ) -> list[MeterSample]:
        """Samples of one charger with ``since_s <= t < until_s``, oldest first (t = ``sampled_at``,
        or ``received_at`` when the charger sent no time)."""
        ...

    async def status_history(
        self, charger_id: str, *, since_s: float | None = None, until_s: float | None = None
    ) -> list[ChargerStatus]: ...

    async def latest_statuses(self) -> dict[str, ChargerStatus]:
        """The last status recorded per charger."""
        ...

    async def purge_telemetry(self, older_than_s: float) -> int:
        """Delete meter samples and status history older than ``older_than_s``; returns rows
        removed. The latest status of each charger is kept regardless."""
        ...

    async def purge_expired(self, now_s: float) -> int:
        """``purge_telemetry(now_s - telemetry_retention_s)``."""
        ...

    # -- station events -------------------------------------------------------------------------
    async def record_station_event(self, event: StationEvent) -> bool:
        """Store a station notification (security event, firmware / diagnostics / log status) with
        full durability; False when this exact event (station, kind, code, time) was stored
        before (a replay or a re-send), in which case nothing changes. The time is ``occurred_at``,
        or ``received_at`` when the station sent none."""
        ...

    async def station_events(
        self,
        station_id: str | None = None,
        *,
        kind: StationEventKind.ValueType | None = None,
        since_s: float | None = None,
        until_s: float | None = None,
        limit: int | None = None,
    ) -> list[StationEvent]:
        """Stored station events with ``since_s <= t < until_s`` (of one station and kind when
        given), oldest first."""
        ...

    # -- audit ----------------------------------------------------------------------------------
    async def append_audit(self, record: AuditRecord) -> None:
        """Append a sealed record (``hash`` set) if it extends the head; commit durably, record and
        head in one transaction. Raises :class:`AuditChainConflict` otherwise, writing nothing."""
        ...

    async def audit_head(self) -> AuditHead | None: ...

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
    ) -> list[AuditRecord]: ...

    async def audit_rows(self, *, after_seq: int = -1, limit: int = 1000) -> list[StoredAuditRow]:
        """Raw stored rows with ``seq > after_seq`` in seq order, for verification."""
        ...

    async def audit_charger_index(self, *, after_seq: int, upto_seq: int) -> dict[int, list[str]]:
        """The charger index ``audit_records(charger_id=…)`` uses, for ``after_seq < seq <=
        upto_seq``: seq → charger ids (sorted), for verification."""
        ...

    # -- small durable key/value (e.g. the audit publish mark) -----------------------------------
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    # -- consumer dedupe ------------------------------------------------------------------------
    async def mark_processed(self, consumer: str, event_id: str, at_s: float) -> bool:
        """Remember that ``consumer`` stored the effect of ``event_id``; False if it already had."""
        ...

    async def is_processed(self, consumer: str, event_id: str) -> bool: ...

    async def purge_processed(self, older_than_s: float) -> int: ...


@dataclass(frozen=True)
class StoreConfig:
    """The validated ``[store]`` section (see docs/store.md)."""

    kind: str = "embedded"
    # Embedded: a directory holding records.sqlite and telemetry.sqlite.
    path: str = "var/store"
    # PostgreSQL: a libpq connection string or URL, and the schema the tables live in.
    dsn: str = ""
    schema: str = "evcore"
    telemetry_retention_s: float = 7 * 24 * 3600.0
    connect_timeout_s: float = 5.0
    # The longest a read waits (a lock, a server that does not answer) before StoreUnavailable.
    read_timeout_s: float = 10.0
    # The longest a write waits (another writer's lock, a server that does not answer) before
    # StoreUnavailable; PostgreSQL: also how long the server keeps a session of ours idle inside
    # a transaction (one whose client went silent, holding its locks).
    write_timeout_s: float = 30.0
    # The longest opening a database waits (connecting, applying migrations: another process's
    # lock, a server or a file system that does not answer) before StoreUnavailable naming the
    # step; a migration that legitimately takes longer needs a larger value.
    open_timeout_s: float = 120.0

    @staticmethod
    def from_section(section: Mapping[str, object] | None) -> StoreConfig:
        if section is not None and not isinstance(section, Mapping):
            raise StoreConfigError(f"[store]: expected a table, got {type(section).__name__}")
        s = dict(section or {})
        known = {
            "kind",
            "path",
            "dsn",
            "schema",
            "telemetry_retention_s",
            "connect_timeout_s",
            "read_timeout_s",
            "write_timeout_s",
            "open_timeout_s",
        }
        unknown = sorted(set(s) - known)
        if unknown:
            raise StoreConfigError(
                f"[store]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        kind = s.get("kind", "embedded")
        if kind not in ("embedded", "postgres"):
            raise StoreConfigError(f"[store] kind must be 'embedded' or 'postgres', got {kind!r}")
        # A key of the other kind was taken in silence: dsn without kind = "postgres" opened the
        # embedded store (the default), and the database the operator looked at stayed empty.
        other = ("dsn", "schema") if kind == "embedded" else ("path",)
        stray = [k for k in other if k in s]
        if stray:
            given = "" if "kind" in s else " (the default)"
            fix = (
                "set kind = 'postgres' to use the database, or remove it"
                if kind == "embedded"
                else "remove it (the database keeps everything)"
            )
            raise StoreConfigError(
                f"[store] {stray[0]} is for kind = "
                f"{'postgres' if kind == 'embedded' else 'embedded'}, and this [store] is kind "
                f"= {kind!r}{given}: {fix}"
            )
        path = s.get("path", "var/store")
        if not isinstance(path, str) or not path:
            raise StoreConfigError(f"[store] path must be a non-empty string, got {path!r}")
        dsn = s.get("dsn", "")
        if not isinstance(dsn, str):
            raise StoreConfigError(f"[store] dsn must be a string, got {dsn!r}")
        if kind == "postgres" and not dsn:
            raise StoreConfigError("[store] kind = 'postgres' needs dsn (e.g. 'postgresql://…')")
        schema = s.get("schema", "evcore")
        if not isinstance(schema, str) or not _is_identifier(schema):
            raise StoreConfigError(
                f"[store] schema must be a plain identifier ([a-z_][a-z0-9_]*), got {schema!r}"
            )
        retention = _positive(s, "telemetry_retention_s", 7 * 24 * 3600.0)
        timeout = _positive(s, "connect_timeout_s", 5.0)
        read_timeout = _positive(s, "read_timeout_s", 10.0)
        write_timeout = _positive(s, "write_timeout_s", 30.0)
        open_timeout = _positive(s, "open_timeout_s", 120.0)
        return StoreConfig(
            kind=str(kind),
            path=path,
            dsn=dsn,
            schema=schema,
            telemetry_retention_s=retention,
            connect_timeout_s=timeout,
            read_timeout_s=read_timeout,
            write_timeout_s=write_timeout,
            open_timeout_s=open_timeout,
        )


def _positive(s: Mapping[str, object], key: str, default: float) -> float:
    value = s.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < math.inf  # (inf: kept for ever, and a cutoff of -inf)
    ):
        raise StoreConfigError(
            f"[store] {key} must be a positive finite number of seconds, got {value!r}"
        )
    return float(value)


def _is_identifier(name: str) -> bool:
    return (
        bool(name)
        and len(name) <= 63
        and (name[0].isascii() and (name[0].isalpha() or name[0] == "_"))
        and all(c.isascii() and (c.isalnum() or c == "_") for c in name)
        and name == name.lower()
    )
