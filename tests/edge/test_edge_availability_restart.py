"""A charger an operator made unavailable stays so across an edge restart.

``SetChargerAvailability(false)`` (a damaged cable: hold the charger at 0 A) was answered OK and
kept only in the controller's memory: the store kept nothing of it, so a restart (an upgrade, a
crash) gave the charger back at once, with nothing in the log. Real ``EdgeApp`` on a SQLite store
(the same store for both runs), its API on a real gRPC socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from evcore.store import open_store
from evcore.v1 import edge_api_pb2 as pb
from evcore.v1 import edge_api_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

OPERATOR = "operator-token-0123456789"
MD = (("authorization", f"Bearer {OPERATOR}"),)


def _table() -> dict[str, Any]:
    table: dict[str, Any] = depot_table(3, per_feeder=3, site_id="avail")
    table["edge"] = {"tick_s": 0.5, "settle_s": 2.0, "min_on_s": 0.0, "min_off_s": 0.0}
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [{"name": "alice", "token": OPERATOR, "roles": ["operator"]}],
    }
    return table


async def _run(tmp_path: Path, steps: Any) -> EdgeApp:
    """One run of the edge on the store in ``tmp_path``: ``steps(app, stub)`` once it is up."""
    table = _table()
    store = open_store({"path": str(tmp_path / "store")}, tmp_path)
    app = EdgeApp(load_site(table), table, clock=WallClock(), store=store)
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
            await steps(app, pb_grpc.EdgeApiStub(channel))
    finally:
        app.stop()
        await asyncio.wait_for(runner, 30)
    return app


async def test_an_unavailable_charger_stays_unavailable_after_a_restart(tmp_path: Path) -> None:
    ids = [c["id"] for c in _table()["chargers"]]
    a, b = ids[0], ids[1]

    async def first(app: EdgeApp, stub: pb_grpc.EdgeApiStub) -> None:
        for cid in (a, b):
            await stub.SetChargerAvailability(
                pb.SetChargerAvailabilityRequest(charger_id=cid, available=False, reason="cable"),
                metadata=MD,
            )
        # B is given back: only A stays held.
        await stub.SetChargerAvailability(
            pb.SetChargerAvailabilityRequest(charger_id=b, available=True), metadata=MD
        )

    await _run(tmp_path, first)
    seen: dict[str, bool] = {}

    async def second(app: EdgeApp, stub: pb_grpc.EdgeApiStub) -> None:
        state = await stub.GetSiteState(pb.GetSiteStateRequest(), metadata=MD)
        seen.update({c.charger_id: c.available for c in state.chargers})

    await _run(tmp_path, second)
    assert seen == {cid: cid != a for cid in ids}, seen
