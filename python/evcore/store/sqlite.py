"""The embedded store: two SQLite files in WAL mode under one directory.

``records.sqlite`` holds what must never be lost (sessions, transactions, setpoints, the audit
chain, processed event ids) with ``synchronous=FULL``: a commit has been fsynced when it returns, so
neither a killed process nor a power cut loses it. ``telemetry.sqlite`` holds meter samples and
status history with ``synchronous=NORMAL``: a killed process loses nothing committed, a power cut
may lose the last few transactions (WAL: never corruption). Separate files also keep a telemetry
burst from delaying an audit commit.

A write begins ``IMMEDIATE`` (the write lock up front) and waits up to ``write_timeout_s`` (30 s
unless configured; opening and migrations: ``open_timeout_s``) for another process's writer,
then fails having written nothing; a read begins deferred, which in WAL mode takes no lock a
writer holds (it reads the last commit), and waits for a lock at most ``read_timeout_s``. An
error SQLite reports as the file's or the system's (locked, busy, I/O, full, read-only, cannot
open) is :class:`StoreUnavailable` naming the file; one in the statement (``SQLITE_ERROR``: a
syntax error, a missing table) stays a bug.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from evcore.store.base import StoreUnavailable
from evcore.store.migrations import SQLITE_RECORDS, SQLITE_TELEMETRY, Migration
from evcore.store.sql import Backend, SqlStore, Tx, identity

RECORDS_FILE = "records.sqlite"
TELEMETRY_FILE = "telemetry.sqlite"
#: How long a write waits for another process's write lock when ``write_timeout_s`` is not set, and
#: a migration always (an audit record's writer bounds its own wait and journals the record).
WRITE_BUSY_TIMEOUT_S = 30.0


class SqliteBackend(Backend):
    # Its busy timeout ends a wait for another process's lock; nothing ends file I/O that hangs.
    caller_bounds_writes = True

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str,
        migrations: Sequence[Migration],
        name: str,
        must_exist: bool = False,
        read_timeout_s: float | None = None,
        write_timeout_s: float | None = None,
        open_timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            name,
            read_timeout_s=read_timeout_s,
            write_timeout_s=write_timeout_s,
            open_timeout_s=open_timeout_s,
        )
        self._must_exist = must_exist
        self.path = path
        self._synchronous = synchronous
        self._migrations = migrations
        self._conn: sqlite3.Connection | None = None
        self._busy_ms = 0  # the connection's busy timeout
        # The last transaction's bound ("read_timeout_s" or "write_timeout_s" and its value), for
        # the message of its failure.
        self._bound: tuple[str, float] | None = None

    @property
    def label(self) -> str:
        return f"SQLite store {self.path}"

    def connect(self) -> None:
        if self._conn is not None:
            return
        # An OSError too (the directory's parent a file, a read-only directory, no permission):
        # the store cannot be opened, and the message names the file (an OSError's repr, all
        # the edge's start-up said, named none).
        conn: sqlite3.Connection | None = None
        try:
            if self._must_exist and not self.path.exists():
                raise StoreUnavailable(
                    f"no embedded store at {self.path.parent} ({self.path.name} missing)"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # (Switching to WAL may wait for another process's lock: opening's bound.)
            busy_s = (
                self.open_timeout_s if self.open_timeout_s is not None else WRITE_BUSY_TIMEOUT_S
            )
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=busy_s,
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreUnavailable(f"{self.path}: could not switch to WAL (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
        except (sqlite3.Error, OSError, StoreUnavailable) as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(
                f"cannot open SQLite store {self.path}: {exc}{self._busy_note(exc)}"
            ) from exc
        self._conn = conn
        self._busy_ms = round(busy_s * 1000)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _wait_for_locks(self, conn: sqlite3.Connection, seconds: float) -> None:
        ms = max(1, round(seconds * 1000))
        if ms != self._busy_ms:
            conn.execute(f"PRAGMA busy_timeout={ms}")
            self._busy_ms = ms

    @contextlib.contextmanager
    def transaction(
        self, *, read_only: bool = False, bounded: bool = True, opening: bool = False
    ) -> Iterator[Tx]:
        self._bound = self.bound_of(read_only=read_only, bounded=bounded, opening=opening)
        self.connect()
        conn = self._conn
        assert conn is not None
        if self._bound is not None:
            self._wait_for_locks(conn, self._bound[1])
        else:
            self._wait_for_locks(conn, WRITE_BUSY_TIMEOUT_S)
        cur = conn.cursor()
        # A write takes the write lock up front (IMMEDIATE): a read-then-write (the audit head
        # check) cannot be overtaken by another writer process. A read begins deferred: in WAL
        # mode it then neither waits for another process's writer nor holds one up.
        cur.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
        try:
            yield Tx(cur, identity)
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL, an I/O error): a ROLLBACK then
            # raises "no transaction is active" and hides why it failed.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            cur.close()

    def migrations(self) -> Sequence[Migration]:
        return self._migrations

    def lock_for_migration(self, tx: Tx) -> None:
        pass  # BEGIN IMMEDIATE already excludes other writers

    def on_error(self, exc: BaseException) -> BaseException:
        if not isinstance(exc, sqlite3.OperationalError):
            return exc
        # SQLITE_ERROR is the statement's (syntax, no such table or column): a bug, not an
        # outage a retry would outlast. (Python's own OperationalErrors carry no code.)
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_ERROR:
            return exc
        return StoreUnavailable(f"{self.label}: {exc}{self._busy_note(exc)}")

    def _busy_note(self, exc: BaseException) -> str:
        """For a lock wait that ran out: the key bounding it (and opening's step)."""
        code = getattr(exc, "sqlite_errorcode", None)
        if self._bound is None or code is None or code & 0xFF != sqlite3.SQLITE_BUSY:
            return ""
        key, limit_s = self._bound
        what = {"read_timeout_s": "a read", "write_timeout_s": "a write"}.get(key, "opening")
        note = f" ({what} waits at most [store] {key} = {limit_s:g} s"
        return note + (f", while {self.step})" if key == "open_timeout_s" else ")")


def sqlite_store(
    directory: Path,
    *,
    telemetry_retention_s: float,
    must_exist: bool = False,
    read_timeout_s: float | None = None,
    write_timeout_s: float | None = None,
    open_timeout_s: float | None = None,
) -> SqlStore:
    """The embedded store in ``directory``; ``must_exist`` refuses to create a new one (for tools
    that only read, so a mistyped path is an error rather than an empty store)."""
    directory = Path(directory)
    records = SqliteBackend(
        directory / RECORDS_FILE,
        synchronous="FULL",
        migrations=SQLITE_RECORDS,
        name="records",
        must_exist=must_exist,
        read_timeout_s=read_timeout_s,
        write_timeout_s=write_timeout_s,
        open_timeout_s=open_timeout_s,
    )
    telemetry = SqliteBackend(
        directory / TELEMETRY_FILE,
        synchronous="NORMAL",
        migrations=SQLITE_TELEMETRY,
        name="telemetry",
        must_exist=must_exist,
        read_timeout_s=read_timeout_s,
        write_timeout_s=write_timeout_s,
        open_timeout_s=open_timeout_s,
    )
    return SqlStore(
        records,
        telemetry,
        telemetry_retention_s=telemetry_retention_s,
        description=f"sqlite:{directory}",
    )
