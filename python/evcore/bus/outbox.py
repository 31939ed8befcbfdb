"""Disk-backed outbox for events that must not be lost (audit, transactions, setpoints).

``append`` returns only after the entry is committed and fsynced (SQLite, WAL,
``synchronous=FULL``); concurrent appends share one commit (group commit). Entries are read back in
the order they were accepted and removed only after the broker confirmed them, so a crash at any
point either leaves an entry to be re-sent (under the same event id: JetStream's duplicate window
and the consumers' processed-id stores drop the repeat) or it was already confirmed. All SQLite work
runs on one worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("evcore.bus.outbox")

#: SQLite's primary result codes of a file it cannot read as a database (corrupt, not one).
_UNREADABLE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_at REAL NOT NULL
);
-- Entries the broker can never take (payload above its max_payload): out of the queue, so that
-- what follows them is sent, and kept here for an operator (docs/bus.md).
CREATE TABLE IF NOT EXISTS outbox_set_aside (
    seq INTEGER PRIMARY KEY,
    subject TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    set_aside_at REAL NOT NULL,
    reason TEXT NOT NULL
);
-- What the bus learnt of its broker (its max_payload), for a start before the broker answers.
CREATE TABLE IF NOT EXISTS outbox_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    subject: str
    event_id: str
    payload: bytes


class Outbox:
    """An ordered, durable queue of events waiting for the broker."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evcore-outbox")
        self._db: sqlite3.Connection | None = None
        self._lazy: sqlite3.Connection | None = None
        self._pending: list[tuple[str, str, bytes, float, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._count = 0
        self.nonempty = asyncio.Event()
        #: Where an unreadable outbox file was moved at open (None: it was readable).
        self.corrupt_moved_to: Path | None = None

    def _connect_sync(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    @property
    def pending(self) -> int:
        """Entries accepted and not yet removed."""
        return self._count

    def _open_sync(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect_sync()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _UNREADABLE:
                # Not the file's fault (no file handles left, locked, an I/O error): what it
                # holds is intact and must not be thrown away; the caller sees the error.
                raise
            # A file SQLite cannot read (a torn disk, a stray file): what it held cannot be sent
            # anyway. Keep it aside for an investigation and start empty rather than leave the
            # edge unable to start (audit records are republished from the store past its
            # publish mark; docs/bus.md).
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(Path(f"{aside}{suffix}"))
            log.error(
                "outbox %s is unreadable (%s): moved to %s; starting an empty outbox (the events "
                "it held are not sent)",
                self.path,
                exc,
                aside,
            )
            self.corrupt_moved_to = aside
            db = self._connect_sync()
        self._db = db
        # Removals need no fsync of their own: a removal lost in a crash only means a re-send under
        # the same event id (dropped as a duplicate); the next append's fsync covers it anyway.
        lazy = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        lazy.execute("PRAGMA synchronous=NORMAL")
        self._lazy = lazy
        row = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(row[0])

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._count = await loop.run_in_executor(self._exec, self._open_sync)
        if self._count:
            self.nonempty.set()

    def _insert_sync(self, rows: list[tuple[str, str, bytes, float]]) -> list[int]:
        assert self._db is not None
        db = self._db
        seqs: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for row in rows:
                cur = db.execute(
                    "INSERT INTO outbox(subject, event_id, payload, accepted_at) VALUES (?,?,?,?)",
                    row,
                )
                seqs.append(int(cur.lastrowid or 0))
            db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (SQLITE_FULL): a ROLLBACK then
            # raises "no transaction is active" and would hide the real cause.
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return seqs

    async def append(self, subject: str, event_id: str, payload: bytes, accepted_at: float) -> int:
        """Accept one entry; returns its sequence number once it is on disk."""
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((subject, event_id, payload, accepted_at, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return await fut

    async def append_many(self, rows: list[tuple[str, str, bytes, float]]) -> list[int]:
        """Accept several entries in order with one commit; their sequence numbers once on disk."""
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[int]] = []
        for subject, event_id, payload, accepted_at in rows:
            fut: asyncio.Future[int] = loop.create_future()
            self._pending.append((subject, event_id, payload, accepted_at, fut))
            futs.append(fut)
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_loop())
        return list(await asyncio.gather(*futs))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                seqs = await loop.run_in_executor(
                    self._exec, self._insert_sync, [b[:4] for b in batch]
                )
            except Exception as exc:
                for b in batch:
                    if not b[4].done():
                        b[4].set_exception(exc)
                continue
            self._count += len(batch)
            self.nonempty.set()
            for b, seq in zip(batch, seqs, strict=True):
                if not b[4].done():
                    b[4].set_result(seq)

    def _read_sync(self, limit: int) -> list[OutboxEntry]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT seq, subject, event_id, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), str(r[2]), bytes(r[3])) for r in rows]

    async def peek(self, limit: int = 256) -> list[OutboxEntry]:
        """The oldest entries, in acceptance order."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._read_sync, limit)

    def _delete_sync(self, upto_seq: int) -> int:
        assert self._lazy is not None
        cur = self._lazy.execute("DELETE FROM outbox WHERE seq <= ?", (upto_seq,))
        return int(cur.rowcount)

    async def remove_through(self, seq: int) -> None:
        """Remove every entry up to and including ``seq`` (they were confirmed in order)."""
        n = await asyncio.get_running_loop().run_in_executor(self._exec, self._delete_sync, seq)
        self._count = max(0, self._count - n)
        if self._count == 0 and not self._pending:
            self.nonempty.clear()

    def _set_aside_sync(self, seq: int, at: float, reason: str) -> int:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "INSERT OR IGNORE INTO outbox_set_aside SELECT seq, subject, event_id, payload,"
                " accepted_at, ?, ? FROM outbox WHERE seq = ?",
                (at, reason, seq),
            )
            n = int(db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return n

    async def set_aside(self, seq: int, at: float, reason: str) -> None:
        """Move entry ``seq`` out of the queue into ``outbox_set_aside`` (one durable commit):
        it is kept, and no longer sent."""
        n = await asyncio.get_running_loop().run_in_executor(
            self._exec, self._set_aside_sync, seq, at, reason
        )
        self._count = max(0, self._count - n)
        if self._count == 0 and not self._pending:
            self.nonempty.clear()

    async def set_aside_entries(self) -> list[tuple[OutboxEntry, str]]:
        """The entries set aside, oldest first, each with why."""
        assert self._db is not None
        db = self._db
        rows = await asyncio.get_running_loop().run_in_executor(
            self._exec,
            lambda: db.execute(
                "SELECT seq, subject, event_id, payload, reason FROM outbox_set_aside ORDER BY seq"
            ).fetchall(),
        )
        return [
            (OutboxEntry(int(r[0]), str(r[1]), str(r[2]), bytes(r[3])), str(r[4])) for r in rows
        ]

    async def remember(self, key: str, value: str) -> None:
        """Keep ``value`` under ``key`` in the outbox file (``recall`` reads it back)."""
        assert self._lazy is not None
        lazy = self._lazy
        await asyncio.get_running_loop().run_in_executor(
            self._exec,
            lambda: lazy.execute(
                "INSERT INTO outbox_meta (key, value) VALUES (?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            ),
        )

    async def recall(self, key: str) -> str | None:
        assert self._db is not None
        db = self._db
        row = await asyncio.get_running_loop().run_in_executor(
            self._exec,
            lambda: db.execute("SELECT value FROM outbox_meta WHERE key = ?", (key,)).fetchone(),
        )
        return None if row is None else str(row[0])

    async def recount(self) -> int:
        """Count the entries in the file again (what ``pending`` says is kept in memory): the
        pump does when the file holds none while the count says some are pending."""
        assert self._db is not None
        db = self._db
        row = await asyncio.get_running_loop().run_in_executor(
            self._exec, lambda: db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        )
        # (A batch being written may be counted twice, once here and once by the writer: the
        # next empty peek counts again.)
        self._count = int(row[0])
        if self._count == 0 and not self._pending:
            self.nonempty.clear()
        return self._count

    async def close(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        db, self._db = self._db, None
        lazy, self._lazy = self._lazy, None
        loop = asyncio.get_running_loop()
        for conn in (lazy, db):
            if conn is not None:
                await loop.run_in_executor(self._exec, conn.close)
        self._exec.shutdown(wait=True)
