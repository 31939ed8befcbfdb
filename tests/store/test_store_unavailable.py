"""When the store is unavailable (retry later) and when its failure is a bug, on real SQLite files
and a real PostgreSQL (cut, stalled or locked).

``StoreUnavailable`` is what the API answers UNAVAILABLE (clients retry); anything else reaches the
caller as a bug (INTERNAL, with its traceback). Review of the API's error mapping: an embedded
store whose directory could not be made raised a raw OSError; PostgreSQL errors that say the
server cannot serve now were not all StoreUnavailable (a server turned read-only by a failover, a
session timeout) while some that say the statement is wrong were (a program limit), and SQLite
took its own syntax errors for an outage; a connection left inside a transaction took the next
writes into it; a read had no bound (a locked table, a server that stops answering: until the
client's deadline; SQLite: 30 s for any writer of the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bus_testkit import free_port
from edge_testkit import spawn_edge
from evcore.edge.sitegen import depot_table, to_toml
from evcore.store import (
    SessionRecord,
    SqlStore,
    StoreConfigError,
    StoreUnavailable,
    open_store,
)
from evcore.store.postgres import PostgresBackend
from pg_testkit import PG_DSN
from psycopg import errors as pgerr
from psycopg import sql as pgsql

T0 = 1_767_225_600.0


def _elapsed(t0: float) -> float:
    return time.monotonic() - t0


# -- 1. an embedded store whose directory cannot be made --------------------------------------


@contextlib.contextmanager
def _read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only, for root too (which write permissions do not stop): immutable."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(0o755)


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-directory"])
async def test_an_embedded_store_whose_directory_cannot_be_made_is_unavailable_naming_it(
    tmp_path: Path, where: str
) -> None:
    """Before: NotADirectoryError / PermissionError came through raw (INTERNAL from the API)."""
    if where == "parent-is-a-file":
        (tmp_path / "var").write_text("a file where the store's parent directory should be")
        directory = tmp_path / "var" / "store"
        guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        (tmp_path / "ro").mkdir()
        directory = tmp_path / "ro" / "store"
        guard = _read_only(tmp_path / "ro")
    with guard:
        store = open_store({"path": str(directory)}, tmp_path)
        with pytest.raises(StoreUnavailable) as opening:
            await store.open()
        with pytest.raises(StoreUnavailable) as reading:  # a later call: the same, no traceback
            await store.list_sessions()
        await store.close()
    for err in (opening, reading):
        assert f"cannot open SQLite store {directory / 'records.sqlite'}" in str(err.value)
    assert not directory.exists()


async def test_the_edge_names_the_store_it_cannot_open(tmp_path: Path) -> None:
    """`evcore edge` with such a store exits 1 naming the store's file. Before: "could not start:
    NotADirectoryError(20, 'Not a directory')", naming nothing."""
    table = depot_table(2, per_feeder=2)
    table["ocpp"]["port"] = free_port()
    (tmp_path / "var").write_text("")
    table["store"] = {"kind": "embedded", "path": str(tmp_path / "var" / "store")}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    proc = await spawn_edge(site_file)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.send_signal(signal.SIGKILL)
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, text[-2000:]
    assert "could not start: StoreUnavailable" in text, text[-2000:]
    assert f"cannot open SQLite store {tmp_path / 'var' / 'store' / 'records.sqlite'}" in text


# -- 2. which driver errors are an outage, which a bug; a broken connection is reopened --------


def _pg_store(schema: str, tmp_path: Path, **section: object) -> SqlStore:
    return open_store({"kind": "postgres", "dsn": PG_DSN, "schema": schema, **section}, tmp_path)


def _records_conn(store: SqlStore) -> psycopg.Connection[Any]:
    """The records backend's connection (idle between calls): to break it as a server would."""
    conn = store._records._conn  # type: ignore[attr-defined]
    assert isinstance(conn, psycopg.Connection)
    return conn


def _sessions_in(schema: str) -> list[str]:
    """Session ids committed in ``schema``, seen from another connection."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute(
            pgsql.SQL("SELECT session_id FROM {}.sessions ORDER BY session_id").format(
                pgsql.Identifier(schema)
            )
        ).fetchall()
    return [r[0] for r in rows]


UNAVAILABLE = [
    pgerr.AdminShutdown("terminating connection due to administrator command"),
    pgerr.CrashShutdown("terminating connection because of crash of another server process"),
    pgerr.CannotConnectNow("the database system is starting up"),
    pgerr.QueryCanceled("canceling statement due to statement timeout"),
    pgerr.DiskFull("could not extend file: No space left on device"),
    pgerr.TooManyConnections("sorry, too many clients already"),
    pgerr.IoError("could not read block 0"),
    pgerr.DeadlockDetected("deadlock detected"),
    pgerr.SerializationFailure("could not serialize access"),
    pgerr.LockNotAvailable("canceling statement due to lock timeout"),
    pgerr.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
    pgerr.IdleInTransactionSessionTimeout("terminating connection due to idle-in-transaction"),
    psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
]
BUGS = [
    pgerr.SyntaxError('syntax error at or near "SELEC"'),
    pgerr.UndefinedTable('relation "sessionz" does not exist'),
    pgerr.UndefinedColumn('column "x" does not exist'),
    pgerr.ProgramLimitExceeded("target lists can have at most 1664 entries"),
    pgerr.NumericValueOutOfRange("integer out of range"),
    pgerr.NotNullViolation('null value in column "charger_id"'),
    pgerr.DataCorrupted("invalid page in block 7"),
    psycopg.InterfaceError("the cursor is closed"),
]


def test_postgres_driver_errors_are_an_outage_or_a_bug_by_what_they_say(pg_schema: str) -> None:
    """An outage (the server cannot serve now) is StoreUnavailable naming the schema, and the
    connection is dropped (the next call reconnects); a bug stays itself, the connection kept.
    Before: a server turned read-only (failover) and an idle-in-transaction timeout were raw
    InternalErrors, a program limit (a bug) StoreUnavailable."""
    backend = PostgresBackend(
        PG_DSN, pg_schema, relaxed_commit=False, connect_timeout_s=2, name="records"
    )
    try:
        for exc in UNAVAILABLE:
            backend.connect()
            mapped = backend.on_error(exc)
            assert isinstance(mapped, StoreUnavailable), (exc, mapped)
            assert f"PostgreSQL store (schema {pg_schema!r}): {exc}" in str(mapped)
            assert backend._conn is None, exc  # reopened by the next call
        backend.connect()
        conn = backend._conn
        for exc in BUGS:
            assert backend.on_error(exc) is exc
            assert backend._conn is conn, exc  # a bug's connection is fine
        # Any error on a connection that is closed or broken after it is the connection's.
        conn.close()
        lost = psycopg.InterfaceError("cannot execute operations: the connection is in status 1")
        assert isinstance(backend.on_error(lost), StoreUnavailable)
        assert backend._conn is None
    finally:
        backend.close()
        backend.release()


async def test_a_server_turned_read_only_is_unavailable_and_the_next_call_reconnects(
    pg_schema: str, tmp_path: Path
) -> None:
    """The store's connection ends up on a standby (a failover; here its transactions made
    read-only): a write is StoreUnavailable and the next call reconnects (a DSN listing the
    hosts with target_session_attrs=read-write finds the new primary). Before: a raw
    ReadOnlySqlTransaction, and on every later call for good (the connection was kept)."""
    store = _pg_store(pg_schema, tmp_path)
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        _records_conn(store).execute("SET default_transaction_read_only = on")
        with pytest.raises(StoreUnavailable, match=f"schema '{pg_schema}'.*read-only"):
            await store.upsert_session(SessionRecord("S2", "C1", T0 + 1))
        await store.upsert_session(SessionRecord("S2", "C1", T0 + 1))
        assert _sessions_in(pg_schema) == ["S1", "S2"]
    finally:
        await store.close()


async def test_a_connection_left_inside_a_transaction_is_reopened_not_written_into(
    pg_schema: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the next write went into a savepoint of the transaction left open and returned
    as committed; nobody committed it (lost when the connection closed)."""
    store = _pg_store(pg_schema, tmp_path)
    await store.open()
    try:
        _records_conn(store).execute("BEGIN")
        with caplog.at_level(logging.WARNING, logger="evcore.store"):
            await store.upsert_session(SessionRecord("S1", "C1", T0))
        assert _sessions_in(pg_schema) == ["S1"]
        assert "connection left INTRANS, not idle; reopened" in caplog.text
    finally:
        await store.close()


async def test_a_syntax_error_stays_a_bug_and_the_store_goes_on(store: SqlStore) -> None:
    """Before, on SQLite: StoreUnavailable (sqlite3 raises OperationalError for it too), which
    the API answered UNAVAILABLE: clients retried a bug."""
    with pytest.raises(Exception) as err:
        await store._exec(store._records, lambda tx: tx.execute("SELEC 1"))
    assert not isinstance(err.value, StoreUnavailable)
    assert isinstance(err.value, sqlite3.OperationalError | pgerr.SyntaxError), repr(err.value)
    await store.upsert_session(SessionRecord("S1", "C1", T0))
    assert [s.session_id for s in await store.list_sessions()] == ["S1"]


@contextlib.contextmanager
def _table_locked(schema: str, table: str) -> Iterator[psycopg.Connection[Any]]:
    """Another session holds ``table`` in ACCESS EXCLUSIVE mode (a migration, a VACUUM FULL):
    every statement on it waits. Released on leaving."""
    with psycopg.connect(PG_DSN) as conn:
        conn.execute(
            pgsql.SQL("LOCK TABLE {}.{} IN ACCESS EXCLUSIVE MODE").format(
                pgsql.Identifier(schema), pgsql.Identifier(table)
            )
        )
        try:
            yield conn
        finally:
            conn.rollback()


async def _wait_for_lock_waiter(schema: str) -> None:
    app = f"evcore-store:{schema}:%"
    for _ in range(200):
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            waiting = conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE %s"
                " AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone()
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the store's statement never waited for the lock")


async def test_a_store_connection_terminated_mid_read_is_unavailable_then_reopened(
    pg_schema: str, tmp_path: Path
) -> None:
    """pg_terminate_backend (an administrator, a server shutting down) under a read: the read
    is StoreUnavailable, the next one reconnects. (This one held before the review too.)"""
    store = _pg_store(pg_schema, tmp_path)
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        with _table_locked(pg_schema, "sessions"):
            read = asyncio.ensure_future(store.list_sessions())
            await _wait_for_lock_waiter(pg_schema)
            with psycopg.connect(PG_DSN, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (f"evcore-store:{pg_schema}:pg-records",),
                )
            with pytest.raises(StoreUnavailable, match="administrator command"):
                await asyncio.wait_for(read, 10)
        assert [s.session_id for s in await store.list_sessions()] == ["S1"]
    finally:
        await store.close()


# -- 3. a bounded wait for reads --------------------------------------------------------------


def test_read_timeout_s_is_a_store_key() -> None:
    from evcore.store import StoreConfig

    assert StoreConfig.from_section(None).read_timeout_s == 10.0
    assert StoreConfig.from_section({"read_timeout_s": 2}).read_timeout_s == 2.0
    for bad in (0, -1, "5", float("inf"), True):
        with pytest.raises(StoreConfigError, match="read_timeout_s"):
            StoreConfig.from_section({"read_timeout_s": bad})


async def test_a_postgres_read_waiting_for_a_lock_ends_at_read_timeout_s_writes_wait_on(
    pg_schema: str, tmp_path: Path
) -> None:
    """A table locked by another session: a read is StoreUnavailable after read_timeout_s
    (the server's statement_timeout), naming the store and the key; a write keeps waiting and
    lands once the lock is released (writes are not bounded: an audit record must not be lost to
    a timeout). Before: the read waited for the lock however long it was held."""
    store = _pg_store(pg_schema, tmp_path, read_timeout_s=0.5)
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        with _table_locked(pg_schema, "sessions"):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await asyncio.wait_for(store.list_sessions(), 15)
            assert 0.4 < _elapsed(t0) < 5.0
            assert f"PostgreSQL store (schema {pg_schema!r})" in str(err.value)
            assert "statement timeout" in str(err.value)
            assert "read_timeout_s = 0.5" in str(err.value)
            write = asyncio.ensure_future(store.upsert_session(SessionRecord("S2", "C1", T0 + 1)))
            await asyncio.sleep(1.5)  # three times the read bound
            assert not write.done()
        await asyncio.wait_for(write, 10)
        assert sorted(s.session_id for s in await store.list_sessions()) == ["S1", "S2"]
    finally:
        await store.close()


class StallingRelay:
    """A TCP relay to PostgreSQL whose ``stall()`` stops forwarding in both directions without
    closing anything (a network path or a server that stops answering): bytes sent are held, new
    connections are accepted but not connected. ``resume()`` forwards again."""

    def __init__(self) -> None:
        pg = psycopg.conninfo.conninfo_to_dict(PG_DSN)
        self.host = str(pg.get("host") or "127.0.0.1")
        self.port = int(pg.get("port") or 5432)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        self.flowing.set()
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.ensure_future(pipe)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


@pytest.fixture
async def relay() -> AsyncIterator[StallingRelay]:
    r = StallingRelay()
    yield r
    await r.close()


async def test_a_postgres_server_that_stops_answering_mid_read_is_unavailable_then_reopened(
    relay: StallingRelay, pg_schema: str, tmp_path: Path
) -> None:
    """The path to the server stalls (nothing closed, nothing answered): the server's
    statement_timeout never hears of the read, so the store drops the connection itself, about
    read_timeout_s (+ half the grace) later; once the path is back the next read reconnects.
    Before: the read waited for ever (until the client's deadline), and every later call of the
    connection behind it."""
    pg = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    pg.update(host="127.0.0.1", port=str(await relay.start()))
    dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in pg.items()})
    store = open_store(
        {
            "kind": "postgres",
            "dsn": dsn,
            "schema": pg_schema,
            "read_timeout_s": 0.5,
            "connect_timeout_s": 1,
        },
        tmp_path,
    )
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        relay.stall()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            await asyncio.wait_for(store.list_sessions(), 15)
        assert 0.9 < _elapsed(t0) < 5.0
        assert f"PostgreSQL store (schema {pg_schema!r}): no answer to a read within 1 s" in str(
            err.value
        )
        relay.resume()
        assert [s.session_id for s in await store.list_sessions()] == ["S1"]
    finally:
        relay.resume()
        await store.close()


@contextlib.contextmanager
def _sqlite_writer(directory: Path) -> Iterator[sqlite3.Connection]:
    """Another process's writer on ``records.sqlite`` (a second program on the same store, an
    operator's UPDATE): holds the write lock, uncommitted, until leaving (rolled back)."""
    conn = sqlite3.connect(directory / "records.sqlite", isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM sessions")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def test_a_sqlite_read_does_not_wait_for_another_writer_of_the_file(tmp_path: Path) -> None:
    """A read sees the last commit at once while another writer holds the file's write lock
    (WAL: a deferred read takes no lock a writer holds). Before: every read began IMMEDIATE,
    taking the write lock, so it waited for the other writer (up to the 30 s busy timeout, then
    "database is locked")."""
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        with _sqlite_writer(tmp_path / "store"):
            t0 = time.monotonic()
            got = await asyncio.wait_for(store.list_sessions(), 10)
            assert _elapsed(t0) < 1.0
            assert [s.session_id for s in got] == ["S1"]
    finally:
        await store.close()


@contextlib.contextmanager
def _write_locked(section: dict[str, object], tmp_path: Path) -> Iterator[None]:
    """The sessions table's writes held up by another session: SQLite's write lock on the file,
    PostgreSQL's lock on the table."""
    if section["kind"] == "postgres":
        with _table_locked(str(section["schema"]), "sessions"):
            yield
    else:
        with _sqlite_writer(Path(str(section["path"]))):
            yield


async def test_a_read_queued_behind_a_waiting_write_is_unavailable_the_write_lands(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    """A write waits for another session's lock (unbounded on PostgreSQL, 30 s on SQLite: left
    so); a read of the same store then waits behind it on the backend's one connection, and is
    StoreUnavailable after read_timeout_s + 1 s; the write lands once the lock is released.
    Before: the read waited as long as the write."""
    section = {**store_section, "read_timeout_s": 0.5}
    store = open_store(section, tmp_path)
    await store.open()
    try:
        await store.upsert_session(SessionRecord("S1", "C1", T0))
        with _write_locked(section, tmp_path):
            write = asyncio.ensure_future(store.upsert_session(SessionRecord("S2", "C1", T0 + 1)))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await asyncio.wait_for(store.get_session("S1"), 15)
            assert 1.4 < _elapsed(t0) < 5.0
            assert "a read got no answer within 1.5 s ([store] read_timeout_s = 0.5" in str(
                err.value
            )
            assert ("records.sqlite" if section["kind"] == "embedded" else "PostgreSQL") in str(
                err.value
            )
            assert not write.done()
        await asyncio.wait_for(write, 35)
        assert sorted(s.session_id for s in await store.list_sessions()) == ["S1", "S2"]
    finally:
        await store.close()
