"""Opening a store (connecting, applying migrations) waits at most ``[store] open_timeout_s``, on
a real PostgreSQL (behind a relay whose path can die without a word) and on real SQLite files.

Before: migrations ran unbounded (no statement timeout, no watch), and so did the PostgreSQL
connection's set-up: another process holding the migrations' lock (an edge or a tool stuck
mid-migration), or a server gone silent while the connection was set up, held ``open()`` for
ever, and with it the edge's start; on SQLite a migration waited 30 s for another process's
write lock whatever was configured. Now each is StoreUnavailable naming what hung and the key.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from evcore.store import SessionRecord, StoreConfig, StoreUnavailable, open_store
from pg_testkit import PG_DSN, StallingRelay
from test_store_write_timeout import relay  # noqa: F401  (the fixture)


async def _open_fails_within(store: Any, high_s: float) -> str:
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as err:
        await asyncio.wait_for(store.open(), 8)
    took = time.monotonic() - t0
    assert took < high_s, (took, err.value)
    return str(err.value)


def test_open_timeout_s_is_a_store_key() -> None:
    assert StoreConfig.from_section(None).open_timeout_s == 120.0
    assert StoreConfig.from_section({"open_timeout_s": 5}).open_timeout_s == 5.0


async def test_a_migration_lock_held_elsewhere_ends_the_open_at_open_timeout_s(
    pg_schema: str, tmp_path: Path
) -> None:
    section = {"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema, "open_timeout_s": 0.5}
    # Another process stuck mid-migration: it holds the migrations' advisory lock.
    with psycopg.connect(PG_DSN, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"evcore.store:{pg_schema}",))
        store = open_store(section, tmp_path)
        try:
            why = await _open_fails_within(store, 4.0)
        finally:
            other.execute("SELECT pg_advisory_unlock_all()")
            await store.close()
    assert "open_timeout_s = 0.5" in why, why
    assert "schema_migrations" in why, why  # the step it hung at
    # Once the lock is gone, the store opens.
    store = open_store(section, tmp_path)
    try:
        await store.open()
        await store.upsert_session(SessionRecord("S1", "C1", 1.0))
    finally:
        await store.close()


async def test_a_server_silent_while_the_connection_is_set_up_ends_the_open(
    relay: StallingRelay,  # noqa: F811
    pg_schema: str,
    tmp_path: Path,
) -> None:
    section = {
        "kind": "postgres",
        "dsn": relay.dsn(),
        "schema": pg_schema,
        "connect_timeout_s": 1,
        "open_timeout_s": 0.5,
    }
    relay.stall_on(b"CREATE SCHEMA", deliver=False)
    store = open_store(section, tmp_path)
    try:
        why = await _open_fails_within(store, 4.0)
    finally:
        await store.close()
    assert relay.stalled.is_set()
    assert "no answer within 1 s ([store] open_timeout_s = 0.5)" in why, why
    # The path flows again: the store opens.
    store = open_store(section, tmp_path)
    try:
        await asyncio.wait_for(store.open(), 8)
    finally:
        await store.close()


async def test_a_sqlite_write_lock_held_elsewhere_ends_the_open_at_open_timeout_s(
    tmp_path: Path,
) -> None:
    section = {"kind": "embedded", "path": str(tmp_path / "store"), "open_timeout_s": 0.5}
    store = open_store(section, tmp_path)
    await store.open()
    await store.close()
    # Another process holds the records file's write lock (a writer stuck mid-transaction).
    other = sqlite3.connect(tmp_path / "store" / "records.sqlite", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        store = open_store(section, tmp_path)
        try:
            why = await _open_fails_within(store, 4.0)
        finally:
            await store.close()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "records.sqlite" in why, why
    assert "open_timeout_s = 0.5 s, while connecting and creating schema_migrations" in why, why
    store = open_store(section, tmp_path)
    try:
        await store.open()
    finally:
        await store.close()
