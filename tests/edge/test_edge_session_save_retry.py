"""A session saved while the store is failing is saved once it is back.

``SessionKeeper`` logged a failed save and dropped the record: a session that ended while the
store was away (a PostgreSQL failover, a write lock held by a backup job) stayed open in the
store with the energy saved before, for good, and a restart then took it back as the charger's
session.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from edge_testkit import session_meter, session_tx
from evcore.clock import StepClock
from evcore.edge.app import build_controller
from evcore.edge.coreio import RustCore
from evcore.edge.recording import SessionKeeper
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "audit"))
from test_audit_ordering import WriteLock

pytestmark = pytest.mark.timeout(60)


async def test_a_session_that_ends_while_the_store_is_locked_is_saved_once_it_is_back(
    tmp_path: Path,
) -> None:
    section: dict[str, object] = {
        "kind": "embedded",
        "path": str(tmp_path / "store"),
        "write_timeout_s": 0.3,
    }
    store = open_store(section, tmp_path)
    await store.open()
    lock = WriteLock(section)
    try:
        table = depot_table(2, per_feeder=2)
        clock = StepClock()
        gateway: object = None  # nothing is sent in this test
        ctrl = build_controller(
            table,
            core=RustCore(load_site(table), table),
            gateway=gateway,  # type: ignore[arg-type]
            clock=clock,
        )
        keeper = SessionKeeper(store, clock, retry_s=0.1)
        ctrl.on_session = keeper
        cid = "cp-0001"
        ctrl.on_event(session_tx(cid, "T1", "started", clock.now(), 0.0))
        await keeper.drain()
        clock.advance(1800)
        ctrl.on_event(session_meter(cid, clock.now(), 5_000.0))
        lock.take()  # the store cannot be written
        ctrl.on_event(session_tx(cid, "T1", "ended", clock.now(), 6_500.0))
        await asyncio.sleep(1.0)  # the save fails (write_timeout_s)
        assert keeper.failures >= 1
        lock.release()
        await asyncio.wait_for(keeper.drain(), 10)
        got = await store.get_session(f"{cid}:T1")
        assert got is not None
        assert got.ended_at_s is not None, got  # before: still open
        assert got.energy_delivered_kwh == 6.5, got  # before: 0.0
        assert await store.list_open_sessions() == []
    finally:
        lock.release()
        await store.close()
