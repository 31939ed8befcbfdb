"""Disk-backed outbox for events that must not be lost (audit, transactions, setpoints).

``append`` returns only after the entry is committed and fsynced (SQLite, WAL,
``synchronous=FULL``); concurrent appends share one commit (group commit). Entries are read back in
the order they were accepted and removed only after the broker confirmed them, so a crash at any
point either leaves an entry to be re-sent (under the same event id: JetStream's duplicate window
and the consumers' processed-id stores drop the repeat) or it was already confirmed. All SQLite work
runs on one worker thread so the event loop never waits on the disk.

A file SQLite cannot read at open is moved aside and replaced by a new one holding every entry
that can still be read from it (each checked against the CRC it was stored with); what could not
be read is reported as an :class:`OutboxLoss`, kept in the new file until a later loss pushes it
out, so that publishers with a source of their own (the audit log's store) can send again what
the broker never stored. An entry set aside because the broker can never take it is a
:class:`SetAside` until its publisher says it has dealt with it (``mark_reported``).

The outbox is capped (``max_bytes``, ``[bus] outbox_max_bytes``): past it an append is refused
whole with :class:`OutboxFull` naming the cap, nothing of it written, and nothing the outbox holds
is ever dropped to make room (every kind it holds is critical). Without a cap a long broker outage
grew the file until the disk was full and every write failed with SQLite's own error. The cap
counts everything the file keeps of the entries: the queue and the set-aside entries (whose
payload is dropped once their publisher dealt with them: it holds the copy).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sqlite3
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("evcore.bus.outbox")

#: SQLite's primary result codes of a file it cannot read as a database (corrupt, not one).
_UNREADABLE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    -- entry_crc() of the entry (NULL: written before it was kept): an entry read back from a
    -- damaged file is sent only if it still matches.
    crc INTEGER
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
    reason TEXT NOT NULL,
    -- When its publisher said it dealt with it (NULL: not yet; NatsBus.on_set_aside).
    reported_at REAL
);
-- What the bus learnt of its broker (its max_payload), for a start before the broker answers;
-- the losses of unreadable files this one replaced ('loss:<file set aside>', JSON).
CREATE TABLE IF NOT EXISTS outbox_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
# Columns added since the first files were written: (table, column, declaration).
_ADDED_COLUMNS = (("outbox", "crc", "INTEGER"), ("outbox_set_aside", "reported_at", "REAL"))
_LOSS_KEY = "loss:"
# The keys of the loss notes: from 'loss:' up to (not including) 'loss;'.
_LOSS_KEYS = (_LOSS_KEY, "loss;")
#: The share of the cap entries whose publisher keeps a copy of its own (the audit log: its store)
#: may fill; the rest is kept for events with no other copy, so that an outage long enough to
#: fill the outbox with audit records does not refuse a transaction or a fault as well.
YIELDING_SHARE = 0.9
#: Loss notes kept in an outbox file (the oldest go first).
LOSSES_KEPT = 16
#: Problems a loss note names (the rest are counted).
_PROBLEMS_NAMED = 5


#: What an entry counts against the cap: its subject, event id and payload (bytes). The file takes
#: somewhat more (SQLite's pages and row headers, its -wal file).
_HELD_BYTES_SQL = (
    "COALESCE(SUM(length(CAST(subject AS BLOB)) + length(CAST(event_id AS BLOB))"
    " + length(payload)), 0)"
)


class OutboxFull(OSError):
    """The outbox holds its cap (``[bus] outbox_max_bytes``) of events the broker has not taken
    yet: the event was refused, nothing of it written (errno ENOSPC). Publishers with a copy of
    their own (the audit log, its store) send it again later; what the outbox holds is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def entry_bytes(subject: str, event_id: str, payload: bytes) -> int:
    """What one entry counts against the outbox's cap."""
    return len(subject.encode()) + len(event_id.encode()) + len(payload)


def entry_crc(subject: str, event_id: str, payload: bytes) -> int:
    """The CRC-32 an entry is stored with."""
    return zlib.crc32(payload, zlib.crc32(f"{subject}\0{event_id}\0".encode()))


@dataclass(frozen=True)
class OutboxLoss:
    """An outbox file that SQLite could not read at open and that was replaced.

    Its entries that could still be read (``salvaged``; each matching its CRC) were copied into
    the new file and are sent in their order; any other entry it held never reached the broker
    and is gone from the outbox. ``complete`` says every entry of its queue was read back, as
    far as SQLite can tell. ``stream_last_seq`` is where each of the bus's streams stood when
    the broker was first reached after the loss, before the outbox sent anything again (None
    until then): whatever a stream holds past it was sent after the loss."""

    id: str
    moved_to: str
    at: float
    salvaged: int | None = None
    complete: bool = False
    detail: str = ""
    stream_last_seq: dict[str, int] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OutboxLoss:
        raw = json.loads(text)
        seqs = raw.get("stream_last_seq")
        return cls(
            id=str(raw["id"]),
            moved_to=str(raw["moved_to"]),
            at=float(raw["at"]),
            salvaged=None if raw.get("salvaged") is None else int(raw["salvaged"]),
            complete=bool(raw.get("complete", False)),
            detail=str(raw.get("detail", "")),
            stream_last_seq=None if seqs is None else {str(k): int(v) for k, v in seqs.items()},
        )


@dataclass(frozen=True)
class SetAside:
    """An outbox entry the broker can never take, set aside (``outbox_set_aside``)."""

    seq: int
    subject: str
    event_id: str
    payload: bytes
    reason: str
    set_aside_at: float


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    subject: str
    event_id: str
    payload: bytes


class Outbox:
    """An ordered, durable queue of events waiting for the broker."""

    def __init__(self, path: Path, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"outbox max_bytes must be > 0, got {max_bytes!r}")
        self.path = Path(path)
        #: The most the outbox holds (``entry_bytes`` summed over the queue, entries being
        #: written included, and the set-aside entries); None: no cap. An empty queue takes any
        #: one append, so that an entry larger than the cap, or set-aside entries filling it,
        #: cannot hold its publisher (and all behind it) off the bus for good.
        self.max_bytes = max_bytes
        self._held_bytes = 0  # the queue's
        self._aside_bytes = 0  # the set-aside entries' (a dealt-with one's payload dropped)
        #: Entries refused at the cap (counted; ``BusStats.outbox_refused``).
        self.refused = 0
        # Whether appends are being refused (logged once per spell): yielding ones, the others.
        self._refusing = {True: False, False: False}
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evcore-outbox")
        self._db: sqlite3.Connection | None = None
        self._lazy: sqlite3.Connection | None = None
        self._pending: list[tuple[str, str, bytes, float, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._count = 0
        self.nonempty = asyncio.Event()
        #: Where an unreadable outbox file was moved at open (None: it was readable).
        self.corrupt_moved_to: Path | None = None
        #: What that file's replacement could not keep of it (None: it was readable).
        self.loss: OutboxLoss | None = None

    def _connect_sync(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            for table, column, decl in _ADDED_COLUMNS:
                names = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in names:
                    try:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
                    except sqlite3.OperationalError as exc:
                        if "duplicate column" not in str(exc):
                            raise  # (another opener of the file added it meanwhile)
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    @property
    def pending(self) -> int:
        """Entries accepted and not yet removed."""
        return self._count

    @property
    def held_bytes(self) -> int:
        """What the outbox holds against the cap (bytes): the entries accepted and not yet
        removed, and the set-aside entries."""
        return self._held_bytes + self._aside_bytes

    @property
    def queue_bytes(self) -> int:
        """What the entries accepted and not yet removed (nor set aside) count (bytes)."""
        return self._held_bytes

    @property
    def set_aside_bytes(self) -> int:
        """What the set-aside entries count against the cap (bytes; a payload its publisher
        dealt with is dropped, its subject and event id stay)."""
        return self._aside_bytes

    def _admit(self, rows: list[tuple[str, str, bytes, float]], *, yields: bool) -> None:
        """Count ``rows`` against the cap, or refuse them all (:class:`OutboxFull`). ``yields``:
        their publisher keeps a copy of its own (the audit log, its store), so they are refused
        once the outbox holds ``YIELDING_SHARE`` of the cap, and the rest is kept for events with
        no other copy (transactions, station events, faults, grid signals)."""
        size = sum(entry_bytes(subject, eid, payload) for subject, eid, payload, _ in rows)
        cap = self.max_bytes
        limit = None if cap is None else (int(cap * YIELDING_SHARE) if yields else cap)
        held = self._held_bytes + self._aside_bytes
        # (An empty queue takes one append whatever the set-aside entries hold: they slow the
        # critical events to one at a time while they fill the cap, never stop them.)
        if limit is not None and self._held_bytes > 0 and held + size > limit:
            self.refused += len(rows)
            what = (
                f"event {rows[0][1]} on {rows[0][0]!r}"
                if len(rows) == 1
                else f"{len(rows)} events ({rows[0][0]!r} first)"
            )
            over = (
                f"{YIELDING_SHARE:.0%} of [bus] outbox_max_bytes = {cap} (the rest is kept for "
                "events with no other copy; its publisher keeps this one)"
                if yields
                else f"[bus] outbox_max_bytes = {cap}"
            )
            aside = (
                f", {self._aside_bytes} of them set aside (the broker can never take them; "
                "table outbox_set_aside, docs/bus.md)"
                if self._aside_bytes
                else ""
            )
            message = (
                f"outbox {self.path} is full: it holds {held} bytes of events the broker has "
                f"not taken ({self._count} entries in its queue{aside}), and {what} of {size} "
                f"bytes would pass {over}; refused, nothing of it written (room is made as the "
                "broker takes what the outbox holds)"
            )
            if not self._refusing[yields]:
                self._refusing[yields] = True
                log.error("%s. Refusing such events until then (docs/bus.md)", message)
            raise OutboxFull(message)
        if self._refusing[yields]:
            self._refusing[yields] = False
            log.warning(
                "outbox %s: taking %sevents again (%d bytes held, outbox_max_bytes = %s); %d "
                "refused so far",
                self.path,
                "yielding " if yields else "",
                held,
                cap,
                self.refused,
            )
        self._held_bytes += size

    def _open_sync(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = self._connect_sync()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _UNREADABLE:
                # Not the file's fault (no file handles left, locked, an I/O error): what it
                # holds is intact and must not be thrown away; the caller sees the error.
                raise
            # A file SQLite cannot read (a torn disk, a stray file): keep it aside for an
            # investigation, rather than leave the edge unable to start, and serve a new one
            # holding what can still be read of it. What cannot is reported (OutboxLoss, kept
            # in the new file): the broker never had it, and a publisher that keeps its own
            # copy (the audit log, its store) must send it again; before, the audit log's
            # publish mark covered it and it never reached the bus (docs/bus.md).
            stamp = int(time.time())
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            n = 1
            while any(Path(f"{aside}{sfx}").exists() for sfx in ("", "-wal", "-shm")):
                n += 1
                aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(Path(f"{aside}{suffix}"))
            self.corrupt_moved_to = aside
            db = self._connect_sync()
            # Noted before the salvage: a crash during it leaves the note, and the next open
            # finishes the salvage from the file set aside.
            noted: OutboxLoss | None = OutboxLoss(
                id=aside.name, moved_to=str(aside), at=time.time(), detail=str(exc)
            )
        else:
            noted = None
        try:
            if noted is not None:
                db.execute(
                    "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES (?, ?)",
                    (_LOSS_KEY + noted.id, noted.to_json()),
                )
            for unfinished in [x for x in self._losses_sync(db) if x.salvaged is None]:
                self.loss = self._salvage_sync(db, unfinished)
        except BaseException:
            db.close()
            raise
        self._db = db
        # Removals need no fsync of their own: a removal lost in a crash only means a re-send under
        # the same event id (dropped as a duplicate); the next append's fsync covers it anyway.
        lazy = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        lazy.execute("PRAGMA synchronous=NORMAL")
        self._lazy = lazy
        row = db.execute(f"SELECT COUNT(*), {_HELD_BYTES_SQL} FROM outbox").fetchone()
        self._held_bytes = int(row[1])
        self._aside_bytes = _aside_bytes_sync(db)
        return int(row[0])

    def _salvage_sync(self, db: sqlite3.Connection, loss: OutboxLoss) -> OutboxLoss:
        """Copy what can be read of the file ``loss`` set aside into ``db`` (its queue with the
        seqs it had, so the order holds; its set-aside entries; its notes, such as the broker's
        max_payload and earlier losses), and finish the note, all in one commit."""
        src: sqlite3.Connection | None = None
        problems: list[str] = []
        taken = dropped = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            try:
                src = _open_read_only(Path(loss.moved_to))
            except (sqlite3.Error, OSError) as exc:
                problems.append(f"cannot be opened: {exc}")
            if src is not None:
                for row in _readable_rows(src, "outbox", _QUEUE_COLUMNS, problems):
                    if not _entry_ok(row):
                        dropped += 1
                        continue
                    crc = row[5] if isinstance(row[5], int) else None
                    if crc is not None and crc != entry_crc(row[1], row[2], row[3]):
                        dropped += 1
                        continue
                    db.execute(
                        "INSERT OR IGNORE INTO outbox(seq, subject, event_id, payload,"
                        " accepted_at, crc) VALUES (?,?,?,?,?,?)",
                        (*row[:4], float(row[4]), crc),
                    )
                    taken += 1
                for row in _readable_rows(src, "outbox_set_aside", _SET_ASIDE_COLUMNS, problems):
                    if _entry_ok(row) and isinstance(row[5], float | int):
                        db.execute(
                            "INSERT OR IGNORE INTO outbox_set_aside(seq, subject, event_id,"
                            " payload, accepted_at, set_aside_at, reason, reported_at)"
                            " VALUES (?,?,?,?,?,?,?,?)",
                            (*row[:6], str(row[6]), row[7]),
                        )
                    else:
                        problems.append(f"set-aside entry {row[0]!r} damaged")
                for row in _readable_rows(src, "outbox_meta", _META_COLUMNS, problems):
                    if isinstance(row[0], str) and isinstance(row[1], str):
                        db.execute(
                            "INSERT OR IGNORE INTO outbox_meta (key, value) VALUES (?, ?)", row
                        )
            if dropped:
                problems.append(f"{dropped} entr{'y' if dropped == 1 else 'ies'} damaged")
            done = OutboxLoss(
                id=loss.id,
                moved_to=loss.moved_to,
                at=loss.at,
                salvaged=taken,
                complete=not problems,
                detail="; ".join([loss.detail, *_named(problems)]),
            )
            db.execute(
                "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES (?, ?)",
                (_LOSS_KEY + done.id, done.to_json()),
            )
            _forget_old_losses(db)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            if src is not None:
                src.close()
        (log.warning if done.complete else log.error)(
            "outbox %s was unreadable (%s): moved to %s; %d entr%s read back from it and sent in "
            "their order; %s",
            self.path,
            loss.detail,
            loss.moved_to,
            taken,
            "y" if taken == 1 else "ies",
            "nothing else was lost"
            if done.complete
            else "any other it held is lost from the outbox: " + "; ".join(_named(problems)),
        )
        return done

    def _losses_sync(self, db: sqlite3.Connection) -> list[OutboxLoss]:
        rows = db.execute(
            "SELECT key, value FROM outbox_meta WHERE key >= ? AND key < ?", _LOSS_KEYS
        ).fetchall()
        out: list[OutboxLoss] = []
        for key, value in rows:
            try:
                out.append(OutboxLoss.from_json(str(value)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                log.error("outbox %s: loss note %s unreadable (%s)", self.path, key, exc)
        return sorted(out, key=lambda x: (x.at, x.id))

    async def losses(self) -> list[OutboxLoss]:
        """The losses of unreadable files this file replaced, oldest first (at most
        ``LOSSES_KEPT``)."""
        assert self._db is not None
        db = self._db
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._losses_sync, db)

    async def note_stream_positions(self, loss_id: str, last_seqs: dict[str, int]) -> None:
        """Keep where each stream stood when the broker was first reached after loss
        ``loss_id`` (``OutboxLoss.stream_last_seq``)."""
        assert self._db is not None
        db = self._db

        def note() -> None:
            row = db.execute(
                "SELECT value FROM outbox_meta WHERE key = ?", (_LOSS_KEY + loss_id,)
            ).fetchone()
            if row is None:
                return
            raw = json.loads(str(row[0]))
            raw["stream_last_seq"] = dict(last_seqs)
            db.execute(
                "UPDATE outbox_meta SET value = ? WHERE key = ?",
                (json.dumps(raw, sort_keys=True), _LOSS_KEY + loss_id),
            )

        await asyncio.get_running_loop().run_in_executor(self._exec, note)

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
            for subject, event_id, payload, accepted_at in rows:
                cur = db.execute(
                    "INSERT INTO outbox(subject, event_id, payload, accepted_at, crc)"
                    " VALUES (?,?,?,?,?)",
                    (
                        subject,
                        event_id,
                        payload,
                        accepted_at,
                        entry_crc(subject, event_id, payload),
                    ),
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

    async def append(
        self,
        subject: str,
        event_id: str,
        payload: bytes,
        accepted_at: float,
        *,
        yields: bool = False,
    ) -> int:
        """Accept one entry; returns its sequence number once it is on disk. ``yields``: its
        publisher keeps a copy of its own (refused earlier at the cap: ``YIELDING_SHARE``)."""
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open")
        self._admit([(subject, event_id, payload, accepted_at)], yields=yields)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((subject, event_id, payload, accepted_at, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        return await fut

    async def append_many(
        self, rows: list[tuple[str, str, bytes, float]], *, yields: bool = False
    ) -> list[int]:
        """Accept several entries in order with one commit; their sequence numbers once on disk."""
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open")
        self._admit(rows, yields=yields)  # all or none: a decision's setpoints are not split
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
                self._held_bytes -= sum(entry_bytes(b[0], b[1], b[2]) for b in batch)
                error = self._disk_full(exc, len(batch))
                for b in batch:
                    if not b[4].done():
                        b[4].set_exception(error)
                continue
            self._count += len(batch)
            self.nonempty.set()
            for b, seq in zip(batch, seqs, strict=True):
                if not b[4].done():
                    b[4].set_result(seq)

    def _disk_full(self, exc: Exception, entries: int) -> Exception:
        """``exc``, or for SQLite's "database or disk is full" an :class:`OutboxFull` that says
        the disk filled before the cap and what to change (SQLite's words alone named neither
        the file nor the cap)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if not isinstance(exc, sqlite3.OperationalError) or code is None:
            return exc
        if code & 0xFF != sqlite3.SQLITE_FULL:
            return exc
        self.refused += entries
        full = OutboxFull(
            f"outbox {self.path}: the disk is full ({exc}) with {self.held_bytes} bytes of "
            f"events held, below [bus] outbox_max_bytes = {self.max_bytes}: free space in "
            f"{self.path.parent} or lower outbox_max_bytes; nothing of it written"
        )
        full.__cause__ = exc
        log.error("%s", full.strerror)
        return full

    def _read_sync(self, limit: int) -> list[OutboxEntry]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT seq, subject, event_id, payload FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), str(r[2]), bytes(r[3])) for r in rows]

    async def peek(self, limit: int = 256) -> list[OutboxEntry]:
        """The oldest entries, in acceptance order."""
        return await asyncio.get_running_loop().run_in_executor(self._exec, self._read_sync, limit)

    def _delete_sync(self, upto_seq: int) -> tuple[int, int]:
        assert self._lazy is not None
        # (The worker thread runs one job at a time: nothing is added between the two.)
        row = self._lazy.execute(
            f"SELECT {_HELD_BYTES_SQL} FROM outbox WHERE seq <= ?", (upto_seq,)
        ).fetchone()
        cur = self._lazy.execute("DELETE FROM outbox WHERE seq <= ?", (upto_seq,))
        return int(cur.rowcount), int(row[0])

    async def remove_through(self, seq: int) -> None:
        """Remove every entry up to and including ``seq`` (they were confirmed in order)."""
        n, size = await asyncio.get_running_loop().run_in_executor(
            self._exec, self._delete_sync, seq
        )
        self._count = max(0, self._count - n)
        self._held_bytes = max(0, self._held_bytes - size)
        if self._count == 0 and not self._pending:
            self.nonempty.clear()

    def _set_aside_sync(self, seq: int, at: float, reason: str) -> tuple[int, int]:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                f"SELECT {_HELD_BYTES_SQL} FROM outbox WHERE seq = ?", (seq,)
            ).fetchone()
            db.execute(
                "INSERT OR IGNORE INTO outbox_set_aside (seq, subject, event_id, payload,"
                " accepted_at, set_aside_at, reason) SELECT seq, subject, event_id, payload,"
                " accepted_at, ?, ? FROM outbox WHERE seq = ?",
                (at, reason, seq),
            )
            n = int(db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return n, int(row[0])

    async def set_aside(self, seq: int, at: float, reason: str) -> None:
        """Move entry ``seq`` out of the queue into ``outbox_set_aside`` (one durable commit):
        it is kept, and no longer sent. It still counts against the cap (it is on disk) until
        its publisher dealt with it (``mark_reported``)."""
        n, size = await asyncio.get_running_loop().run_in_executor(
            self._exec, self._set_aside_sync, seq, at, reason
        )
        self._count = max(0, self._count - n)
        self._held_bytes = max(0, self._held_bytes - size)
        self._aside_bytes += size
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

    async def unreported_set_aside(self, after_seq: int = 0, limit: int = 16) -> list[SetAside]:
        """Set-aside entries after ``after_seq`` whose publisher has not said it dealt with
        them, oldest first."""
        assert self._db is not None
        db = self._db
        rows = await asyncio.get_running_loop().run_in_executor(
            self._exec,
            lambda: db.execute(
                "SELECT seq, subject, event_id, payload, reason, set_aside_at FROM"
                " outbox_set_aside WHERE seq > ? AND reported_at IS NULL ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall(),
        )
        return [
            SetAside(int(r[0]), str(r[1]), str(r[2]), bytes(r[3]), str(r[4]), float(r[5]))
            for r in rows
        ]

    def _mark_reported_sync(self, seq: int, at: float) -> int:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT length(payload) FROM outbox_set_aside WHERE seq = ?", (seq,)
            ).fetchone()
            db.execute(
                "UPDATE outbox_set_aside SET reported_at = COALESCE(reported_at, ?),"
                " payload = X'' WHERE seq = ?",
                (at, seq),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return 0 if row is None else int(row[0])

    async def mark_reported(self, seq: int, at: float) -> None:
        """Set-aside entry ``seq`` was dealt with by its publisher: not offered again, and its
        payload dropped (its publisher has the copy; the row stays, naming the event and why it
        was set aside), which gives its room back under the cap."""
        freed = await asyncio.get_running_loop().run_in_executor(
            self._exec, self._mark_reported_sync, seq, at
        )
        self._aside_bytes = max(0, self._aside_bytes - freed)

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
        row, aside = await asyncio.get_running_loop().run_in_executor(
            self._exec,
            lambda: (
                db.execute(f"SELECT COUNT(*), {_HELD_BYTES_SQL} FROM outbox").fetchone(),
                _aside_bytes_sync(db),
            ),
        )
        # (A batch being written may be counted twice, once here and once by the writer: the
        # next empty peek counts again. Its bytes were counted when it was accepted.)
        self._aside_bytes = aside
        self._count = int(row[0])
        pending = sum(entry_bytes(p[0], p[1], p[2]) for p in self._pending)
        self._held_bytes = int(row[1]) + pending
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


def _aside_bytes_sync(db: sqlite3.Connection) -> int:
    """What the set-aside entries of ``db`` count against the cap (bytes)."""
    return int(db.execute(f"SELECT {_HELD_BYTES_SQL} FROM outbox_set_aside").fetchone()[0])


def _open_read_only(path: Path) -> sqlite3.Connection:
    """``path`` (with its WAL, where the entries of the last commits may be) for reading only:
    the file set aside stays as it was found."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is gone")
    src = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    src.execute("PRAGMA query_only = ON")
    return src


# What a salvage reads of each table: (column, whether a file may lack it: older files did).
_QUEUE_COLUMNS = (
    ("seq", False),
    ("subject", False),
    ("event_id", False),
    ("payload", False),
    ("accepted_at", False),
    ("crc", True),
)
_SET_ASIDE_COLUMNS = (
    *_QUEUE_COLUMNS[:5],
    ("set_aside_at", False),
    ("reason", False),
    ("reported_at", True),
)
_META_COLUMNS = (("key", False), ("value", False))


def _named(problems: list[str]) -> list[str]:
    if len(problems) <= _PROBLEMS_NAMED:
        return problems
    return [*problems[:_PROBLEMS_NAMED], f"{len(problems) - _PROBLEMS_NAMED} more"]


def _entry_ok(row: tuple[Any, ...]) -> bool:
    """Whether a row read back has an entry's types (seq, subject, event id, payload, time)."""
    return (
        isinstance(row[0], int)
        and isinstance(row[1], str)
        and isinstance(row[2], str)
        and isinstance(row[3], bytes)
        and isinstance(row[4], float | int)
    )


def _readable_rows(
    src: sqlite3.Connection,
    table: str,
    wanted: tuple[tuple[str, bool], ...],
    problems: list[str],
) -> Iterator[tuple[Any, ...]]:
    """The ``wanted`` columns of the rows of ``table`` SQLite can still read (NULL for an
    optional column the file lacks), in rowid order, one at a time. A damaged part is stepped
    over: the next rowid that reads again is searched for (doubling, then halving back) as far as
    the largest rowid the table or ``sqlite_sequence`` still tells; each damaged part is named in
    ``problems``."""
    try:
        have = {str(r[1]) for r in src.execute(f"PRAGMA table_info({table})")}
    except sqlite3.DatabaseError as exc:
        problems.append(f"{table}: unreadable ({exc})")
        return
    missing = [name for name, optional in wanted if not optional and name not in have]
    if missing:
        if have or table == "outbox":
            problems.append(f"{table}: no column {', '.join(missing)}")
        return  # (a file from before the table was added has nothing in it to lose)
    columns = ", ".join(name if name in have else "NULL" for name, _ in wanted)
    after = 0
    ceiling: int | None = None
    while True:
        try:
            # Row by row: the rows before a damaged page are read, not lost with a batch.
            for row in src.execute(
                f"SELECT rowid, {columns} FROM {table} WHERE rowid > ? ORDER BY rowid", (after,)
            ):
                after = int(row[0])
                yield tuple(row[1:])
        except sqlite3.DatabaseError as exc:
            if ceiling is None:
                ceiling = _largest_rowid(src, table)
            resume = _next_readable(src, table, after, ceiling)
            problems.append(
                f"{table}: rows after rowid {after} "
                + (f"up to {resume}" if resume is not None else "to the end")
                + f" unreadable ({exc})"
            )
            if resume is None:
                return
            after = resume
            continue
        return


def _largest_rowid(src: sqlite3.Connection, table: str) -> int:
    """The largest rowid ``table`` may hold as far as what still reads tells (0: nothing)."""
    best = 0
    for query, args in (
        (f"SELECT MAX(rowid) FROM {table}", ()),
        ("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)),
    ):
        try:
            row = src.execute(query, args).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None and isinstance(row[0], int):
            best = max(best, row[0])
    return best


def _next_readable(src: sqlite3.Connection, table: str, bad: int, ceiling: int) -> int | None:
    """The smallest ``after`` above ``bad`` (reading the first row past ``bad`` failed) from
    which the first row past it reads again, at most ``ceiling``; None when there is none."""

    def reads(after: int) -> bool:
        try:
            src.execute(
                f"SELECT * FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 1", (after,)
            ).fetchall()
        except sqlite3.DatabaseError:
            return False
        return True

    step = 1
    while True:
        good = min(bad + step, ceiling)
        if good <= bad:
            return None
        if reads(good):
            break
        bad = good
        step *= 2
    while good - bad > 1:
        mid = (bad + good) // 2
        if reads(mid):
            good = mid
        else:
            bad = mid
    return good


def _forget_old_losses(db: sqlite3.Connection) -> None:
    """Keep the newest ``LOSSES_KEPT`` loss notes (an unreadable note counts as the oldest)."""
    dated: list[tuple[float, str]] = []
    for key, value in db.execute(
        "SELECT key, value FROM outbox_meta WHERE key >= ? AND key < ?", _LOSS_KEYS
    ).fetchall():
        try:
            dated.append((OutboxLoss.from_json(str(value)).at, str(key)))
        except (ValueError, KeyError, TypeError, AttributeError):
            dated.append((float("-inf"), str(key)))
    for _, key in sorted(dated)[: max(0, len(dated) - LOSSES_KEPT)]:
        db.execute("DELETE FROM outbox_meta WHERE key = ?", (key,))
