"""A fleet split stored but not published (the cloud stopped in between) is published by the next
cloud start: real mTLS, the real NATS (127.0.0.1:4222), each site's grid subject watched as the
edge's CurtailmentBook; SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cloud_testkit import T0, cloud_serve
from evcore.bus.subjects import Subjects
from evcore.cloud import CloudApiServer, open_cloud_store
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentResult, SiteShare
from fleet_testkit import (
    NATS_URL,
    FleetCloud,
    SiteWatch,
    nats_bus,
    site_table,
    start_fleet_cloud,
    topology,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


class InjectedCrash(Exception):
    """Stands for the process dying between the store's commit and the outbox."""


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(tmp_path, store_url)
    try:
        for site, limit in zip(f.sites, (300.0, 250.0, 150.0), strict=True):
            async with f.channel(site) as ch:
                await f.cloud(ch).PutTopology(
                    topology(site_table(site, power_limit_kw=limit, other_load_a=10.0))
                )
        yield f
    finally:
        await f.close()


def request(sites: list[str], max_kw: float, fid: str = "dso-1") -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id=fid, site_ids=sites, max_kw=max_kw, issuer="DSO")
    r.start.FromSeconds(int(T0 + 600))
    r.end.FromSeconds(int(T0 + 7800))
    return r


async def restart(f: FleetCloud) -> None:
    """Stop the cloud (its store and outbox stay on disk) and start a new one on them."""
    await f.server.stop(0.5)
    await f.store.close()
    f.store = open_cloud_store(f.server.config.store_url)
    f.server = CloudApiServer(f.server.config, f.store, clock=f.clock)
    f.port = await f.server.start()


async def test_a_revision_stored_before_a_crash_is_published_by_the_next_start(
    fleet: FleetCloud,
) -> None:
    f = fleet
    a, b, c = f.sites
    async with f.channel("aggregator-1") as ch:
        first = await f.fleet(ch).Curtail(request(f.sites, 400.0))
    await f.wait_signals({s: 1 for s in f.sites})
    assert await f.store.fleet_published_revision("dso-1") == 1

    async def crash(result: FleetCurtailmentResult) -> None:
        raise InjectedCrash(f"revision {result.revision} stored, not published")

    assert f.server.fleet is not None
    f.server.fleet.after_store = crash
    # Revision 2 over a and b only (c is to be cancelled): stored, then the "crash".
    async with f.channel("aggregator-1") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await f.fleet(ch).Curtail(request([a, b], 200.0))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    held = await f.store.fleet_curtailment("dso-1")
    assert held is not None and held.revision == 2
    assert [sh.site_id for sh in held.dropped_shares] == [c]
    assert await f.store.fleet_published_revision("dso-1") == 1
    assert [len(f.watches[s].signals) for s in f.sites] == [1, 1, 1]

    await restart(f)
    await f.wait_signals({s: 2 for s in f.sites})
    shares = {sh.site_id: sh for sh in held.shares}
    for site in (a, b):
        sig = f.watches[site].signals[-1]
        assert sig.signal_id == f"fleet:dso-1:{site}#r2"
        assert [(x.signal_id, x.max_kw) for x in f.watches[site].book] == [
            (f"fleet:dso-1:{site}", shares[site].max_kw)
        ]
    assert sum(sh.max_kw for sh in held.shares) <= 200.0 + 1e-9
    assert shares[a].max_kw != {sh.site_id: sh for sh in first.shares}[a].max_kw
    last_c = f.watches[c].signals[-1]
    assert (last_c.signal_id, last_c.curtailment.cancelled) == (f"fleet:dso-1:{c}#r2", True)
    assert list(f.watches[c].book) == []
    await wait_until(
        lambda: f.server.fleet is not None and f.server.fleet.after_store is None, "new server"
    )
    await f.wait_published("dso-1", 2)
    assert await f.store.fleet_published_revision("dso-1") == 2
    # Recorded as published: the next rounds (every 30 s) send nothing again.
    f.clock.advance(31.0)
    f.clock.advance(31.0)
    await asyncio.sleep(1.0)
    assert [len(f.watches[s].signals) for s in f.sites] == [2, 2, 2]


def _share(site: str, max_kw: float) -> SiteShare:
    return SiteShare(
        site_id=site,
        node_id="grid",
        curtailment_id=f"fleet:crashed:{site}",
        max_kw=max_kw,
        grid_limit_kw=300.0,
    )


async def test_revisions_left_in_the_store_are_published_unless_their_window_ended(
    fleet: FleetCloud,
) -> None:
    """What a cloud killed after the commit leaves: the revision in the store and nothing sent."""
    f = fleet
    a, b, c = f.sites
    await f.server.stop(0.5)
    # Revision 1 of "crashed" over a and b; revision 1 of "ended", whose window has passed.
    crashed = FleetCurtailmentResult(revision=1, feasible=True, allocated_kw=90.0)
    crashed.curtailment.CopyFrom(request([a, b], 90.0, fid="crashed"))
    crashed.shares.extend([_share(a, 50.0), _share(b, 40.0)])
    await f.store.put_fleet_curtailment(crashed, now_s=T0)
    ended = FleetCurtailmentResult(revision=1, feasible=True, allocated_kw=10.0)
    ended.curtailment.CopyFrom(request([c], 10.0, fid="ended"))
    ended.curtailment.start.FromSeconds(int(T0 - 7200))
    ended.curtailment.end.FromSeconds(int(T0 - 600))
    ended.shares.append(SiteShare(site_id=c, node_id="grid", curtailment_id="fleet:ended:x"))
    await f.store.put_fleet_curtailment(ended, now_s=T0)
    pending = await f.store.unpublished_fleet_curtailments(now_s=T0)
    assert [r.curtailment.fleet_curtailment_id for r in pending] == ["crashed"]

    await restart(f)
    await f.wait_signals({a: 1, b: 1})
    for site, kw in ((a, 50.0), (b, 40.0)):
        assert [s.signal_id for s in f.watches[site].signals] == [f"fleet:crashed:{site}#r1"]
        assert [(x.signal_id, x.max_kw) for x in f.watches[site].book] == [
            (f"fleet:crashed:{site}", kw)
        ]
    await f.wait_published("crashed", 1)
    assert await f.store.fleet_published_revision("crashed") == 1
    assert await f.store.fleet_published_revision("ended") == 0
    assert f.watches[c].signals == []


async def test_evcore_cloud_serve_publishes_what_a_killed_cloud_left(
    tmp_path: Path, store_url: str
) -> None:
    """The command as a process, on the store a killed cloud left (revision 2 stored, revision 1
    published and marked): its start publishes revision 2, once, to the site's grid subject."""
    site = f"killed-{uuid.uuid4().hex[:8]}"
    now = time.time()
    store = open_cloud_store(store_url, tmp_path)
    for rev, kw in ((1, 70.0), (2, 55.0)):
        r = FleetCurtailmentResult(revision=rev, feasible=True, allocated_kw=kw)
        r.curtailment.CopyFrom(request([site], kw, fid="killed"))
        r.curtailment.start.FromSeconds(int(now - 60))
        r.curtailment.end.FromSeconds(int(now + 3600))
        r.shares.append(
            SiteShare(
                site_id=site, node_id="grid", curtailment_id=f"fleet:killed:{site}", max_kw=kw
            )
        )
        await store.put_fleet_curtailment(r, now_s=now)
    assert await store.mark_fleet_published("killed", 1)
    await store.close()

    watch = SiteWatch(site)
    bus = nats_bus(site, tmp_path / "watch-outbox")
    await bus.start()
    assert bus.connected, f"nats-server at {NATS_URL} unreachable"
    await bus.subscribe(Subjects(site).grid, watch.on_grid)
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\ninsecure = true\nstop_grace_s = 1.0\n'
        f"[store]\nurl = {json.dumps(store_url)}\n"
        f'[bus]\nurls = ["{NATS_URL}"]\noutbox_dir = "outbox"\n'
        '[fleet]\nresplit_every_s = 0\n[[fleet.operators]]\ncommon_name = "ops"\n'
        'roles = ["viewer"]\n'
    )
    try:
        async with cloud_serve(config) as proc:
            await wait_until(lambda: len(watch.signals) >= 1, "revision 2 from the new process", 30)
            await asyncio.sleep(1.0)
            assert [(s.signal_id, s.curtailment.max_kw) for s in watch.signals] == [
                (f"fleet:killed:{site}#r2", 55.0)
            ]
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0
    finally:
        await bus.delete_streams()
        await bus.close()
    reopened = open_cloud_store(store_url, tmp_path)
    try:
        assert await reopened.fleet_published_revision("killed") == 2
    finally:
        await reopened.close()
