"""A handler waiting on a stuck store does not hold back the answers to our calls: PostgreSQL
with the status table locked by another session (as a long migration or a hung transaction
would), a station's StatusNotification waits for its write; the station's answer to our
SetChargingProfile, sent meanwhile, still resolves the limit at once. Before, the receive loop
handled one frame at a time, so the answer sat unread behind the waiting handler until the call
timed out. Real PostgreSQL, real OCPP over real WebSockets."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psycopg
import pytest
from evcore.ocpp.events import StatusEvent
from evcore.ocpp.server import LimitOrder
from evcore.sim.ev import EV
from evcore.store import open_store
from ocpp_testsite import rig
from psycopg import sql

pytestmark = pytest.mark.timeout(60)
PG_DSN = os.environ.get("EVCORE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


async def test_an_answer_to_our_call_is_read_while_a_handler_waits_on_the_store(
    pg_schema: str, tmp_path: Path
) -> None:
    store = open_store({"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}, tmp_path)
    await store.open()
    locker = await psycopg.AsyncConnection.connect(PG_DSN)
    try:
        async with rig(store=store, call_timeout_s=4.0) as r:
            sim = r.fleet.stations["CPA"]
            # Another session holds the status table: status writes wait for it.
            await locker.execute(
                sql.SQL("LOCK TABLE {}.status_history IN ACCESS EXCLUSIVE MODE").format(
                    sql.Identifier(pg_schema)
                )
            )
            n_status = len([e for e in r.events if isinstance(e, StatusEvent)])
            r.fleet.plug_in("cp-a", EV(soc=0.5))
            await r.until(
                lambda: len([e for e in r.events if isinstance(e, StatusEvent)]) > n_status
            )
            await asyncio.sleep(0.2)  # its handler is waiting on the locked table now
            t0 = r.cs.clock.monotonic()
            h = r.cs.send_limits([LimitOrder("cp-a", limit_a=12.0, purpose="tx_default")])[0]
            res = await asyncio.wait_for(h.result, 6)
            waited = r.cs.clock.monotonic() - t0
            assert res.status == "Accepted", res
            assert waited < 2.0, waited  # answered, not the 4 s timeout
            assert any(a == "SetChargingProfile" for a, _ in sim.received)
            # The lock goes: the status the handler held is written and answered.
            await locker.rollback()
            await sim.wait_idle()
            assert "cp-a" in await store.latest_statuses()
    finally:
        await locker.close()
        await store.close()
