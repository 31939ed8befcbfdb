"""Helpers for the audit trail's tests (tests/audit): a filled chain, tampering with it behind the
store's back (SQLite or PostgreSQL), what ``verify`` then finds, and ``evcore audit`` run as an
operator runs it (a subprocess)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from evcore.audit import AuditLog, Decision, record_hash, verify_chain
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord, ChargerBinding
from evcore.v1.setpoint_pb2 import BindingReason, Setpoint
from psycopg import sql as pgsql

REASON_C1 = "held at 16 A: feeder F2 phase L1 at 63 of 63 A"


def decision(i: int) -> Decision:
    return Decision(
        decision_id=f"D{i}",
        trigger="meter:C1" if i % 2 else "tick",
        inputs_digest=f"{i:064x}",
        plan_version=3,
        config_version="cfg-abc",
        setpoints=[
            Setpoint(
                charger_id="C1",
                setpoint_a=16.0,
                binding=BindingReason.BINDING_REASON_NODE_PHASE_LIMIT,
                binding_node_id="F2",
                reason=REASON_C1,
            ),
            Setpoint(charger_id="C2", setpoint_a=0.0, reason=f"paused {i}: no session"),
        ],
        bindings=[ChargerBinding(charger_id="C3", reason="unchanged at 6 A: charger minimum")],
    )


async def fill(store: SqlStore, clock: ManualClock, n: int) -> list[AuditRecord]:
    log = AuditLog(store, clock=clock)
    out = []
    for i in range(n):
        clock.advance(10)
        out.append(await log.append(decision(i)))
    return out


async def filled_store(tmp_path: Path, n: int) -> dict[str, object]:
    """An embedded store in ``tmp_path / "store"`` holding a chain of ``n`` records, closed;
    returns its ``[store]`` section."""
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    try:
        await fill(store, ManualClock(), n)
    finally:
        await store.close()
    return section


def raw_sql(
    section: dict[str, object], tmp_path: Path, statement: str, params: tuple[Any, ...] = ()
) -> None:
    """Tamper with the database behind the store's back."""
    if section["kind"] == "embedded":
        conn = sqlite3.connect(Path(str(section["path"])) / "records.sqlite")
        with conn:
            conn.execute(statement, params)
        conn.close()
        return
    with psycopg.connect(str(section["dsn"]), autocommit=True) as pg:
        pg.execute(
            pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(str(section["schema"])))
        )
        pg.execute(statement.replace("?", "%s"), params)


def forge(
    section: dict[str, object],
    tmp_path: Path,
    record: AuditRecord,
    change: Callable[[AuditRecord], object],
    *,
    rehash: bool = False,
) -> AuditRecord:
    """Store a copy of ``record`` with ``change`` made to it in its place (and with its own hash
    recomputed when ``rehash``); returns the forgery."""
    forged = AuditRecord()
    forged.CopyFrom(record)
    change(forged)
    if rehash:
        forged.hash = ""
        forged.hash = record_hash(forged)
        raw_sql(
            section,
            tmp_path,
            "UPDATE audit_records SET payload = ?, hash = ? WHERE seq = ?",
            (forged.SerializeToString(), forged.hash, record.seq),
        )
    else:
        raw_sql(
            section,
            tmp_path,
            "UPDATE audit_records SET payload = ? WHERE seq = ?",
            (forged.SerializeToString(), record.seq),
        )
    return forged


async def broken(store: SqlStore) -> list[str]:
    """The problems ``verify`` finds in the chain, which must be broken."""
    report = await verify_chain(store)
    assert not report.ok, "verify found the chain intact"
    return report.problems


def site_file(tmp_path: Path, section: dict[str, object]) -> Path:
    lines = ["[site]", 'id = "depot"', "", "[store]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    path = tmp_path / "site.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def run_cli(*args: str, module: str = "evcore.audit.cli") -> tuple[int, str, str]:
    """``python -m <module> *args`` in a subprocess: its exit status, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_verify(
    store_section: dict[str, object], tmp_path: Path
) -> tuple[int, dict[str, object], str]:
    """``evcore audit verify --config SITE_FILE --json`` on the store of ``store_section``."""
    site = site_file(tmp_path, store_section)
    code, out, err = await run_cli("verify", "--config", str(site), "--json")
    return code, (json.loads(out) if out.strip() else {}), err
