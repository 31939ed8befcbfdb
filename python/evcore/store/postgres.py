"""The PostgreSQL store (psycopg 3): every table in one schema, migrations applied on open.

Two connections (records and telemetry), each owned by its worker thread. Record transactions commit
with ``synchronous_commit = on`` (the server has flushed the WAL when a commit returns); telemetry
transactions use ``SET LOCAL synchronous_commit = off``: a killed edge loses nothing committed, a
crashed database server may lose the last fraction of a second of telemetry only. A broken
connection is dropped and reopened on the next call; the failing call raises
:class:`StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql as pgsql

from evcore.store.base import AuditChainConflict, StoreUnavailable
from evcore.store.migrations import POSTGRES, Migration
from evcore.store.sql import Backend, SqlStore, Tx, qmark_to_format

log = logging.getLogger("evcore.store")


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
    ) -> None:
        super().__init__(name)
        self._must_exist = must_exist
        self._dsn = dsn
        self._schema = schema
        self._relaxed = relaxed_commit
        self._timeout_s = connect_timeout_s
        self._conn: psycopg.Connection[Any] | None = None

    def connect(self) -> None:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        self.close()
        try:
            conn = psycopg.connect(
                self._dsn,
                autocommit=True,
                connect_timeout=max(1, int(self._timeout_s)),
                application_name=f"evcore-store:{self._schema}:{self.name}",
            )
            if self._must_exist:
                found = conn.execute(
                    "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s",
                    (self._schema,),
                ).fetchone()
                if found is None:
                    conn.close()
                    raise StoreUnavailable(f"no evcore store in PostgreSQL schema {self._schema!r}")
            conn.execute(
                pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(self._schema))
            )
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self._schema)))
            conn.execute("SET synchronous_commit TO on")
        except psycopg.Error as exc:
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL store (schema {self._schema!r}): {exc}"
            ) from exc
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        stack = contextlib.ExitStack()
        for attempt in (1, 2):
            self.connect()
            conn = self._conn
            assert conn is not None
            try:
                # BEGIN is where a connection the server dropped while idle (restart, failover,
                # idle timeout) shows up; nothing has run yet, so reconnecting once is safe.
                stack.enter_context(conn.transaction())
                break
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:
                    raise
                log.info("store %s: connection lost while idle; reconnected", self.name)
        assert conn is not None
        with stack, conn.cursor() as cur:
            if self._relaxed:
                cur.execute("SET LOCAL synchronous_commit TO off")
            yield Tx(cur, qmark_to_format, copy=True)

    def migrations(self) -> Sequence[Migration]:
        return POSTGRES

    def lock_for_migration(self, tx: Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"evcore.store:{self._schema}",))

    def on_error(self, exc: BaseException) -> BaseException:
        if isinstance(exc, psycopg.errors.UniqueViolation):
            return AuditChainConflict(f"concurrent write lost a race: {exc}")
        if isinstance(exc, psycopg.OperationalError):
            self.close()
            return StoreUnavailable(f"PostgreSQL store (schema {self._schema!r}): {exc}")
        return exc


def postgres_store(
    dsn: str,
    schema: str,
    *,
    telemetry_retention_s: float,
    connect_timeout_s: float = 5.0,
    must_exist: bool = False,
) -> SqlStore:
    records = PostgresBackend(
        dsn,
        schema,
        relaxed_commit=False,
        connect_timeout_s=connect_timeout_s,
        name="pg-records",
        must_exist=must_exist,
    )
    telemetry = PostgresBackend(
        dsn,
        schema,
        relaxed_commit=True,
        connect_timeout_s=connect_timeout_s,
        name="pg-telemetry",
        must_exist=must_exist,
    )
    safe = psycopg.conninfo.conninfo_to_dict(dsn)
    where = f"{safe.get('host', '')}:{safe.get('port', 5432)}/{safe.get('dbname', '')}"
    return SqlStore(
        records,
        telemetry,
        telemetry_retention_s=telemetry_retention_s,
        description=f"postgresql://{where}#{schema}",
    )
