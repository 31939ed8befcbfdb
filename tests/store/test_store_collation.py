"""A PostgreSQL database whose default collation is a language's (``en_US.UTF-8``, what initdb
takes from a usual server's locale; the tests' database is ``C.UTF-8``), on a real PostgreSQL: the
text columns sort by that collation ("a1" before "B1"), not by code point as SQLite and ``C`` do.

Before: ``audit_charger_index`` gave each record's chargers in the database's order, and
``audit verify`` compares them with the record's chargers in code point order (``sorted``): a
decision for chargers "a1" and "B1" made the chain BROKEN ("charger index ['a1', 'B1'] differs
from the record's chargers ['B1', 'a1']") although nothing was edited.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from evcore.audit import AuditLog, Decision, verify_chain
from evcore.clock import ManualClock
from evcore.store import open_store
from evcore.v1.setpoint_pb2 import Setpoint
from pg_testkit import PG_DSN
from psycopg import sql as pgsql


async def test_verify_holds_on_a_database_with_a_language_collation(
    pg_schema: str, tmp_path: Path
) -> None:
    store = open_store({"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}, tmp_path)
    await store.open()
    try:
        # The column as a database created with an en_US locale would have it.
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(
                pgsql.SQL(
                    "ALTER TABLE {}.audit_chargers"
                    ' ALTER COLUMN charger_id TYPE TEXT COLLATE "en-US-x-icu"'
                ).format(pgsql.Identifier(pg_schema))
            )
        log = AuditLog(store, clock=ManualClock())
        chargers = ["a1", "B1", "c2", "C10"]
        sps = [
            Setpoint(charger_id=c, setpoint_a=6.0, reason="held at 6 A: minimum") for c in chargers
        ]
        await log.append(Decision("D0", "tick", decided_at_s=1.0, setpoints=sps))
        report = await verify_chain(store)
        assert report.ok, report.problems
        index = await store.audit_charger_index(after_seq=-1, upto_seq=0)
        assert index == {0: sorted(chargers)}
    finally:
        await store.close()
