"""Stores opened together on a new PostgreSQL schema (two edges, or an edge and ``evcore audit``,
starting at once), on a real PostgreSQL.

Before: ``CREATE SCHEMA IF NOT EXISTS``, run on connecting before the migrations' advisory lock,
is not safe against a concurrent one (PostgreSQL checks, then inserts into ``pg_namespace``): the
loser failed with UniqueViolation on ``pg_namespace_nspname_index``, so its ``open()`` raised
StoreUnavailable ("cannot connect to PostgreSQL store ... duplicate key value") although nothing
was wrong. (docs/store.md said the advisory lock kept two edges starting together from racing.)
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import psycopg
from evcore.store import SessionRecord, open_store
from evcore.store.migrations import POSTGRES
from pg_testkit import PG_DSN
from psycopg import sql as pgsql


async def test_stores_opened_together_on_a_new_schema_all_open(tmp_path: Path) -> None:
    schemas = [f"evtest_{uuid.uuid4().hex[:12]}" for _ in range(4)]
    try:
        for schema in schemas:
            section = {"kind": "postgres", "dsn": PG_DSN, "schema": schema}
            stores = [open_store(section, tmp_path) for _ in range(6)]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.open() for s in stores)), 30)
                for i, s in enumerate(stores):
                    assert await s.schema_version() == POSTGRES[-1].version
                    await s.upsert_session(SessionRecord(f"S{i}", "C1", 1.0))
                assert len(await stores[0].list_sessions()) == len(stores)
            finally:
                for s in stores:
                    await s.close()
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(
                    pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema))
                )
