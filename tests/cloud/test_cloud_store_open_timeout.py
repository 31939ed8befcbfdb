"""The cloud store's open (connecting, applying migrations) is bounded by ``[store]
open_timeout_s``, as the edge store's is (tests/store/test_store_open_timeout.py): another process
holding the migrations' lock on a real PostgreSQL ends the open with StoreUnavailable naming the
key within about that bound, and the store opens once the lock is gone.

Before: the cloud passed no bound to its backends; the same held lock kept ``open()``, and with it
``evcore cloud``'s start, waiting for as long as the lock was held.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from cloud_testkit import pg_url
from evcore.cloud import CloudConfig, CloudConfigError
from evcore.cloud.store import open_cloud_store
from evcore.store.base import StoreUnavailable
from pg_testkit import PG_DSN

pytestmark = pytest.mark.timeout(60)


def test_open_timeout_s_is_a_store_key_of_the_cloud_config() -> None:
    base = {"insecure": True}
    assert (
        CloudConfig.from_table({**base, "store": {"url": "sqlite:x"}}).store_open_timeout_s == 120
    )
    cfg = CloudConfig.from_table({**base, "store": {"url": "sqlite:x", "open_timeout_s": 0.5}})
    assert cfg.store_open_timeout_s == 0.5
    for bad in (0, -1, "1"):
        with pytest.raises(CloudConfigError, match="open_timeout_s"):
            CloudConfig.from_table({**base, "store": {"url": "sqlite:x", "open_timeout_s": bad}})


async def test_a_migration_lock_held_elsewhere_ends_the_cloud_stores_open(
    pg_schema: str, tmp_path: Path
) -> None:
    url = pg_url(pg_schema)
    # Another process stuck mid-migration: it holds the migrations' advisory lock.
    with psycopg.connect(PG_DSN, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"evcore.store:{pg_schema}",))
        store = open_cloud_store(url, tmp_path, open_timeout_s=0.5)
        t0 = time.monotonic()
        try:
            with pytest.raises(StoreUnavailable) as err:
                await asyncio.wait_for(store.open(), 8)
            took = time.monotonic() - t0
        finally:
            other.execute("SELECT pg_advisory_unlock_all()")
            await store.close()
    assert took < 4.0, (took, err.value)
    assert "open_timeout_s = 0.5" in str(err.value), err.value
    # Once the lock is gone, the store opens.
    store = open_cloud_store(url, tmp_path, open_timeout_s=0.5)
    try:
        await store.open()
    finally:
        await store.close()
