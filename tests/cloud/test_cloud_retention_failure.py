"""A purge that fails with an error the store does not take for an outage (here a trigger refusing
the delete, as a DBA's legal hold or a role without DELETE would) is logged and tried again at the
next round, and the server still stops cleanly. Real SQLite and PostgreSQL, real mTLS server.

Before: the retention task caught only store outages (``StoreError``, ``OSError``); any other error
ended it for good, silently (retention never ran again: the 40-day-old telemetry stayed after the
trigger was gone and a round passed), and ``CloudApiServer.stop`` re-raised that error when it
awaited the dead task, before stopping the gRPC server and its buses (``evcore cloud serve``
ended a SIGTERM in a traceback).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from cloud_testkit import T0, make_certs
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, open_cloud_store
from evcore.cloud.store import TELEMETRY_FILE
from evcore.v1.meter_pb2 import MeterSample, MeterSampleBatch
from pg_testkit import PG_DSN
from psycopg import sql

pytestmark = pytest.mark.timeout(60)

OLD_S = T0 - 40 * 86400.0


def _batches(n: int) -> list[MeterSampleBatch]:
    out = []
    for i in range(n):
        s = MeterSample(charger_id=f"C{i}", power_w=1000.0 + i)
        s.sampled_at.FromSeconds(int(OLD_S) + i)
        out.append(MeterSampleBatch(samples=[s]))
    return out


def _hold_deletes(store_url: str, held: bool) -> None:
    """A trigger that refuses every delete of telemetry (``held``), or none."""
    if store_url.startswith("sqlite:"):
        path = Path(store_url.removeprefix("sqlite:")) / TELEMETRY_FILE
        with sqlite3.connect(path) as conn:
            if held:
                conn.execute(
                    "CREATE TRIGGER legal_hold BEFORE DELETE ON cloud_telemetry_batches"
                    " BEGIN SELECT RAISE(ABORT, 'legal hold: telemetry may not be deleted'); END"
                )
            else:
                conn.execute("DROP TRIGGER legal_hold")
        return
    schema = parse_qs(urlsplit(store_url).query)["schema"][0]
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        if held:
            conn.execute(
                "CREATE FUNCTION legal_hold() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'legal hold: telemetry may not be deleted'; END $$"
            )
            conn.execute(
                "CREATE TRIGGER legal_hold BEFORE DELETE ON cloud_telemetry_batches"
                " FOR EACH ROW EXECUTE FUNCTION legal_hold()"
            )
        else:
            conn.execute("DROP TRIGGER legal_hold ON cloud_telemetry_batches")


async def test_a_purge_that_fails_is_retried_next_round_and_the_server_still_stops(
    tmp_path: Path, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    tls, _, _ = make_certs(tmp_path)
    config = CloudConfig.from_table(
        {
            "listen": "127.0.0.1:0",
            "tls": tls,
            "store": {"url": store_url},
            "retention": {"telemetry_days": 30, "plans_keep": 0, "every_s": 600},
        },
        tmp_path,
    )
    store = open_cloud_store(config.store_url, tmp_path)
    await store.put_telemetry("depot-1", _batches(3), now_s=OLD_S)
    _hold_deletes(config.store_url, True)
    clock = ManualClock(T0)
    server = CloudApiServer(config, store, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="evcore.cloud"):
            await server.start()
            for _ in range(100):  # the purge at start fails on the trigger
                if any("retention purge failed" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
        assert any(
            "retention purge failed" in r.getMessage() and "legal hold" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        assert len(await store.telemetry_batches("depot-1")) == 3

        _hold_deletes(config.store_url, False)
        clock.advance(601.0)  # the next round
        for _ in range(100):
            if not await store.telemetry_batches("depot-1"):
                break
            await asyncio.sleep(0.05)
        assert await store.telemetry_batches("depot-1") == []
    finally:
        await asyncio.wait_for(server.stop(0.5), 10)  # raised the trigger's error before
        await store.close()
