"""Fixtures of the cloud suite: the cloud service on a real socket with real mTLS (certificates
generated per test), over the cloud store on SQLite and on the real PostgreSQL (a fresh schema per
test, dropped after; ``pg_schema`` comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cloud_testkit import Cloud, pg_url, start_cloud


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'cloud-store'}"
    return pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
async def cloud(tmp_path: Path, store_url: str) -> AsyncIterator[Cloud]:
    c = await start_cloud(tmp_path, store_url)
    try:
        yield c
    finally:
        await c.server.stop(0.5)
        await c.store.close()
