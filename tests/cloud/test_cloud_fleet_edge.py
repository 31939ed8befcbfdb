"""End to end: a fleet curtailment split in the cloud reaches a real edge controller over the real
NATS (127.0.0.1:4222), and the site's power stays within its share while it is in force.

The edge is the closed-loop rig of the edge tests (OCPP central system on a loopback WebSocket,
simulated stations and cars, site physics); its grid subject is wired to the controller with
``subscribe_signals`` and the durable ``edge-grid`` as ``evcore edge`` does, and the cloud sees it
take its share (the acknowledgement break before make waits for)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from edge_testkit import FAST
from evcore.checker import node_power_kw
from evcore.cloud.fleet import EDGE_GRID_DURABLE
from evcore.cloud.topology import topology_from_site
from evcore.edge.config import EdgeConfig
from evcore.edge.rig import EdgeRig
from evcore.edge.signals import GRID_DURABLE, subscribe_signals
from evcore.edge.sitegen import depot_table
from evcore.sim.ev import EV
from evcore.v1.fleet_api_pb2 import FleetCurtailment
from fleet_testkit import nats_bus, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)


async def test_an_edge_holds_its_share_of_a_fleet_curtailment(tmp_path: Path) -> None:
    f = await start_fleet_cloud(tmp_path, f"sqlite:{tmp_path / 'store'}", now_s=time.time())
    a, b, c = f.sites
    # Site a is a real edge: 6 chargers, its grid at 60 % of their maximum (79.5 kW).
    table = depot_table(6, per_feeder=6, grid_share=0.6, feeder_share=0.7, site_id=a)
    rig = EdgeRig(table, cfg=EdgeConfig(**FAST), apply_delay_s=0.5)
    edge_bus = nats_bus(a, tmp_path / "edge-outbox")
    power: list[tuple[float, float]] = []
    try:
        async with f.channel(a) as ch:
            await f.cloud(ch).PutTopology(topology_from_site(rig.site))
        for site in (b, c):
            async with f.channel(site) as ch:
                table_x = site_table(site, power_limit_kw=100.0, other_load_a=0.0)
                await f.cloud(ch).PutTopology(topology(table_x))
        async with rig:
            ctrl = rig.controller
            assert ctrl is not None
            await edge_bus.start()
            assert EDGE_GRID_DURABLE == GRID_DURABLE
            # The real edge is site a's only reader of edge-grid (two readers of one durable
            # share its messages): the testkit's stand-in for a goes.
            await f.edge_offline(a)
            subs = await subscribe_signals(edge_bus, ctrl, grid_durable=GRID_DURABLE)
            await rig.wait_for(rig.failsafe_applied, 15, "TxDefault at the failsafe level")
            for cid in rig.fleet.charger_ids:
                rig.fleet.plug_in(cid, EV(soc=0.2))

            def site_kw() -> float:
                return float(np.asarray(node_power_kw(rig.site, rig.fleet.terminal_currents()))[0])

            await asyncio.sleep(3.0)
            await rig.wait_for(lambda: site_kw() > 50.0, 15, "sessions charging above 50 kW")

            async def sample() -> None:
                while True:
                    power.append((rig.clock.now(), site_kw()))
                    await asyncio.sleep(0.1)

            sampler = asyncio.create_task(sample())
            now = time.time()
            f.clock.advance(now - f.clock.now())
            t1, t2 = now + 6.0, now + 14.0
            req = FleetCurtailment(
                fleet_curtailment_id="e2e", site_ids=[a, b, c], max_kw=100.0, issuer="DSO"
            )
            req.start.FromNanoseconds(int(t1 * 1e9))
            req.end.FromNanoseconds(int(t2 * 1e9))
            async with f.channel("aggregator-1") as ch:
                res = await f.fleet(ch).Curtail(req)
            share = {s.site_id: s.max_kw for s in res.shares}
            # No telemetry: installed demand, a 79.5 : 100 : 100 split of 100 kW.
            assert 20.0 < share[a] < 35.0, share
            assert sum(share.values()) <= 100.0 + 1e-9
            await rig.wait_for(lambda: len(ctrl.curtailments) == 1, 10, "the share at the edge")
            held = next(iter(ctrl.curtailments))
            assert (held.signal_id, held.node_id) == (f"fleet:e2e:{a}", "grid")
            assert held.max_kw == share[a]
            # The cloud sees the real edge take it (its durable acknowledged the message).
            deadline = time.monotonic() + 10.0
            while True:
                listed = await f.coordinator.site_statuses([a])
                entry = listed.sites[0].fleet_shares[0]
                if entry.taken:
                    break
                assert time.monotonic() < deadline, entry
                await asyncio.sleep(0.1)
            assert (entry.site_revision, entry.site_max_kw) == (1, share[a])
            await asyncio.sleep(t2 - time.time() + 0.5)
            sampler.cancel()
            for s in subs:
                await s.stop()
            during = [kw for t, kw in power if t1 <= t < t2]
            before = [kw for t, kw in power if t < t1 - FAST["curtail_lead_s"]]
            assert before and max(before) > share[a] + 15.0  # it was drawing more
            assert len(during) > 40 and max(during) <= share[a] + 1e-6, max(during)
            assert rig.physics.violations == 0
    finally:
        await edge_bus.close()
        await f.close()
