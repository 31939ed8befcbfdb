"""The cloud store's schema, numbered like ``evcore.store.migrations`` (never edit a released one;
add the next number). Every row is keyed by site first: one database serves many sites."""

from __future__ import annotations

from evcore.store.migrations import Migration

_RECORDS_V1 = """
-- Audit records as the edges sent them, kept once per (site, seq); gaps are allowed (uploads are
-- at least once and may arrive out of order), the chain is checked at every link both ends hold.
CREATE TABLE cloud_audit_records (
    site_id TEXT NOT NULL,
    seq {bigint} NOT NULL,
    hash TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    decision_id TEXT NOT NULL,
    decided_at_s {real} NOT NULL,
    stored_at_s {real} NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (site_id, seq)
);
CREATE UNIQUE INDEX cloud_audit_records_hash ON cloud_audit_records (site_id, hash);

-- Per site: the highest seq held without a gap from seq 0 (-1: seq 0 not held yet).
CREATE TABLE cloud_audit_progress (
    site_id TEXT PRIMARY KEY,
    contiguous_seq {bigint} NOT NULL
);

-- The latest topology per site; version counts the distinct topologies the site put.
CREATE TABLE cloud_topology (
    site_id TEXT PRIMARY KEY,
    version {bigint} NOT NULL,
    digest TEXT NOT NULL,
    config_version TEXT NOT NULL,
    stored_at_s {real} NOT NULL,
    payload {blob} NOT NULL
);

-- Plans per site and version (the cloud planner's output; GetPlan serves the newest).
CREATE TABLE cloud_plans (
    site_id TEXT NOT NULL,
    plan_version {bigint} NOT NULL,
    plan_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    computed_at_s {real},
    stored_at_s {real} NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (site_id, plan_version)
);
"""

_TELEMETRY_V1 = """
-- Telemetry batches as sent, once per (site, content digest): a re-sent batch is a repeat.
CREATE TABLE cloud_telemetry_batches (
    site_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    sample_count INTEGER NOT NULL,
    first_t_s {real},
    last_t_s {real},
    stored_at_s {real} NOT NULL,
    payload {blob} NOT NULL,
    PRIMARY KEY (site_id, digest)
);
CREATE INDEX cloud_telemetry_batches_time ON cloud_telemetry_batches (site_id, last_t_s);
"""

_RECORDS_V2 = """
-- Fleet curtailments (FleetApi): the latest split of each, by id; revision counts the splits and
-- the cancel, and guards against two workers splitting the same one at once.
CREATE TABLE cloud_fleet_curtailments (
    fleet_curtailment_id TEXT PRIMARY KEY,
    revision {bigint} NOT NULL,
    cancelled INTEGER NOT NULL,
    end_s {real} NOT NULL,
    updated_at_s {real} NOT NULL,
    payload {blob} NOT NULL
);
"""

_RECORDS_V3 = """
-- The highest revision of each fleet curtailment whose per-site signals the outbox accepted (0:
-- none). A revision above it was stored but not published (the cloud stopped in between): it is
-- published again at the next start or republish round. Rows from before this column start at 0
-- and are published once more (same ids: the edges replace by id).
ALTER TABLE cloud_fleet_curtailments ADD COLUMN published_revision {bigint} NOT NULL DEFAULT 0;
"""

_RECORDS_V4 = """
-- Per fleet curtailment, site and revision: the signal published to the site (docs/cloud.md
-- "Break before make"). The row is written before the outbox takes the signal (sent = 0), so a
-- cloud that stops in between still counts it as possibly held by the edge and sends it again.
-- max_kw NULL: a cancel (no limit). lowered = 1: below what the site could hold before it (the
-- revision's increases wait until its edge took it). taken_at_s: when the cloud saw the site's
-- edge (its durable consumer edge-grid) acknowledge it; NULL: not yet.
CREATE TABLE cloud_fleet_site_signals (
    fleet_curtailment_id TEXT NOT NULL,
    site_id TEXT NOT NULL,
    revision {bigint} NOT NULL,
    max_kw {real},
    lowered INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    sent INTEGER NOT NULL,
    published_at_s {real} NOT NULL,
    taken_at_s {real},
    PRIMARY KEY (fleet_curtailment_id, site_id, revision)
);
"""

_RECORDS_V5 = """
-- The window (start, end; epoch seconds) each fleet signal carried: a re-split that moves the
-- window gives a site whose increase waits an interim signal with the new window at once (NULL:
-- a row from before this column, its window unknown).
ALTER TABLE cloud_fleet_site_signals ADD COLUMN start_s {real};
ALTER TABLE cloud_fleet_site_signals ADD COLUMN end_s {real};
"""

_SQLITE = {"real": "REAL", "bigint": "INTEGER", "blob": "BLOB"}
_POSTGRES = {"real": "DOUBLE PRECISION", "bigint": "BIGINT", "blob": "BYTEA"}

SQLITE_RECORDS: tuple[Migration, ...] = (
    Migration(1, "cloud records: audit, progress, topology, plans", _RECORDS_V1.format(**_SQLITE)),
    Migration(2, "cloud records: fleet curtailments", _RECORDS_V2.format(**_SQLITE)),
    Migration(3, "cloud records: fleet publication mark", _RECORDS_V3.format(**_SQLITE)),
    Migration(4, "cloud records: fleet signals per site", _RECORDS_V4.format(**_SQLITE)),
    Migration(5, "cloud records: fleet signal windows", _RECORDS_V5.format(**_SQLITE)),
)
SQLITE_TELEMETRY: tuple[Migration, ...] = (
    Migration(1, "cloud telemetry: batches", _TELEMETRY_V1.format(**_SQLITE)),
)
POSTGRES: tuple[Migration, ...] = (
    Migration(
        1, "cloud records: audit, progress, topology, plans", _RECORDS_V1.format(**_POSTGRES)
    ),
    Migration(2, "cloud telemetry: batches", _TELEMETRY_V1.format(**_POSTGRES)),
    Migration(3, "cloud records: fleet curtailments", _RECORDS_V2.format(**_POSTGRES)),
    Migration(4, "cloud records: fleet publication mark", _RECORDS_V3.format(**_POSTGRES)),
    Migration(5, "cloud records: fleet signals per site", _RECORDS_V4.format(**_POSTGRES)),
    Migration(6, "cloud records: fleet signal windows", _RECORDS_V5.format(**_POSTGRES)),
)
