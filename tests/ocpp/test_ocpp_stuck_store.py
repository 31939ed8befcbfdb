"""A handler waiting on a stuck store does not hold back the answers to our calls: PostgreSQL
with the status table locked by another session (as a long migration or a hung transaction
would), a station's StatusNotification waits for its write; the station's answer to our
SetChargingProfile, sent meanwhile, still resolves the limit at once. Before, the receive loop
handled one frame at a time, so the answer sat unread behind the waiting handler until the call
timed out. Real PostgreSQL, real OCPP over real WebSockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from evcore.clock import WallClock
from evcore.ocpp import CentralSystem
from evcore.ocpp.events import StatusEvent
from evcore.ocpp.server import LimitOrder
from evcore.ocpp.v16 import iso
from evcore.sim.ev import EV
from evcore.store import open_store
from evcore.v1.status_pb2 import ConnectorState
from ocpp_testsite import PASSWORDS, make_site, rig
from psycopg import sql
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(60)
CHARGING = ConnectorState.CONNECTOR_STATE_CHARGING
PG_DSN = os.environ.get("EVCORE_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


async def test_an_answer_to_our_call_is_read_while_a_handler_waits_on_the_store(
    pg_schema: str, tmp_path: Path
) -> None:
    async with _store_and_locker(pg_schema, tmp_path) as (store, locker):
        async with rig(store=store, call_timeout_s=4.0) as r:
            sim = r.fleet.stations["CPA"]
            # Another session holds the status table: status writes wait for it.
            await _lock_status_table(locker, pg_schema)
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


async def test_frames_read_before_an_abnormal_close_are_still_handled(
    pg_schema: str, tmp_path: Path
) -> None:
    """Review of this change: the station's link drops (no close frame) while its first
    StatusNotification waits on the locked table and two more are read behind it. The reader
    ends with ConnectionClosedError; before the fix that cancelled the waiting handler and
    dropped the two read after it. Handled inline, as before the handler task, every frame read
    counts: once the lock goes, the last of the three is the charger's status."""
    async with _store_and_locker(pg_schema, tmp_path) as (store, locker):
        cs = CentralSystem(make_site(configure_on_boot=False), clock=WallClock(), store=store)
        await cs.start()
        try:
            await _lock_status_table(locker, pg_schema)
            await _statuses_then_the_link_drops(cs)
            await locker.rollback()
            for _ in range(100):
                latest = await store.latest_statuses()
                if latest.get("cp-a") is not None and latest["cp-a"].state == CHARGING:
                    break
                await asyncio.sleep(0.05)
            assert latest["cp-a"].state == CHARGING, latest.get("cp-a")
        finally:
            await cs.stop()


async def _statuses_then_the_link_drops(cs: CentralSystem) -> None:
    """CPA sends three StatusNotifications (the last: Charging) without waiting for answers;
    then its link drops without a close frame, and the central system reports it gone."""
    token = base64.b64encode(f"CPA:{PASSWORDS['CPA']}".encode()).decode()
    ws = await connect(
        f"ws://127.0.0.1:{cs.port}/ocpp/CPA",
        subprotocols=[Subprotocol("ocpp1.6")],
        additional_headers={"Authorization": "Basic " + token},
    )
    t0 = cs.clock.now()
    for i, status in enumerate(["Available", "Preparing", "Charging"]):
        payload = {
            "connectorId": 1,
            "errorCode": "NoError",
            "status": status,
            "timestamp": iso(t0 + i),
        }
        await ws.send(json.dumps([2, f"s{i}", "StatusNotification", payload]))
    await asyncio.sleep(0.5)  # all three read; the first waits on the lock
    ws.transport.abort()  # the link drops: no close frame
    for _ in range(100):
        if not cs.is_connected("cp-a"):
            break
        await asyncio.sleep(0.05)
    assert not cs.is_connected("cp-a")


@contextlib.asynccontextmanager
async def _store_and_locker(
    pg_schema: str, tmp_path: Path
) -> AsyncIterator[tuple[Any, psycopg.AsyncConnection[Any]]]:
    """The PostgreSQL store in ``pg_schema``, opened, and a second session to lock its tables."""
    store = open_store({"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}, tmp_path)
    await store.open()
    locker = await psycopg.AsyncConnection.connect(PG_DSN)
    try:
        yield store, locker
    finally:
        await locker.close()
        await store.close()


async def _lock_status_table(locker: psycopg.AsyncConnection[Any], pg_schema: str) -> None:
    """Hold the status table (until ``locker`` rolls back): status writes wait for it."""
    await locker.execute(
        sql.SQL("LOCK TABLE {}.status_history IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(pg_schema)
        )
    )
