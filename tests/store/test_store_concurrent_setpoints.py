"""Concurrent writers of the last setpoints on one PostgreSQL schema (two edges' worth of
connections: the edge's decision writer and the API or a second process), on a real PostgreSQL.

Before: ``add_setpoints`` sent its multi-row upsert in the order the caller gave, and
``confirm_setpoints`` updated row by row in the caller's order, so two transactions naming the same
chargers in different orders locked their rows in opposite orders: PostgreSQL found a deadlock
(40P01) and one of them failed with StoreUnavailable, to be retried. Both now take their rows in
charger id order.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from evcore.store import SqlStore, StoreUnavailable, open_store
from evcore.v1.setpoint_pb2 import Setpoint
from pg_testkit import PG_DSN

CHARGERS = [f"C{i:03d}" for i in range(300)]


def _setpoints(order: list[str], decision: str) -> list[tuple[Setpoint, float]]:
    return [(Setpoint(charger_id=c, decision_id=decision, setpoint_a=16.0), 1.0) for c in order]


async def test_concurrent_setpoint_writers_in_any_order_do_not_deadlock(
    pg_schema: str, tmp_path: Path
) -> None:
    section = {"kind": "postgres", "dsn": PG_DSN, "schema": pg_schema}
    stores: list[SqlStore] = [open_store(section, tmp_path) for _ in range(2)]
    try:
        for s in stores:
            await s.open()
        rng = random.Random(7)
        failures: list[str] = []

        async def writer(store: SqlStore, w: int) -> None:
            for round_ in range(6):
                order = CHARGERS[:]
                rng.shuffle(order)
                decision = f"D{w}-{round_}"
                try:
                    await store.add_setpoints(_setpoints(order, decision))
                    rng.shuffle(order)
                    await store.confirm_setpoints([(c, decision, 2.0) for c in order])
                except StoreUnavailable as exc:
                    failures.append(str(exc))

        await asyncio.wait_for(asyncio.gather(*(writer(s, w) for w, s in enumerate(stores))), 60)
        assert failures == []
        last = await stores[0].last_setpoints()
        assert sorted(last) == CHARGERS
    finally:
        for s in stores:
            await s.close()
