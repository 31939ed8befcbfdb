"""The PostgreSQL store (psycopg 3): every table in one schema, migrations applied on open.

Two connections (records and telemetry), each owned by its worker thread. Record transactions commit
with ``synchronous_commit = on`` (the server has flushed the WAL when a commit returns); telemetry
transactions use ``SET LOCAL synchronous_commit = off``: a killed edge loses nothing committed, a
crashed database server may lose the last fraction of a second of telemetry only.

A driver error that says the server cannot serve now (the connection lost or closed, the server
shutting down, out of disk or connections, read-only after a failover, a deadlock, a timeout) is
:class:`StoreUnavailable`, and the connection is dropped and reopened on the next call; one that
says the statement is wrong (a syntax error, a missing table, bad data) stays what it is: a bug.
A connection found in any state but idle is never reused (a write would go into a transaction
nobody commits).

Reads are bounded by ``read_timeout_s`` and writes by ``write_timeout_s``, each two ways: the
server's ``statement_timeout`` (a lock wait, a slow statement: cancelled, the connection kept), and
a watchdog thread that shuts the connection's socket down when the server does not answer at all.
Only the watchdog works against a silent peer (a partition, a frozen server): the server's own
timeout never hears of the statement, a cancel request needs a new connection to that same
server, and TCP's own means do not fire while the peer's kernel still acknowledges (keepalive
probes are answered; ``tcp_user_timeout`` only counts unacknowledged data, and a request that
reached the server and waits for its answer has none). A write cut short this way says whether
its commit had been sent: if not, nothing was committed; if so, its outcome is unknown, and every
write of the store is idempotent (an audit record appended again is a retry, keys make a repeated
event a no-op), so the caller may repeat it. The server ends a session of ours left idle inside
a transaction (its client gone silent, its commit lost on the way) after ``write_timeout_s``
(``idle_in_transaction_session_timeout``): its row locks (the audit head's) would otherwise hold
every later write until the server's TCP keepalive gave up on it, hours later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql as pgsql

from evcore.store.base import AuditChainConflict, StoreUnavailable
from evcore.store.migrations import POSTGRES, Migration
from evcore.store.sql import READ_GRACE_S, Backend, SqlStore, Tx, qmark_to_format

log = logging.getLogger("evcore.store")

# SQLSTATE classes and codes that say the server cannot serve now, not that the statement is wrong
# (https://www.postgresql.org/docs/current/errcodes-appendix.html). Everything else a statement
# raises (42 syntax / undefined table, 22 data, 23 integrity, 54 program limit, XX internal) is a
# bug, for the caller's traceback.
_UNAVAILABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: admin/crash shutdown, cannot connect now, query canceled
        "58",  # system error: I/O error
    }
)
_UNAVAILABLE_CODES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown
        "55P03",  # lock_not_available (lock_timeout)
        "25006",  # read_only_sql_transaction: the server is a standby (after a failover)
        "25P03",  # idle_in_transaction_session_timeout (the server closed the connection)
        "25P04",  # transaction_timeout (likewise)
    }
)


def is_unavailable(exc: psycopg.Error) -> bool:
    """``exc`` says the server cannot serve now (retry later), not that the statement is wrong.
    A client-side error without SQLSTATE is the connection's (lost, closed, reset)."""
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state[:2] in _UNAVAILABLE_CLASSES or state in _UNAVAILABLE_CODES


def usable(conn: psycopg.Connection[Any]) -> bool:
    """Open, not broken, and idle: in any other state (inside a transaction nobody will commit,
    a command still in progress) the next transaction must not run on it."""
    return (
        not conn.closed
        and not conn.broken
        and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    )


class SilenceWatch:
    """Drops the connection under a transaction the server does not answer.

    A server that stops answering mid-query (a network path that stalls without a reset, a frozen
    server) leaves the worker thread blocked in the driver, where ``statement_timeout`` (the
    server's) cannot end it: every later call would queue behind it. From a thread of its own,
    the watch shuts the connection's socket down once a transaction outlives its bound; the driver
    then fails it (the connection broken), and the next call reconnects. Only the socket
    descriptor is touched from that thread (libpq's objects are the worker's), and the worker
    detaches it before closing the connection, so the number is never one reused by another
    socket."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bound_s = 0.0
        self.what = "read"
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.fired = False

    def attach(self, fd: int | None) -> None:
        with self._cond:
            self._fd = fd

    @contextlib.contextmanager
    def watching(self, bound_s: float, what: str) -> Iterator[None]:
        """Drop the connection if the body outlives ``bound_s`` (``what``: "read" or "write")."""
        with self._cond:
            self.bound_s = bound_s
            self.what = what
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(
                    target=self._run, name=f"evcore-store-{self.name}-watch", daemon=True
                )
                self._thread.start()
            self.fired = False
            self._deadline = time.monotonic() + self.bound_s
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def take_fired(self) -> bool:
        """Whether the watch dropped the connection since the last transaction began (and
        forget it)."""
        with self._cond:
            fired, self.fired = self.fired, False
        return fired

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                if self._fd is None:
                    continue
                self.fired = True
                try:
                    with socket.socket(fileno=os.dup(self._fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError as exc:
                    log.warning("store %s: could not drop a silent connection: %s", self.name, exc)
                    continue
                log.warning(
                    "store %s: no answer to a %s within %g s; connection dropped",
                    self.name,
                    self.what,
                    self.bound_s,
                )


class PostgresBackend(Backend):
    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        relaxed_commit: bool,
        connect_timeout_s: float,
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
        self._dsn = dsn
        self._schema = schema
        self._relaxed = relaxed_commit
        self._timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._watch = (
            None
            if read_timeout_s is None and write_timeout_s is None and open_timeout_s is None
            else SilenceWatch(name)
        )
        # The last transaction: whether it only read, its bound (the [store] key and its value;
        # None: unbounded), and whether its COMMIT had been sent (for the message of its
        # failure).
        self._read_only = False
        self._bound: tuple[str, float] | None = None
        self._commit_sent = False

    @property
    def label(self) -> str:
        return f"PostgreSQL store (schema {self._schema!r})"

    def connect(self) -> None:
        conn = self._conn
        if conn is not None:
            if usable(conn):
                return
            if not conn.closed and not conn.broken:
                log.warning(
                    "store %s: connection left %s, not idle; reopened",
                    self.name,
                    conn.info.transaction_status.name,
                )
        self.close()
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._timeout_s)),
                application_name=f"evcore-store:{self._schema}:{self.name}",
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL store (schema {self._schema!r}): {exc}"
            ) from exc
        if self._watch is not None:
            # From here on the watch can end a silent server's wait (the set-up below included).
            self._watch.attach(conn.pgconn.socket)
        try:
            if self._must_exist:
                found = conn.execute(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                    (self._schema,),
                ).fetchone()
                if found is None:
                    raise StoreUnavailable(f"no evcore store in PostgreSQL schema {self._schema!r}")
            try:
                conn.execute(
                    pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                        pgsql.Identifier(self._schema)
                    )
                )
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateSchema):
                # IF NOT EXISTS is no guard against a concurrent CREATE (another edge, a tool
                # starting at the same time; this runs before the migrations' advisory lock):
                # the loser's insert into pg_namespace fails. The schema is there all the same.
                pass
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self._schema)))
            conn.execute("SET synchronous_commit TO on")
            if self.write_timeout_s is not None:
                # A session of ours idle inside a transaction for this long has a client that
                # gave up on it (the watch) and went silent, or lost its COMMIT on the way: the
                # server ends it, and with it the row locks every later write would wait for.
                # (Idle: between statements, never while one runs; ours follow each other.)
                ms = max(1, round(self.write_timeout_s * 1000))
                conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
        except (psycopg.Error, StoreUnavailable) as exc:
            if self._watch is not None:
                self._watch.attach(None)
            with contextlib.suppress(Exception):
                conn.close()
            if isinstance(exc, StoreUnavailable):
                raise
            why = str(exc)
            if self._watch is not None and self._watch.take_fired():
                why = f"no answer within {self._watch.bound_s:g} s ({self._bound_text()}); {why}"
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL store (schema {self._schema!r}): {why}"
            ) from exc
        self._conn = conn

    def close(self) -> None:
        if self._watch is not None:
            self._watch.attach(None)  # before the descriptor is closed (and its number reused)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def release(self) -> None:
        if self._watch is not None:
            self._watch.stop()

    @contextlib.contextmanager
    def transaction(
        self, *, read_only: bool = False, bounded: bool = True, opening: bool = False
    ) -> Iterator[Tx]:
        self._bound = self.bound_of(read_only=read_only, bounded=bounded, opening=opening)
        limit_s = None if self._bound is None else self._bound[1]
        self._read_only = read_only
        self._commit_sent = False
        watch: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if limit_s is not None and self._watch is not None:
            # The server's own cancel (statement_timeout) gets the first half of the grace.
            watch = self._watch.watching(limit_s + READ_GRACE_S / 2, self._what())
        with watch:
            stack = contextlib.ExitStack()
            for attempt in (1, 2):
                self.connect()
                conn = self._conn
                assert conn is not None
                try:
                    # BEGIN is where a connection the server dropped while idle (restart,
                    # failover, idle timeout) shows up; nothing has run yet, so reconnecting
                    # once is safe.
                    stack.enter_context(conn.transaction())
                    break
                except psycopg.Error:
                    if (
                        usable(conn)
                        or attempt == 2
                        or (limit_s is not None and self._watch_fired())
                    ):
                        raise
                    self.close()
                    log.info("store %s: connection lost while idle; reconnected", self.name)
            assert conn is not None
            with stack, conn.cursor() as cur:
                if limit_s is not None:
                    # Server side: a statement waiting for a lock or running long is cancelled
                    # (QueryCanceled), the connection kept, nothing committed.
                    ms = max(1, round(limit_s * 1000))
                    cur.execute(f"SET LOCAL statement_timeout = {ms}")
                if self._relaxed and not read_only:
                    cur.execute("SET LOCAL synchronous_commit TO off")
                yield Tx(cur, qmark_to_format, copy=True)
                # Leaving the block sends COMMIT: from here a lost connection leaves the outcome
                # unknown.
                self._commit_sent = True

    def _what(self) -> str:
        if self._bound is not None and self._bound[0] == "open_timeout_s":
            return f"opening ({self.step})"
        return "read" if self._read_only else "write"

    def _bound_text(self) -> str:
        key, limit_s = self._bound if self._bound is not None else ("unbounded", 0.0)
        return f"[store] {key} = {limit_s:g}"

    def _watch_fired(self) -> bool:
        return self._watch is not None and self._watch.fired

    def migrations(self) -> Sequence[Migration]:
        return POSTGRES

    def lock_for_migration(self, tx: Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"evcore.store:{self._schema}",))

    def on_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return AuditChainConflict(f"concurrent write lost a race: {exc}")
        if not isinstance(exc, psycopg.Error):
            return exc
        fired = self._watch is not None and self._watch.take_fired()
        lost = self._conn is not None and not usable(self._conn)
        if not (fired or lost or is_unavailable(exc)):
            return exc  # a bug: the connection is fine, the statement is not
        self.close()
        why = str(exc)
        what = self._what()
        a = "" if what.startswith("opening") else "a "
        key = self._bound_text()
        if fired:
            assert self._watch is not None
            why = (
                f"no answer to {a}{what} within {self._watch.bound_s:g} s ({key}); connection"
                f" dropped ({exc})"
            )
        elif isinstance(exc, psycopg.errors.QueryCanceled) and self._bound is not None:
            why = f"{exc} ({a}{what} waits at most {key} s)"
        if not self._read_only:
            if self._commit_sent and (fired or lost):
                why += (
                    "; its COMMIT was sent but not answered, so its outcome is unknown (it may"
                    " have been committed: repeating the write is safe, every store write is"
                    " idempotent)"
                )
            else:
                why += "; nothing was committed"
        return StoreUnavailable(f"{self.label}: {why}")


def postgres_store(
    dsn: str,
    schema: str,
    *,
    telemetry_retention_s: float,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float | None = None,
    write_timeout_s: float | None = None,
    open_timeout_s: float | None = None,
    must_exist: bool = False,
) -> SqlStore:
    records = PostgresBackend(
        dsn,
        schema,
        relaxed_commit=False,
        connect_timeout_s=connect_timeout_s,
        name="pg-records",
        must_exist=must_exist,
        read_timeout_s=read_timeout_s,
        write_timeout_s=write_timeout_s,
        open_timeout_s=open_timeout_s,
    )
    telemetry = PostgresBackend(
        dsn,
        schema,
        relaxed_commit=True,
        connect_timeout_s=connect_timeout_s,
        name="pg-telemetry",
        must_exist=must_exist,
        read_timeout_s=read_timeout_s,
        write_timeout_s=write_timeout_s,
        open_timeout_s=open_timeout_s,
    )
    safe = psycopg.conninfo.conninfo_to_dict(dsn)
    where = f"{safe.get('host', '')}:{safe.get('port', 5432)}/{safe.get('dbname', '')}"
    return SqlStore(
        records,
        telemetry,
        telemetry_retention_s=telemetry_retention_s,
        description=f"postgresql://{where}#{schema}",
    )
