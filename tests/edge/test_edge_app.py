"""`EdgeApp` (what `evcore edge` runs) with its gRPC API, store and audit trail, over real sockets:
a grid operator's curtailment through the API reaches the chargers; a viewer may not post one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.rig import EdgeRig
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.v1 import edge_api_pb2, edge_api_pb2_grpc, grid_pb2
from google.protobuf.timestamp_pb2 import Timestamp

pytestmark = pytest.mark.timeout(90)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


async def test_curtailment_posted_through_the_api_reaches_the_chargers(tmp_path: Path) -> None:
    from evcore.site import load_site
    from evcore.store import open_store

    table = depot_table(6, per_feeder=6, grid_share=0.8)
    table["edge"] = {"tick_s": 0.5, "curtail_lead_s": 1.0, "min_on_s": 0.0, "min_off_s": 0.0}
    table["api"] = {
        "listen": "127.0.0.1:0",
        "tokens": [
            {"name": "dso", "token": "dso-token-0123456789", "roles": ["grid_operator"]},
            {"name": "noc", "token": "noc-token-0123456789", "roles": ["viewer"]},
        ],
    }
    clock = WallClock()
    store = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    app = EdgeApp(load_site(table), table, clock=clock, store=store)
    runner = asyncio.create_task(app.run())
    await asyncio.wait_for(app.ready.wait(), 20)
    prefix = app.central.config.path_prefix
    rig = EdgeRig(table, with_edge=False, url=f"ws://127.0.0.1:{app.central.port}{prefix}")
    try:
        await rig.start()
        await rig.wait_for(rig.defaults_held, 15, "a TxDefaultProfile on every station")
        # The first TxDefaults are low (each charger counts at its maximum until its own is
        # known applied): cars plugged in then start on them, and their TxDefaults rise only
        # once their TxProfiles are accepted. Plug in at the final levels, which the curtailment
        # below then lowers.
        ctrl = app.controller
        await rig.wait_for(
            lambda: (
                ctrl.failsafe_is_plain()
                and all(
                    c.tx_default == ctrl.failsafe[cid] for cid, c in ctrl.state.chargers.items()
                )
            ),
            30,
            "the final failsafe levels",
        )
        for cid in rig.fleet.charger_ids:
            rig.fleet.plug_in(cid, EV(soc=0.2))
        await asyncio.sleep(3.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.api_port}") as channel:
            stub = edge_api_pb2_grpc.EdgeApiStub(channel)
            now = clock.now()
            signal = grid_pb2.GridSignal(signal_id="dso-7")
            signal.curtailment.curtailment_id = "dso-7"
            signal.curtailment.node_id = "grid"
            signal.curtailment.max_kw = 10.0
            signal.curtailment.start.CopyFrom(_ts(now + 2.0))
            signal.curtailment.end.CopyFrom(_ts(now + 60.0))
            request = edge_api_pb2.PostGridSignalRequest(signal=signal)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.PostGridSignal(
                    request, metadata=(("authorization", "Bearer noc-token-0123456789"),)
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert len(app.controller.curtailments) == 0  # a denied call changed nothing
            await stub.PostGridSignal(
                request, metadata=(("authorization", "Bearer dso-token-0123456789"),)
            )
            assert app.controller.curtailments.caps_kw(now + 2.0) == {"grid": 10.0}
            await asyncio.sleep(4.0)
            # 10 kW is 14.5 A per phase over the site: at most two chargers at 6 A.
            drawn = rig.fleet.terminal_currents()
            assert drawn.sum(axis=0).max() <= 10_000.0 / 690.0 + 1e-6
            state = await stub.GetSiteState(
                edge_api_pb2.GetSiteStateRequest(),
                metadata=(("authorization", "Bearer noc-token-0123456789"),),
            )
            assert state is not None
        assert rig.physics.violations == 0
    finally:
        await rig.stop()
        app.stop()
        await asyncio.wait_for(runner, 20)
    # The decisions were recorded durably, curtailment included.
    store2 = open_store({"kind": "embedded", "path": str(tmp_path / "store")}, tmp_path)
    await store2.open()
    records = await store2.audit_records()
    assert any(r.trigger and "grid" in r.trigger for r in records)
    await store2.close()
