"""The cloud's persistence: many sites' audit chains, telemetry batches, topologies and plans, in
PostgreSQL (production) or SQLite (embedded, tests), on the edge store's backends and migration
machinery (``evcore.store.sql.Backend``: one connection per worker thread, numbered migrations).

Durability follows the edge store: audit records, topologies and plans are fsynced at commit
(SQLite ``synchronous=FULL`` / PostgreSQL ``synchronous_commit = on``); telemetry batches go to
their own file / connection with relaxed commits.

The audit chain check lives here, inside the transaction that stores a record, so that what it
compares against cannot change under it (a per-site advisory lock on PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` excludes other writers). This module never rewrites or repairs a record: it
keeps one copy of each and refuses one that breaks the chain.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from evcore.audit.chain import record_hash
from evcore.cloud import migrations as cloud_migrations
from evcore.store import split_postgres_url, store_url_directory
from evcore.store.base import StoreConfigError, StoreError
from evcore.store.migrations import Migration
from evcore.store.sql import (
    Backend,
    BackendStore,
    Tx,
    parse_message,
    sample_time_s,
    ts_s,
)
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.fleet_api_pb2 import FleetCurtailmentResult
from evcore.v1.meter_pb2 import MeterSample, MeterSampleBatch
from evcore.v1.plan_pb2 import Plan
from evcore.v1.topology_pb2 import SiteTopology

RECORDS_FILE = "cloud-records.sqlite"
TELEMETRY_FILE = "cloud-telemetry.sqlite"
DEFAULT_SCHEMA = "evcore_cloud"
#: ``[store] read_timeout_s``: the longest a read waits (the edge store's default).
DEFAULT_READ_TIMEOUT_S = 10.0
#: ``[store] write_timeout_s``: the longest a write waits (the edge store's default).
DEFAULT_WRITE_TIMEOUT_S = 30.0
#: ``[store] open_timeout_s``: the longest connecting and migrating wait (the edge store's default).
DEFAULT_OPEN_TIMEOUT_S = 120.0


class FleetRevisionConflict(Exception):
    """Another worker stored a newer split of the same fleet curtailment first."""


class AuditRefused(ValueError):
    """A record that breaks its site's chain; ``seq`` names it, the message says what is wrong."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason


@dataclass(frozen=True)
class AuditBatchResult:
    """What one :meth:`CloudStore.put_audit` call did. Records before ``refused`` were stored (or
    recognised as repeats) and committed; ``refused`` and everything after it were not."""

    stored: int
    duplicates: int
    # Highest seq held without a gap from seq 0; -1 while seq 0 is not held.
    contiguous_seq: int
    refused: AuditRefused | None = None


@dataclass(frozen=True)
class TelemetryBatchResult:
    stored: int
    duplicates: int
    # Why the batch after the stored ones was refused (its samples lack a time); None when none.
    refused: str | None = None


@dataclass(frozen=True)
class StoredTopology:
    version: int
    stored_at_s: float
    topology: SiteTopology


@dataclass(frozen=True)
class SiteActivity:
    """What the cloud holds of one site (None: nothing of that kind), for operators' status."""

    site_id: str
    audit_last_seq: int | None = None
    audit_last_decided_at_s: float | None = None
    audit_last_stored_at_s: float | None = None
    # Records held from seq 0 without a gap.
    audit_contiguous_count: int = 0
    telemetry_last_sample_s: float | None = None
    telemetry_last_stored_at_s: float | None = None
    topology_version: int = 0
    topology_stored_at_s: float | None = None


@dataclass(frozen=True)
class FleetSiteSignal:
    """One signal of a fleet curtailment's revision to one site (``cloud_fleet_site_signals``)."""

    site_id: str
    revision: int
    max_kw: float | None  # None: a cancel (no limit from this fleet curtailment)
    lowered: bool  # below what the site could hold before it: the revision's increases wait
    event_id: str
    sent: bool  # the outbox accepted it
    published_at_s: float
    taken_at_s: float | None  # when its edge was seen to have acknowledged it
    start_s: float | None = None  # the window it carried (None: unknown, an older row)
    end_s: float | None = None


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _short(h: str) -> str:
    return f"{h[:16]}…" if len(h) > 16 else repr(h)


class CloudStore(BackendStore):
    """Per-site records of the cloud. Every method is one transaction and returns after commit."""

    kind = "cloud store"

    def __init__(
        self,
        records: Backend,
        telemetry: Backend,
        *,
        description: str,
        site_lock: bool = False,
    ) -> None:
        super().__init__(records, telemetry, description=description)
        # PostgreSQL: serialise chain checks per site (two streams of one site at once).
        self._site_lock = site_lock

    async def _check_opened(self) -> None:
        # The migration table is per schema: an edge store's schema would hold versions 1..4
        # already and our migrations would be skipped silently.
        await self._exec(self._records, _require_cloud_tables)

    def _lock_site(self, tx: Tx, site_id: str) -> None:
        if self._site_lock:
            tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"evcore.cloud:{site_id}",))

    # -- audit ----------------------------------------------------------------------------------
    async def put_audit(
        self, site_id: str, records: Sequence[AuditRecord], *, now_s: float
    ) -> AuditBatchResult:
        """Check and store ``records`` of ``site_id`` in order, in one transaction.

        A record already held (same hash) is a repeat. A record whose hash is not the hash of its
        content, that claims a seq held with another hash, whose ``prev_hash`` is not the held
        predecessor's hash, or whose hash is not the held successor's ``prev_hash``, is refused:
        what came before it in ``records`` is committed, it and what follows are not.
        """
        _require_site(site_id)
        batch = list(records)

        def op(tx: Tx) -> AuditBatchResult:
            self._lock_site(tx, site_id)
            stored = duplicates = 0
            refused: AuditRefused | None = None
            for record in batch:
                try:
                    if _put_one(tx, site_id, record, now_s):
                        stored += 1
                    else:
                        duplicates += 1
                except AuditRefused as exc:
                    refused = exc
                    break
            contiguous = _advance_contiguous(tx, site_id) if stored else _contiguous(tx, site_id)
            return AuditBatchResult(stored, duplicates, contiguous, refused)

        return await self._run(self._records, op)

    async def contiguous_seq(self, site_id: str) -> int:
        """Highest seq of the site held without a gap from seq 0; -1 when seq 0 is not held."""
        return await self._read(self._records, lambda tx: _contiguous(tx, site_id))

    async def audit_records(
        self, site_id: str, *, after_seq: int = -1, limit: int = 1000
    ) -> list[AuditRecord]:
        """The site's held records after ``after_seq``, in seq order (gaps are simply absent)."""

        def op(tx: Tx) -> list[AuditRecord]:
            rows = tx.all(
                "SELECT payload FROM cloud_audit_records WHERE site_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?",
                (site_id, after_seq, limit),
            )
            return [parse_message(AuditRecord, r[0]) for r in rows]

        return await self._read(self._records, op)

    # -- telemetry ------------------------------------------------------------------------------
    async def put_telemetry(
        self, site_id: str, batches: Iterable[MeterSampleBatch], *, now_s: float
    ) -> TelemetryBatchResult:
        """Store batches (each whole) in order, in one transaction. A batch with the same content
        as one held for the site is a repeat; an empty batch is neither. A batch with a sample
        without time is refused: the batches before it are committed, it and the rest are not."""
        _require_site(site_id)
        rows: list[tuple[object, ...]] = []
        seen: set[str] = set()
        repeats_in_call = 0
        refused: str | None = None
        for i, b in enumerate(batches):
            if not b.samples:
                continue
            try:
                times = [sample_time_s(s) for s in b.samples]
            except ValueError as exc:
                refused = f"batch {i} of this call: {exc}"
                break
            payload = b.SerializeToString(deterministic=True)
            digest = _digest(payload)
            if digest in seen:
                repeats_in_call += 1
                continue
            seen.add(digest)
            rows.append((site_id, digest, len(b.samples), min(times), max(times), now_s, payload))

        def op(tx: Tx) -> TelemetryBatchResult:
            stored = 0
            for row in rows:
                stored += tx.execute(
                    "INSERT INTO cloud_telemetry_batches (site_id, digest, sample_count,"
                    " first_t_s, last_t_s, stored_at_s, payload) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (site_id, digest) DO NOTHING",
                    row,
                )
            return TelemetryBatchResult(stored, len(rows) - stored + repeats_in_call, refused)

        return await self._run(self._telemetry, op)

    async def telemetry_batches(self, site_id: str, *, limit: int = 1000) -> list[MeterSampleBatch]:
        """The site's batches, oldest sample time first."""

        def op(tx: Tx) -> list[MeterSampleBatch]:
            rows = tx.all(
                "SELECT payload FROM cloud_telemetry_batches WHERE site_id = ?"
                " ORDER BY last_t_s, digest LIMIT ?",
                (site_id, limit),
            )
            return [parse_message(MeterSampleBatch, payload) for (payload,) in rows]

        return await self._read(self._telemetry, op)

    # -- topology -------------------------------------------------------------------------------
    async def put_topology(
        self, site_id: str, topology: SiteTopology, *, now_s: float
    ) -> tuple[int, bool]:
        """Keep ``topology`` (already validated) as the site's latest; returns (version, stored).
        The same topology as the latest again is not stored (False, version unchanged);
        ``loaded_at`` is left out of the comparison (an edge restart reloads the same tree)."""
        _require_site(site_id)
        payload = topology.SerializeToString(deterministic=True)
        same = SiteTopology()
        same.CopyFrom(topology)
        same.ClearField("loaded_at")
        digest = _digest(same.SerializeToString(deterministic=True))

        def op(tx: Tx) -> tuple[int, bool]:
            self._lock_site(tx, site_id)
            row = tx.one("SELECT version, digest FROM cloud_topology WHERE site_id = ?", (site_id,))
            if row is not None and row[1] == digest:
                return int(row[0]), False
            version = 1 if row is None else int(row[0]) + 1
            tx.execute(
                "INSERT INTO cloud_topology (site_id, version, digest, config_version,"
                " stored_at_s, payload) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site_id) DO UPDATE"
                " SET version = excluded.version, digest = excluded.digest,"
                " config_version = excluded.config_version, stored_at_s = excluded.stored_at_s,"
                " payload = excluded.payload",
                (site_id, version, digest, topology.config_version, now_s, payload),
            )
            return version, True

        return await self._run(self._records, op)

    async def topology(self, site_id: str) -> StoredTopology | None:
        def op(tx: Tx) -> StoredTopology | None:
            row = tx.one(
                "SELECT version, stored_at_s, payload FROM cloud_topology WHERE site_id = ?",
                (site_id,),
            )
            if row is None:
                return None
            t = parse_message(SiteTopology, row[2])
            return StoredTopology(int(row[0]), float(row[1]), t)

        return await self._read(self._records, op)

    async def latest_samples(
        self, site_id: str, *, since_s: float, until_s: float = math.inf
    ) -> dict[str, MeterSample]:
        """Per charger the newest sample of the site taken at or after ``since_s`` and at or
        before ``until_s`` (from the batches whose last sample is that recent and whose first is
        not later): a sample dated in the future (an edge clock ahead) would otherwise stay the
        newest, and stand for the charger's demand, until its date came."""
        until = until_s if math.isfinite(until_s) else 1e300

        def op(tx: Tx) -> dict[str, MeterSample]:
            rows = tx.all(
                "SELECT payload FROM cloud_telemetry_batches WHERE site_id = ? AND last_t_s >= ?"
                " AND (first_t_s IS NULL OR first_t_s <= ?)"
                " ORDER BY last_t_s DESC LIMIT 1000",
                (site_id, since_s, until),
            )
            newest: dict[str, tuple[float, MeterSample]] = {}
            for (payload,) in rows:
                for sample in parse_message(MeterSampleBatch, payload).samples:
                    t = sample_time_s(sample)
                    held = newest.get(sample.charger_id)
                    if since_s <= t <= until and (held is None or t > held[0]):
                        newest[sample.charger_id] = (t, sample)
            return {cid: s for cid, (_, s) in newest.items()}

        return await self._read(self._telemetry, op)

    # -- retention (never audit records) -------------------------------------------------------
    async def telemetry_sites(self) -> list[str]:
        return await self._read(
            self._telemetry,
            lambda tx: [
                str(r[0]) for r in tx.all("SELECT DISTINCT site_id FROM cloud_telemetry_batches")
            ],
        )

    async def plan_sites(self) -> list[str]:
        return await self._read(
            self._records,
            lambda tx: [str(r[0]) for r in tx.all("SELECT DISTINCT site_id FROM cloud_plans")],
        )

    async def purge_telemetry_batch(self, site_id: str, *, before_s: float, rows: int) -> int:
        """Delete at most ``rows`` of the site's telemetry batches whose newest sample is before
        ``before_s``, in one short transaction (the (site, last_t_s) index finds them); returns
        how many. Callers loop until it returns fewer than ``rows``."""

        def op(tx: Tx) -> int:
            return tx.execute(
                "DELETE FROM cloud_telemetry_batches WHERE site_id = ? AND digest IN"
                " (SELECT digest FROM cloud_telemetry_batches WHERE site_id = ? AND last_t_s < ?"
                " LIMIT ?)",
                (site_id, site_id, before_s, rows),
            )

        return await self._run(self._telemetry, op)

    async def purge_plans_batch(self, site_id: str, *, keep: int, rows: int) -> int:
        """Delete at most ``rows`` of the site's plans below its newest ``keep`` versions, in one
        short transaction; returns how many."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep!r}")

        def op(tx: Tx) -> int:
            return tx.execute(
                "DELETE FROM cloud_plans WHERE site_id = ? AND plan_version IN"
                " (SELECT plan_version FROM cloud_plans WHERE site_id = ?"
                " ORDER BY plan_version DESC LIMIT ? OFFSET ?)",
                (site_id, site_id, rows, keep),
            )

        return await self._run(self._records, op)

    # -- status -------------------------------------------------------------------------------
    async def site_activity(self, site_ids: Sequence[str] = ()) -> dict[str, SiteActivity]:
        """Per site (``site_ids``, or every site that put a topology or uploaded audit records or
        telemetry) its newest audit record, gap-free count, newest telemetry sample and topology
        version; a named site the cloud holds nothing of is absent. Every figure is an indexed
        lookup per site (no count over a site's rows)."""
        wanted = list(dict.fromkeys(site_ids))

        def telemetry_op(tx: Tx) -> dict[str, tuple[float, float]]:
            sites = wanted or [
                r[0] for r in tx.all("SELECT DISTINCT site_id FROM cloud_telemetry_batches")
            ]
            out: dict[str, tuple[float, float]] = {}
            for site in sites:
                row = tx.one(
                    "SELECT last_t_s, stored_at_s FROM cloud_telemetry_batches"
                    " WHERE site_id = ? AND last_t_s IS NOT NULL"
                    " ORDER BY last_t_s DESC LIMIT 1",
                    (site,),
                )
                if row is not None:
                    out[str(site)] = (float(row[0]), float(row[1]))
            return out

        telemetry = await self._read(self._telemetry, telemetry_op)

        def records_op(tx: Tx) -> dict[str, SiteActivity]:
            sites = wanted or sorted(
                {
                    str(r[0])
                    for r in tx.all(
                        "SELECT DISTINCT site_id FROM cloud_audit_records"
                        " UNION SELECT site_id FROM cloud_topology"
                    )
                }
                | set(telemetry)
            )
            out: dict[str, SiteActivity] = {}
            for site in sites:
                audit = tx.one(
                    "SELECT seq, decided_at_s, stored_at_s FROM cloud_audit_records"
                    " WHERE site_id = ? ORDER BY seq DESC LIMIT 1",
                    (site,),
                )
                topo = tx.one(
                    "SELECT version, stored_at_s FROM cloud_topology WHERE site_id = ?", (site,)
                )
                tel = telemetry.get(site)
                if audit is None and topo is None and tel is None:
                    continue
                out[site] = SiteActivity(
                    site,
                    audit_last_seq=None if audit is None else int(audit[0]),
                    audit_last_decided_at_s=None if audit is None else float(audit[1]),
                    audit_last_stored_at_s=None if audit is None else float(audit[2]),
                    audit_contiguous_count=_contiguous(tx, site) + 1,
                    telemetry_last_sample_s=None if tel is None else tel[0],
                    telemetry_last_stored_at_s=None if tel is None else tel[1],
                    topology_version=0 if topo is None else int(topo[0]),
                    topology_stored_at_s=None if topo is None else float(topo[1]),
                )
            return out

        return await self._read(self._records, records_op)

    # -- fleet curtailments ---------------------------------------------------------------------
    async def put_fleet_curtailment(self, result: FleetCurtailmentResult, *, now_s: float) -> None:
        """Keep ``result`` as the latest of its fleet curtailment. Its ``revision`` must be one
        above the held one (1 when none is held); otherwise ``FleetRevisionConflict``: another
        worker split it in the meantime."""
        fid = result.curtailment.fleet_curtailment_id
        if not fid:
            raise ValueError("fleet_curtailment_id is required")
        payload = result.SerializeToString(deterministic=True)
        end_s = ts_s(result.curtailment.end)

        def op(tx: Tx) -> None:
            self._lock_site(tx, f"fleet:{fid}")
            row = tx.one(
                "SELECT revision FROM cloud_fleet_curtailments WHERE fleet_curtailment_id = ?",
                (fid,),
            )
            held = 0 if row is None else int(row[0])
            if result.revision != held + 1:
                raise FleetRevisionConflict(
                    f"fleet curtailment {fid!r} is at revision {held}; revision "
                    f"{result.revision} was split from an older one"
                )
            tx.execute(
                "INSERT INTO cloud_fleet_curtailments (fleet_curtailment_id, revision, cancelled,"
                " end_s, updated_at_s, payload) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (fleet_curtailment_id) DO UPDATE SET revision = excluded.revision,"
                " cancelled = excluded.cancelled, end_s = excluded.end_s,"
                " updated_at_s = excluded.updated_at_s, payload = excluded.payload",
                (fid, result.revision, 1 if result.cancelled else 0, end_s, now_s, payload),
            )

        await self._run(self._records, op)

    async def fleet_curtailment(self, fleet_curtailment_id: str) -> FleetCurtailmentResult | None:
        def op(tx: Tx) -> FleetCurtailmentResult | None:
            row = tx.one(
                "SELECT payload FROM cloud_fleet_curtailments WHERE fleet_curtailment_id = ?",
                (fleet_curtailment_id,),
            )
            return None if row is None else parse_message(FleetCurtailmentResult, row[0])

        return await self._read(self._records, op)

    async def mark_fleet_published(self, fleet_curtailment_id: str, revision: int) -> bool:
        """Record that every signal of ``revision`` was accepted by the outbox. False when a
        revision at or above it was recorded already (nothing changes)."""

        def op(tx: Tx) -> bool:
            return (
                tx.execute(
                    "UPDATE cloud_fleet_curtailments SET published_revision = ?"
                    " WHERE fleet_curtailment_id = ? AND published_revision < ?",
                    (revision, fleet_curtailment_id, revision),
                )
                > 0
            )

        return await self._run(self._records, op)

    async def fleet_published_revision(self, fleet_curtailment_id: str) -> int:
        """The highest revision recorded as published (0: none, or no such fleet curtailment)."""

        def op(tx: Tx) -> int:
            row = tx.one(
                "SELECT published_revision FROM cloud_fleet_curtailments"
                " WHERE fleet_curtailment_id = ?",
                (fleet_curtailment_id,),
            )
            return 0 if row is None else int(row[0])

        return await self._read(self._records, op)

    async def unpublished_fleet_curtailments(self, *, now_s: float) -> list[FleetCurtailmentResult]:
        """Fleet curtailments (cancelled ones too) whose latest revision is stored but not
        recorded as published and whose window has not ended at ``now_s``, by id."""

        def op(tx: Tx) -> list[FleetCurtailmentResult]:
            rows = tx.all(
                "SELECT payload FROM cloud_fleet_curtailments"
                " WHERE published_revision < revision AND end_s > ?"
                " ORDER BY fleet_curtailment_id",
                (now_s,),
            )
            return [parse_message(FleetCurtailmentResult, r[0]) for r in rows]

        return await self._read(self._records, op)

    async def fleet_curtailments(
        self, *, include_cancelled: bool = False
    ) -> list[FleetCurtailmentResult]:
        """Held fleet curtailments by id (cancelled ones only when asked)."""

        def op(tx: Tx) -> list[FleetCurtailmentResult]:
            rows = tx.all(
                "SELECT payload FROM cloud_fleet_curtailments WHERE cancelled <= ?"
                " ORDER BY fleet_curtailment_id",
                (1 if include_cancelled else 0,),
            )
            return [parse_message(FleetCurtailmentResult, r[0]) for r in rows]

        return await self._read(self._records, op)

    async def fleet_site_signals(self, fleet_curtailment_id: str) -> list[FleetSiteSignal]:
        """Every signal of the fleet curtailment to every site, by site then revision."""

        def op(tx: Tx) -> list[FleetSiteSignal]:
            rows = tx.all(
                "SELECT site_id, revision, max_kw, lowered, event_id, sent, published_at_s,"
                " taken_at_s, start_s, end_s FROM cloud_fleet_site_signals"
                " WHERE fleet_curtailment_id = ?"
                " ORDER BY site_id, revision",
                (fleet_curtailment_id,),
            )
            return [
                FleetSiteSignal(
                    str(r[0]),
                    int(r[1]),
                    None if r[2] is None else float(r[2]),
                    bool(r[3]),
                    str(r[4]),
                    bool(r[5]),
                    float(r[6]),
                    None if r[7] is None else float(r[7]),
                    None if r[8] is None else float(r[8]),
                    None if r[9] is None else float(r[9]),
                )
                for r in rows
            ]

        return await self._read(self._records, op)

    async def put_fleet_site_signals(
        self, fleet_curtailment_id: str, signals: Sequence[FleetSiteSignal]
    ) -> None:
        """Record signals about to be published (one transaction; a row held already stays)."""

        def op(tx: Tx) -> None:
            for sig in signals:
                tx.execute(
                    "INSERT INTO cloud_fleet_site_signals (fleet_curtailment_id, site_id,"
                    " revision, max_kw, lowered, event_id, sent, published_at_s, taken_at_s,"
                    " start_s, end_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (fleet_curtailment_id, site_id, revision) DO NOTHING",
                    (
                        fleet_curtailment_id,
                        sig.site_id,
                        sig.revision,
                        sig.max_kw,
                        1 if sig.lowered else 0,
                        sig.event_id,
                        1 if sig.sent else 0,
                        sig.published_at_s,
                        sig.taken_at_s,
                        sig.start_s,
                        sig.end_s,
                    ),
                )

        await self._run(self._records, op)

    async def mark_fleet_site_signal(
        self,
        fleet_curtailment_id: str,
        site_id: str,
        revision: int,
        *,
        sent: bool = False,
        taken_at_s: float | None = None,
    ) -> None:
        """Record that the outbox accepted a signal (``sent``) or that its edge took it
        (``taken_at_s``, kept from the first time it was seen)."""

        def op(tx: Tx) -> None:
            key = (fleet_curtailment_id, site_id, revision)
            if sent:
                tx.execute(
                    "UPDATE cloud_fleet_site_signals SET sent = 1"
                    " WHERE fleet_curtailment_id = ? AND site_id = ? AND revision = ?",
                    key,
                )
            if taken_at_s is not None:
                tx.execute(
                    "UPDATE cloud_fleet_site_signals SET taken_at_s = ?"
                    " WHERE fleet_curtailment_id = ? AND site_id = ? AND revision = ?"
                    " AND taken_at_s IS NULL",
                    (taken_at_s, *key),
                )

        await self._run(self._records, op)

    # -- plans ----------------------------------------------------------------------------------
    async def put_plan(self, site_id: str, plan: Plan, *, now_s: float) -> bool:
        """Keep a plan of the site under its ``plan_version`` (> 0); False when that plan is held
        already. Another plan under a held version is a ``ValueError`` (versions name one plan)."""
        _require_site(site_id)
        if plan.plan_version <= 0:
            raise ValueError(f"plan {plan.plan_id!r} of site {site_id!r}: plan_version must be > 0")
        payload = plan.SerializeToString(deterministic=True)
        digest = _digest(payload)
        computed = ts_s(plan.computed_at) if plan.HasField("computed_at") else None

        def op(tx: Tx) -> bool:
            row = tx.one(
                "SELECT digest, plan_id FROM cloud_plans WHERE site_id = ? AND plan_version = ?",
                (site_id, plan.plan_version),
            )
            if row is not None:
                if row[0] == digest:
                    return False
                raise ValueError(
                    f"site {site_id!r} holds plan {row[1]!r} as version {plan.plan_version} "
                    f"already; plan {plan.plan_id!r} needs a new version"
                )
            tx.execute(
                "INSERT INTO cloud_plans (site_id, plan_version, plan_id, digest, computed_at_s,"
                " stored_at_s, payload) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (site_id, plan.plan_version, plan.plan_id, digest, computed, now_s, payload),
            )
            return True

        return await self._run(self._records, op)

    async def plan_versions(self, site_id: str) -> list[int]:
        """The versions of the site's plans held, ascending."""
        return await self._read(
            self._records,
            lambda tx: [
                int(r[0])
                for r in tx.all(
                    "SELECT plan_version FROM cloud_plans WHERE site_id = ? ORDER BY plan_version",
                    (site_id,),
                )
            ],
        )

    async def newest_plan(self, site_id: str, *, newer_than_version: int = 0) -> Plan | None:
        """The site's plan with the highest version above ``newer_than_version``; None if none."""

        # Beyond the BIGINT column no plan is newer (SQLite raised OverflowError: INTERNAL).
        above = min(int(newer_than_version), 2**63 - 1)

        def op(tx: Tx) -> Plan | None:
            row = tx.one(
                "SELECT payload FROM cloud_plans WHERE site_id = ? AND plan_version > ?"
                " ORDER BY plan_version DESC LIMIT 1",
                (site_id, above),
            )
            return None if row is None else parse_message(Plan, row[0])

        return await self._read(self._records, op)


def _require_site(site_id: str) -> None:
    if not site_id:
        raise ValueError("site_id is required")


def _require_cloud_tables(tx: Tx) -> None:
    try:
        tx.one("SELECT COUNT(*) FROM cloud_audit_progress")
    except Exception as exc:
        raise StoreError(
            "the store's schema has migrations applied but no cloud tables: it belongs to another "
            "store (an edge's?); give the cloud its own schema or directory"
        ) from exc


def _put_one(tx: Tx, site_id: str, record: AuditRecord, now_s: float) -> bool:
    """Check one record against its content and its held neighbours; insert it. False: a repeat."""
    seq = int(record.seq)
    if seq >= 2**63 - 1:  # the BIGINT column (and its neighbour, seq + 1); no real chain gets there
        raise AuditRefused(seq, "seq is beyond what the store can hold (2^63 - 2)")
    for name, value in (("hash", record.hash), ("prev_hash", record.prev_hash)):
        if not value.isascii():
            # Hashes are hex digests; this one could not even be hashed over.
            raise AuditRefused(seq, f"{name} is not ASCII (a hex digest is expected)")
    for name, value in (("decision_id", record.decision_id), ("prev_hash", record.prev_hash)):
        if "\x00" in value:
            # Kept in a text column: PostgreSQL refused it (INTERNAL, retried for ever), SQLite
            # took it. Refused alike on both.
            raise AuditRefused(seq, f"{name} holds a NUL character, which the store cannot keep")
    computed = record_hash(record)
    if record.hash != computed:
        raise AuditRefused(
            seq,
            f"hash {_short(record.hash)} does not match the record's content "
            f"(computed {_short(computed)}): the record was changed after it was sealed",
        )
    held = tx.one(
        "SELECT hash FROM cloud_audit_records WHERE site_id = ? AND seq = ?", (site_id, seq)
    )
    if held is not None:
        if held[0] == record.hash:
            return False
        raise AuditRefused(
            seq,
            f"another record is held at this seq (hash {_short(held[0])}, this one "
            f"{_short(record.hash)}): the site's chain forked",
        )
    if seq == 0:
        if record.prev_hash:
            raise AuditRefused(0, "the first record of a chain must have an empty prev_hash")
    else:
        before = tx.one(
            "SELECT hash FROM cloud_audit_records WHERE site_id = ? AND seq = ?",
            (site_id, seq - 1),
        )
        if before is not None and before[0] != record.prev_hash:
            raise AuditRefused(
                seq,
                f"prev_hash {_short(record.prev_hash)} does not match the hash of the held seq "
                f"{seq - 1} ({_short(before[0])})",
            )
    after = tx.one(
        "SELECT prev_hash FROM cloud_audit_records WHERE site_id = ? AND seq = ?",
        (site_id, seq + 1),
    )
    if after is not None and after[0] != record.hash:
        raise AuditRefused(
            seq,
            f"hash {_short(record.hash)} is not the prev_hash of the held seq {seq + 1} "
            f"({_short(after[0])})",
        )
    tx.execute(
        "INSERT INTO cloud_audit_records (site_id, seq, hash, prev_hash, decision_id,"
        " decided_at_s, stored_at_s, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            site_id,
            seq,
            record.hash,
            record.prev_hash,
            record.decision_id,
            ts_s(record.decided_at),
            now_s,
            record.SerializeToString(deterministic=True),
        ),
    )
    return True


def _contiguous(tx: Tx, site_id: str) -> int:
    row = tx.one("SELECT contiguous_seq FROM cloud_audit_progress WHERE site_id = ?", (site_id,))
    return -1 if row is None else int(row[0])


def _advance_contiguous(tx: Tx, site_id: str) -> int:
    """Move the site's gap-free mark over whatever now follows it."""
    start = _contiguous(tx, site_id)
    mark = start
    while True:
        rows = tx.all(
            "SELECT seq FROM cloud_audit_records WHERE site_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (site_id, mark, 1000),
        )
        for (seq,) in rows:
            if int(seq) != mark + 1:
                break
            mark += 1
        else:
            if len(rows) == 1000:
                continue
        break
    if mark != start:
        tx.execute(
            "INSERT INTO cloud_audit_progress (site_id, contiguous_seq) VALUES (?, ?)"
            " ON CONFLICT (site_id) DO UPDATE SET contiguous_seq = excluded.contiguous_seq",
            (site_id, mark),
        )
    return mark


def open_cloud_store(
    url: str,
    base_dir: Path | str = ".",
    *,
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
    write_timeout_s: float | None = DEFAULT_WRITE_TIMEOUT_S,
    open_timeout_s: float | None = DEFAULT_OPEN_TIMEOUT_S,
) -> CloudStore:
    """A cloud store from a URL: ``sqlite:DIR`` (or a plain directory; relative to ``base_dir``)
    or ``postgresql://user@host:port/db?schema=NAME`` (schema defaults to ``evcore_cloud``).
    Nothing is opened until ``open()``.

    Every read waits at most ``read_timeout_s`` (``[store] read_timeout_s``; None: unbounded),
    then raises ``StoreUnavailable`` naming the store, as the edge store's reads do
    (``evcore.store.sql.BackendStore._read``): a PostgreSQL server that stops answering held a
    handler until its caller's deadline, and a background task (republish, re-split, retention)
    for ever. Every write waits at most ``write_timeout_s`` (``[store] write_timeout_s``; the
    edge store's bound, docs/store.md): a server that went silent during a write held the
    store's one worker for as long as TCP keepalive took (about 2 h with libpq's defaults), and
    every later call queued behind it. A write cut short says whether anything was committed;
    every upload is idempotent, so the caller's retry is safe. Connecting and applying migrations
    wait at most ``open_timeout_s`` (``[store] open_timeout_s``): another process holding the
    migrations' lock, or a server silent while the connection is set up, held ``open()`` and the
    cloud's start for ever."""
    if url.startswith(("postgresql://", "postgres://")):
        from evcore.store.postgres import PostgresBackend

        class _Pg(PostgresBackend):
            def migrations(self) -> Sequence[Migration]:
                return cloud_migrations.POSTGRES

        parts = urlsplit(url)
        dsn, schema = split_postgres_url(url, DEFAULT_SCHEMA)
        if not schema.replace("_", "").isalnum():
            raise StoreConfigError(f"store URL: schema {schema!r} must be an identifier")
        records = _Pg(
            dsn,
            schema,
            relaxed_commit=False,
            connect_timeout_s=5.0,
            name="cloud-pg",
            read_timeout_s=read_timeout_s,
            write_timeout_s=write_timeout_s,
            open_timeout_s=open_timeout_s,
        )
        telemetry = _Pg(
            dsn,
            schema,
            relaxed_commit=True,
            connect_timeout_s=5.0,
            name="cloud-pg-telemetry",
            read_timeout_s=read_timeout_s,
            write_timeout_s=write_timeout_s,
            open_timeout_s=open_timeout_s,
        )
        host = parts.hostname or ""
        where = f"postgresql://{host}:{parts.port or 5432}{parts.path}#{schema}"
        return CloudStore(records, telemetry, description=where, site_lock=True)
    from evcore.store.sqlite import SqliteBackend

    directory = Path(store_url_directory(url))
    if not directory.is_absolute():
        directory = Path(base_dir) / directory
    return CloudStore(
        SqliteBackend(
            directory / RECORDS_FILE,
            synchronous="FULL",
            migrations=cloud_migrations.SQLITE_RECORDS,
            name="cloud-records",
            read_timeout_s=read_timeout_s,
            write_timeout_s=write_timeout_s,
            open_timeout_s=open_timeout_s,
        ),
        SqliteBackend(
            directory / TELEMETRY_FILE,
            synchronous="NORMAL",
            migrations=cloud_migrations.SQLITE_TELEMETRY,
            name="cloud-telemetry",
            read_timeout_s=read_timeout_s,
            write_timeout_s=write_timeout_s,
            open_timeout_s=open_timeout_s,
        ),
        description=f"sqlite:{directory}",
    )
