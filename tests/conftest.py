"""Fixtures shared by every room's tests: stores on SQLite and on a real PostgreSQL
(127.0.0.1:5432, user postgres, db test; EVCORE_TEST_PG_DSN overrides), each PostgreSQL test in its
own schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from evcore.store import SqlStore, open_store
from hypothesis import settings
from psycopg import sql

# CI runs every property test on a fixed sequence of examples (EVCORE_HYPOTHESIS_PROFILE=ci, set by
# .ci/run) so a run on the same commit gives the same verdict; a local run draws fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("EVCORE_HYPOTHESIS_PROFILE", "default"))

PG_DSN = os.environ.get("EVCORE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema name; dropped after the test."""
    if not pg_available():
        pytest.fail(f"PostgreSQL not reachable at {PG_DSN!r} (run .ci/services)")
    name = f"evtest_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgres"])
def store_section(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """A ``[store]`` section for each backend."""
    if request.param == "sqlite":
        return {"kind": "embedded", "path": str(tmp_path / "store")}
    schema = request.getfixturevalue("pg_schema")
    return {"kind": "postgres", "dsn": PG_DSN, "schema": schema}


@pytest.fixture
async def store(store_section: dict[str, object], tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = open_store(store_section, tmp_path)
    await s.open()
    yield s
    await s.close()
