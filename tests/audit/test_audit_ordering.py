"""A record is durable BEFORE its setpoints leave, shown on the real edge (controller, Rust core,
OCPP central system on a loopback socket, simulated charge points), on both stores:

* at the moment each profile is handed to the OCPP layer, an independent database connection
  already finds the committed record of its decision with that charger's value in it;
* while another connection holds the store's write lock, the edge sends nothing at all (its audit
  appends time out), and once the lock is gone every profile that leaves has its record.

The first test also starts the edge from a site file, so the ``[store]`` section is what picks
SQLite or PostgreSQL, and checks that the live edge persisted transactions, telemetry and last
setpoints in the store it named.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from edge_testkit import fleet_on
from evcore.audit import AuditLog, verify_chain
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.config import EdgeConfig
from evcore.edge.controller import SentProfile
from evcore.edge.grid import Curtailment
from evcore.edge.recording import AuditRecorder
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table, to_toml
from evcore.sim.ev import EV
from evcore.store import open_store
from evcore.v1.audit_pb2 import AuditRecord
from psycopg import sql as pgsql

pytestmark = pytest.mark.timeout(180)

FAST = {
    "tick_s": 0.5,
    "settle_s": 3.0,
    "failsafe_after_s": 60.0,
    "refresh_lead_s": 10.0,
    "fallback_guard_s": 5.0,
    "curtail_lead_s": 3.0,
    "min_on_s": 0.0,
    "min_off_s": 0.0,
}


class RawReader:
    """A connection of its own (not the store's) that sees only what was committed."""

    def __init__(self, section: dict[str, object], base_dir: Path) -> None:
        self.kind = str(section.get("kind", "embedded"))
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        if self.kind == "embedded":
            path = Path(str(section["path"]))
            self.records_file = path if path.is_absolute() else base_dir / path
            self.records_file = self.records_file / "records.sqlite"
        else:
            self._pg = psycopg.connect(str(section["dsn"]), autocommit=True)
            self._pg.execute(
                pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(str(section["schema"])))
            )

    def committed_records(self) -> list[AuditRecord]:
        if self._pg is not None:
            rows = self._pg.execute("SELECT payload FROM audit_records ORDER BY seq").fetchall()
        else:
            if self._sqlite is None:
                self._sqlite = sqlite3.connect(self.records_file, isolation_level=None)
            rows = self._sqlite.execute("SELECT payload FROM audit_records ORDER BY seq").fetchall()
        out = []
        for (payload,) in rows:
            r = AuditRecord()
            r.ParseFromString(bytes(payload))
            out.append(r)
        return out

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.close()


def decision_number(record: AuditRecord) -> int:
    # AuditRecorder's ids are "<edge id>-<decision number>-<ms>".
    return int(record.decision_id.rsplit("-", 2)[-2])


@dataclass
class OrderingCheck:
    """``on_sent`` hook: runs synchronously when the controller hands a profile to the OCPP layer
    (the send task has not run yet), and looks for the committed record of its decision."""

    reader: RawReader
    sent: list[SentProfile] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # (purpose, recorded reason) per profile that left
    reasons: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, sent: SentProfile) -> None:
        self.sent.append(sent)
        for r in reversed(self.reader.committed_records()):
            if decision_number(r) != sent.decision:
                continue
            for sp in r.setpoints:
                value = sp.setpoint_w if sp.HasField("setpoint_w") else sp.setpoint_a
                # The record holds the value on the wire (rounded down to whole A or W).
                on_wire = math.floor(sent.value + 1e-9)
                # One decision may hold a TxProfile and a TxDefault of the same value for the
                # same charger: the edge's reason names the TxDefault ones.
                is_default = sp.reason.startswith("TxDefault")
                if (
                    sp.charger_id == sent.charger_id
                    and is_default == (sent.purpose == "tx_default")
                    and (abs(value - sent.value) < 1e-9 or abs(value - on_wire) < 1e-9)
                ):
                    self.reasons.append((sent.purpose, sp.reason))
                    return
        self.missing.append(
            f"decision {sent.decision}: {sent.purpose} {sent.value:g} to {sent.charger_id} "
            "left before its record was committed"
        )


@pytest.fixture
def site_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "site"
    d.mkdir()
    yield d


async def test_setpoints_leave_only_after_their_record_is_committed(
    store_section: dict[str, object], site_dir: Path
) -> None:
    section = dict(store_section)
    if section["kind"] == "embedded":
        section["path"] = "var/store"  # relative: taken from the site file's directory
    table = depot_table(6, per_feeder=3, site_id="ordering")
    table["edge"] = dict(FAST)
    table["store"] = section
    site_file = site_dir / "site.toml"
    site_file.write_text(to_toml(table))
    plugged = table_charger_ids(table)[::2]

    reader = RawReader(section, site_dir)
    check = OrderingCheck(reader)
    app = EdgeApp.from_file(site_file, WallClock(), on_sent=check)
    runner = asyncio.create_task(app.run())
    rig: EdgeRig | None = None
    try:
        rig = await fleet_on(app, table)
        await rig.wait_for(rig.defaults_held, 30, "a TxDefaultProfile on every station")
        # The failsafe levels count a charger whose first TxDefault is not yet known applied at
        # its maximum (a car plugged in then may draw that): wait for the final levels.
        await rig.wait_for(app.controller.failsafe_is_plain, 30, "the final failsafe levels")
        for cid in plugged:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await rig.wait_for(
            lambda: all(app.controller.state.chargers[c].transaction_id for c in plugged),
            30,
            "sessions",
        )
        # A curtailment: the cars must come below the failsafe level, so TxProfiles go out.
        now = app.clock.now()
        app.controller.post_curtailment(Curtailment("dso-1", "grid", 12.0, now, now + 600))
        await rig.wait_for(
            lambda: {s.charger_id for s in check.sent if s.purpose == "tx"} == set(plugged),
            60,
            "a TxProfile to every charger with a car",
        )
        await rig.wait_for(
            lambda: all(
                app.controller.state.chargers[c].measured_max_a() is not None for c in plugged
            ),
            30,
            "meter values from every car",
        )
    finally:
        if rig is not None:
            await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 30)
        reader.close()
    assert check.sent
    assert check.missing == []
    # Each TxProfile's record says in words what bound it, e.g. "held at 8.7 A: grid grid at 12.0
    # of 12.0 kW", "paused: not admitted (…)" or, where what is measured alone is over a limit,
    # "lowered to 16 A (drawing 16.1 A): …" (which constraint depends on the edge's policy).
    tx_reasons = [r for purpose, r in check.reasons if purpose == "tx"]
    assert tx_reasons, check.reasons
    assert all(
        r.startswith(("held at ", "paused: ", "lowered to ")) and ": " in r for r in tx_reasons
    ), tx_reasons

    # The site file chose the store: its records are there (and nowhere else).
    if section["kind"] == "embedded":
        assert (site_dir / "var/store/records.sqlite").exists()
    else:
        assert not (site_dir / "var").exists()
    store = open_store(section, site_dir, must_exist=True)
    await store.open()
    try:
        report = await verify_chain(store)
        assert report.ok, report.problems
        assert report.records >= len({s.decision for s in check.sent})
        # Every record carries what explains it: trigger, the digest of the core's inputs, the
        # site configuration's version, and a reason per setpoint.
        records = await store.audit_records()
        assert all(r.trigger and r.inputs_digest and r.config_version for r in records)
        assert len({r.config_version for r in records}) == 1
        assert all(sp.reason for r in records for sp in r.setpoints)
        # What the live edge persisted through the same store.
        opened = await store.list_open_transactions()
        assert {t.charger_id for t in opened} == set(plugged)
        last = await store.last_setpoints()
        assert set(last) == set(table_charger_ids(table))
        assert all(rec.setpoint.reason for rec in last.values())
        assert await store.meter_samples(plugged[0])
        assert await store.latest_statuses()
    finally:
        await store.close()


def table_charger_ids(table: dict[str, Any]) -> list[str]:
    return [str(c["id"]) for c in table["chargers"]]


class WriteLock:
    """Holds the store's write lock from another connection (as a stuck backup job or a
    long-running report might), so that an audit append cannot commit."""

    def __init__(self, section: dict[str, object]) -> None:
        self._section = section
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None

    def take(self) -> None:
        if self._section["kind"] == "embedded":
            path = Path(str(self._section["path"])) / "records.sqlite"
            self._sqlite = sqlite3.connect(path, isolation_level=None)
            self._sqlite.execute("BEGIN IMMEDIATE")
        else:
            self._pg = psycopg.connect(str(self._section["dsn"]))
            self._pg.execute(
                pgsql.SQL("SET search_path TO {}").format(
                    pgsql.Identifier(str(self._section["schema"]))
                )
            )
            # Blocks INSERT, lets readers (our RawReader) through.
            self._pg.execute("LOCK TABLE audit_records IN EXCLUSIVE MODE")

    def release(self) -> None:
        if self._sqlite is not None:
            self._sqlite.execute("ROLLBACK")
            self._sqlite.close()
            self._sqlite = None
        if self._pg is not None:
            self._pg.rollback()
            self._pg.close()
            self._pg = None


async def test_nothing_leaves_while_the_record_cannot_be_committed(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    store = open_store(store_section, tmp_path)
    await store.open()
    clock = WallClock()
    audit_log = AuditLog(store, clock=clock)
    recorder = AuditRecorder(audit_log, store)
    reader = RawReader(store_section, tmp_path)
    check = OrderingCheck(reader)
    lock = WriteLock(store_section)
    table = depot_table(4, per_feeder=4, site_id="locked")
    cfg = EdgeConfig(**{**FAST, "audit_timeout_s": 1.0})  # type: ignore[arg-type]
    rig = EdgeRig(table, cfg=cfg, audit=recorder, on_sent=check)
    try:
        async with rig:
            ctrl = rig.controller
            assert ctrl is not None
            await rig.wait_for(rig.failsafe_applied, 30, "TxDefault at the failsafe level")
            await recorder.drain()
            lock.take()
            sent_before = len(check.sent)
            failures_before = ctrl.stats.audit_failures
            plugged = rig.fleet.charger_ids[:2]
            for cid in plugged:
                rig.fleet.plug_in(cid, EV(soc=0.2))
            await rig.wait_for(
                lambda: all(ctrl.state.chargers[c].transaction_id for c in plugged), 30, "sessions"
            )
            now = rig.clock.now()
            ctrl.post_curtailment(Curtailment("dso-1", "grid", 8.0, now, now + 600))
            # The controller wants to lower the chargers; each attempt times out on the audit.
            await rig.wait_for(
                lambda: ctrl.stats.audit_failures >= failures_before + 2,
                60,
                "audit appends timing out under the lock",
            )
            assert len(check.sent) == sent_before, [
                (s.charger_id, s.value) for s in check.sent[sent_before:]
            ]
            lock.release()
            await rig.wait_for(
                lambda: (
                    {s.charger_id for s in check.sent[sent_before:] if s.purpose == "tx"}
                    == set(plugged)
                ),
                60,
                "a TxProfile to every charger with a car once the store accepts records again",
            )
        await recorder.drain()
        assert check.missing == []
        report = await verify_chain(store)
        assert report.ok, report.problems
    finally:
        lock.release()
        reader.close()
        await store.close()
