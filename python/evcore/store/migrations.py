"""Versioned schema migrations for both stores, applied automatically by ``Store.open()``.

Each migration is ``(version, name, sql)``; versions only ever grow, an applied migration is never
edited (add a new one instead), and the applied versions are recorded in ``schema_migrations``.
The embedded store keeps committed records and telemetry in two SQLite files (different durability),
so it has two lists; PostgreSQL keeps everything in one schema.
"""

from __future__ import annotations

from typing import NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


_RECORDS_V1 = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    charger_id TEXT NOT NULL,
    started_at_s {real} NOT NULL,
    transaction_id TEXT NOT NULL DEFAULT '',
    id_tag TEXT NOT NULL DEFAULT '',
    departure_s {real},
    energy_requested_kwh {real},
    priority {real} NOT NULL DEFAULT 0,
    meter_start_wh {real},
    energy_delivered_kwh {real} NOT NULL DEFAULT 0,
    ended_at_s {real},
    updated_at_s {real} NOT NULL DEFAULT 0
);
CREATE INDEX sessions_open ON sessions (charger_id) WHERE ended_at_s IS NULL;
CREATE INDEX sessions_started ON sessions (started_at_s);

CREATE TABLE transactions (
    charger_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    evse_id INTEGER NOT NULL DEFAULT 0,
    id_tag TEXT NOT NULL DEFAULT '',
    started_at_s {real},
    meter_start_wh {real},
    ended_at_s {real},
    meter_stop_wh {real},
    stop_reason TEXT NOT NULL DEFAULT '',
    event_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (charger_id, transaction_id)
);

-- One row per distinct event; the key makes a replayed or repeated event a no-op.
CREATE TABLE transaction_events (
    charger_id TEXT NOT NULL,
    transaction_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    seq_no {bigint} NOT NULL,
    occurred_at_us {bigint} NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (charger_id, transaction_id, kind, seq_no, occurred_at_us)
);

CREATE TABLE setpoints_last (
    charger_id TEXT PRIMARY KEY,
    decision_id TEXT NOT NULL,
    payload {blob} NOT NULL,
    sent_at_s {real} NOT NULL,
    confirmed {bool} NOT NULL,
    confirmed_at_s {real}
);

-- The hash chain. seq is dense from 0; decision ids are unique.
CREATE TABLE audit_records (
    seq {bigint} PRIMARY KEY,
    decision_id TEXT NOT NULL UNIQUE,
    decided_at_s {real} NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    payload {blob} NOT NULL
);
CREATE INDEX audit_records_time ON audit_records (decided_at_s);

-- Which chargers a record concerns (setpoints and bindings), for `evcore audit show --charger`.
CREATE TABLE audit_chargers (
    charger_id TEXT NOT NULL,
    seq {bigint} NOT NULL,
    PRIMARY KEY (charger_id, seq)
);

-- The chain head, kept apart from the records: exactly one row (id = 1) once a record exists.
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq {bigint} NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE processed_events (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at_s {real} NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX processed_events_time ON processed_events (processed_at_s);
"""

_TELEMETRY_V1 = """
CREATE TABLE meter_samples (
    charger_id TEXT NOT NULL,
    t_s {real} NOT NULL,
    payload {blob} NOT NULL
);
CREATE INDEX meter_samples_charger_time ON meter_samples (charger_id, t_s);
CREATE INDEX meter_samples_time ON meter_samples (t_s);

CREATE TABLE status_history (
    charger_id TEXT NOT NULL,
    t_s {real} NOT NULL,
    payload {blob} NOT NULL
);
CREATE INDEX status_history_charger_time ON status_history (charger_id, t_s);
CREATE INDEX status_history_time ON status_history (t_s);

CREATE TABLE status_latest (
    charger_id TEXT PRIMARY KEY,
    t_s {real} NOT NULL,
    payload {blob} NOT NULL
);
"""

# Station notifications (security events, firmware / diagnostics / log status) are records that must
# not be lost, so they live with the committed records, not the telemetry. The key makes a replayed
# or re-sent notification a no-op.
_RECORDS_V2 = """
CREATE TABLE station_events (
    station_id TEXT NOT NULL,
    kind INTEGER NOT NULL,
    code TEXT NOT NULL,
    at_us {bigint} NOT NULL,
    at_s {real} NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (station_id, kind, code, at_us)
);
CREATE INDEX station_events_time ON station_events (at_s);
"""

# `evcore audit verify` compares the charger index with each record, a batch of seqs at a time: the
# primary key leads with charger_id, so without this every batch scanned the whole index.
_RECORDS_V3 = """
CREATE INDEX audit_chargers_seq ON audit_chargers (seq);
"""

# A meter sample resent by a station after a lost answer (or handed to the store again) was stored
# twice. One row per charger and sample time, as the bus keeps one event per charger and time:
# the first stored wins, the later copies are dropped here and refused by the key from now on.
_TELEMETRY_V2_SQLITE = """
DELETE FROM meter_samples WHERE rowid NOT IN (
    SELECT MIN(rowid) FROM meter_samples GROUP BY charger_id, t_s
);
DROP INDEX meter_samples_charger_time;
CREATE UNIQUE INDEX meter_samples_key ON meter_samples (charger_id, t_s);
"""
_TELEMETRY_V2_POSTGRES = """
DELETE FROM meter_samples a USING meter_samples b
    WHERE a.charger_id = b.charger_id AND a.t_s = b.t_s AND a.ctid > b.ctid;
DROP INDEX meter_samples_charger_time;
CREATE UNIQUE INDEX meter_samples_key ON meter_samples (charger_id, t_s);
"""

_SQLITE = {"real": "REAL", "bigint": "INTEGER", "blob": "BLOB", "bool": "INTEGER"}
_POSTGRES = {"real": "DOUBLE PRECISION", "bigint": "BIGINT", "blob": "BYTEA", "bool": "BOOLEAN"}

SQLITE_RECORDS: tuple[Migration, ...] = (
    Migration(
        1,
        "records: sessions, transactions, setpoints, audit chain, meta, processed ids",
        _RECORDS_V1.format(**_SQLITE),
    ),
    Migration(2, "records: station events", _RECORDS_V2.format(**_SQLITE)),
    Migration(3, "records: audit charger index by seq", _RECORDS_V3),
)
SQLITE_TELEMETRY: tuple[Migration, ...] = (
    Migration(1, "telemetry: meter samples, status history", _TELEMETRY_V1.format(**_SQLITE)),
    Migration(2, "telemetry: one meter sample per charger and time", _TELEMETRY_V2_SQLITE),
)
POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "records: sessions, transactions, setpoints, audit chain, meta, processed ids",
        _RECORDS_V1.format(**_POSTGRES),
    ),
    Migration(2, "telemetry: meter samples, status history", _TELEMETRY_V1.format(**_POSTGRES)),
    Migration(3, "records: station events", _RECORDS_V2.format(**_POSTGRES)),
    Migration(4, "records: audit charger index by seq", _RECORDS_V3),
    Migration(5, "telemetry: one meter sample per charger and time", _TELEMETRY_V2_POSTGRES),
)


def statements(sql: str) -> list[str]:
    """Split a migration into statements (no ';' inside our literals), dropping comments."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
