"""Fixtures shared by every room's tests: stores on SQLite and on a real PostgreSQL
(127.0.0.1:5432, user postgres, db test; EVCORE_TEST_PG_DSN overrides), each PostgreSQL test in its
own schema; the JetStream streams a test run creates on the shared NATS server are deleted when
the run ends."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from bus_testkit import streams_to_delete
from evcore.store import SqlStore, open_store
from hypothesis import settings
from pg_testkit import PG_DSN
from psycopg import sql

# CI runs every property test on a fixed sequence of examples (EVCORE_HYPOTHESIS_PROFILE=ci, set by
# .ci/run) so a run on the same commit gives the same verdict; a local run draws fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("EVCORE_HYPOTHESIS_PROFILE", "default"))

NATS_URL = os.environ.get("EVCORE_TEST_NATS_URL", "nats://127.0.0.1:4222")


async def _stream_names() -> set[str] | None:
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return None
    try:
        return {s.config.name for s in await nc.jetstream().streams_info()}
    except Exception:
        return None
    finally:
        await nc.close()


async def _delete_streams(names: set[str]) -> None:
    import nats

    nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for name in sorted(names):
            try:
                await js.delete_stream(name)
            except Exception:
                pass  # gone already
    finally:
        await nc.close()


# Test runs on this machine that share the NATS server (a helper's room tests beside a CI run):
# each registers its pid here while it runs; see _jetstream_streams_cleaned_up.
RUNS_DIR = Path(os.environ.get("EVCORE_TEST_RUNS_DIR", "/tmp/evcore-test-runs"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _runs_lock() -> Iterator[Path]:
    RUNS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUNS_DIR / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield RUNS_DIR
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def _jetstream_streams_cleaned_up() -> Iterator[None]:
    """Every site stream (``EVCORE_*``) this run created on the shared server goes at the end.
    Each stream reserves its byte limit (1 GiB for telemetry) out of the server's JetStream
    storage: streams left by earlier runs once took 63 GB of the server's 60 and every later
    stream creation failed (``ServerError``) until they were deleted. A run cannot tell its
    streams from those of another run going on at the same time (site ids of different tests
    may be the same), so while another run is alive the streams are left in ``pending`` and
    the last run to end deletes them (before, the first to end deleted the other's streams
    under its feet)."""
    before = asyncio.run(_stream_names())
    me = os.getpid()
    with _runs_lock() as d:
        (d / f"run-{me}").write_text(str(me))
    try:
        yield
    finally:
        with _runs_lock() as d:
            (d / f"run-{me}").unlink(missing_ok=True)
            others = [int(f.name[4:]) for f in d.glob("run-*") if f.name[4:].isdigit()]
            others_alive = any(_alive(pid) for pid in others if pid != me)
            for pid in others:
                if not _alive(pid):
                    (d / f"run-{pid}").unlink(missing_ok=True)  # a run that was killed
            pending_file = d / "pending-streams"
            pending = set(pending_file.read_text().split()) if pending_file.exists() else set()
            after = asyncio.run(_stream_names()) if before is not None else None
            created = set()
            if before is not None and after is not None:
                created = {n for n in after - before if n.startswith("EVCORE_")}
            if after is not None:
                pending &= after  # gone already
            delete, keep = streams_to_delete(created, pending, others_alive)
            if delete:
                asyncio.run(_delete_streams(delete))
            pending_file.write_text("\n".join(sorted(keep)))


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
