"""A long audit read is taken in bounded pieces, each a read of its own under ``[store]
read_timeout_s`` (docs/store.md): read at once, a long backlog (the edge's journal check after a
store outage, ``audit show`` of a whole chain, a ``verify`` page of large records) was cut by it on
a healthy PostgreSQL that was merely slower than the read was long. Real stores; the slow link is a
real relay to the tests' PostgreSQL that passes 4 MB/s."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psycopg
import pytest
from evcore.audit import Decision, seal
from evcore.audit.log import build_record
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.setpoint_pb2 import Setpoint
from pg_testkit import PG_DSN, TcpRelay
from psycopg import sql as pgsql

pytestmark = pytest.mark.timeout(60)

RECORDS = 80  # of 50 KB each: 4 MB
CHARGERS = 1000


def big_record() -> AuditRecord:
    setpoints = [
        Setpoint(charger_id=f"C{c:04d}", setpoint_a=16.0, reason=f"held at 16 A: F{c % 7} L1")
        for c in range(CHARGERS)
    ]
    return seal(
        build_record(Decision("D", "tick", setpoints=setpoints), now_s=1e9), seq=0, prev_hash=""
    )


def insert_backlog(section: dict[str, object], record: AuditRecord) -> None:
    """``RECORDS`` rows of the same payload (seq 0..), charger C1 indexed on every third,
    written behind the store's back (what matters here is their size, not the chain)."""
    payload = record.SerializeToString()
    rows = [(i, f"D{i}", 1e9 + i, "", "", payload) for i in range(RECORDS)]
    chargers = [("C1", i) for i in range(0, RECORDS, 3)]
    insert = "INSERT INTO audit_records (seq, decision_id, decided_at_s, prev_hash, hash, payload)"
    if section["kind"] == "embedded":
        import sqlite3

        conn = sqlite3.connect(Path(str(section["path"])) / "records.sqlite")
        with conn:
            conn.executemany(insert + " VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO audit_chargers (charger_id, seq) VALUES (?, ?)", chargers)
        conn.close()
        return
    with psycopg.connect(str(section["dsn"]), autocommit=True) as pg:
        pg.execute(
            pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(str(section["schema"])))
        )
        with pg.cursor() as cur:
            cur.executemany(insert + " VALUES (%s, %s, %s, %s, %s, %s)", rows)
            cur.executemany(
                "INSERT INTO audit_chargers (charger_id, seq) VALUES (%s, %s)", chargers
            )


async def test_a_long_audit_read_is_paged_and_whole(
    store: SqlStore, store_section: dict[str, object]
) -> None:
    """What the pieces add up to: every filter and order as one read gave it."""
    record = big_record()
    insert_backlog(store_section, record)
    got = await store.audit_records()
    assert len(got) == RECORDS and all(r == record for r in got)
    newest = await store.audit_records(newest_first=True, limit=50)
    assert len(newest) == 50
    seqs = [r.seq for r in await store.audit_rows(after_seq=9, limit=1000)]
    assert seqs == list(range(10, RECORDS))
    assert len(await store.audit_records(after_seq=RECORDS - 6)) == 5
    assert len(await store.audit_records(charger_id="C1")) == len(range(0, RECORDS, 3))
    assert len(await store.audit_records(charger_id="C1", newest_first=True, limit=4)) == 4
    assert len(await store.audit_records(since_s=1e9 + 70, until_s=1e9 + 75)) == 5
    # The rows as stored, every piece's in its place.
    rows = await store.audit_rows(after_seq=-1, limit=RECORDS)
    assert [r.decision_id for r in rows] == [f"D{i}" for i in range(RECORDS)]


class SlowRelay(TcpRelay):
    """The tests' PostgreSQL behind a link of ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(len(data) / self.rate)
        writer.close()


async def test_a_long_audit_backlog_on_a_slow_link_is_read_in_bounded_pieces(
    pg_schema: str, tmp_path: Path
) -> None:
    """4 MB of records (8 MB on the wire: psycopg reads bytea as hex text) through a 4 MB/s link
    with ``read_timeout_s`` 1: read at once (before) the read outlived its bound and failed,
    StoreUnavailable, however often it was tried; in pieces of about 1 MiB (0.5 s each here)
    every piece is within it and the whole backlog arrives."""
    relay = SlowRelay(rate=4_000_000)
    await relay.start()
    section: dict[str, object] = {
        "kind": "postgres",
        "dsn": relay.dsn(),
        "schema": pg_schema,
        "read_timeout_s": 1.0,
    }
    store = open_store(section, tmp_path)
    try:
        await store.open()
        record = big_record()
        insert_backlog({**section, "dsn": PG_DSN}, record)  # not through the relay
        t0 = time.monotonic()
        got = await store.audit_records(after_seq=-1)
        assert len(got) == RECORDS and got[-1] == record
        assert time.monotonic() - t0 > 2.0  # (it did go through the slow link)
    finally:
        await store.close()
        relay.cut()
