"""Cancelling a cancelled fleet curtailment again (the operator's retry for a site that missed its
cancel) tries every site, names every site whose bus failed, and can be repeated until each took
it. Real mTLS, the real NATS, SQLite and PostgreSQL stores.

Before: the cancels went out site by site and the first site whose bus failed ended the call, so
the sites after it never got the cancel (here site c: 0 cancels accepted by its outbox), and only
that first site was named.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cloud_testkit import T0
from evcore.bus.subjects import escape_token
from evcore.clock import WallClock
from evcore.cloud import CloudApiServer, open_cloud_store
from evcore.cloud.sitebuses import SiteBuses
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentRef
from fleet_testkit import FleetCloud, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)

FID = "f-cancel"


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    f = await start_fleet_cloud(
        tmp_path, store_url, n_sites=3, fleet={"resplit_every_s": 0, "republish_every_s": 0}
    )
    try:
        for site in f.sites:
            async with f.channel(site) as ch:
                table = site_table(site, power_limit_kw=300.0, other_load_a=0.0)
                await f.cloud(ch).PutTopology(topology(table))
        yield f
    finally:
        await f.close()


def _outbox(tmp_path: Path, site: str) -> Path:
    return tmp_path / "cloud-outbox" / f"{escape_token(site)}.sqlite"


def _break(outbox: Path) -> None:
    """A directory where the outbox file goes: SQLite cannot open it."""
    for suffix in ("", "-wal", "-shm"):
        held = Path(f"{outbox}{suffix}")
        if held.exists():
            held.rename(Path(f"{outbox}{suffix}.aside"))
    outbox.mkdir(parents=True)


async def _published(buses: SiteBuses, site: str) -> int:
    """Signals the cloud's outbox of ``site`` accepted since this cloud started."""
    return (await buses.get(site)).stats.published


async def test_cancelling_again_tries_every_site_and_names_each_that_failed(
    fleet: FleetCloud, tmp_path: Path, store_url: str
) -> None:
    f = fleet
    a, b, c = f.sites
    ref = FleetCurtailmentRef(fleet_curtailment_id=FID)
    req = FleetCurtailment(fleet_curtailment_id=FID, site_ids=[a, b, c], max_kw=300.0)
    req.start.FromSeconds(int(T0))
    req.end.FromSeconds(int(T0 + 3600))
    async with f.channel("aggregator-1") as ch:
        await f.fleet(ch).Curtail(req)
        await f.wait_signals({a: 1, b: 1, c: 1})
        assert (await f.fleet(ch).Cancel(ref)).cancelled
    await f.wait_signals({a: 2, b: 2, c: 2})
    await f.wait_published(FID, 2)

    # The cloud restarts with a's and c's outboxes unusable (a disk gone); sites in order a, b, c.
    await f.server.stop(0.5)
    await f.store.close()
    _break(_outbox(tmp_path, a))
    _break(_outbox(tmp_path, c))
    config = f.server.config
    assert config.bus is not None
    buses = SiteBuses(config.bus, WallClock())
    f.store = open_cloud_store(store_url, tmp_path)
    f.server = CloudApiServer(config, f.store, clock=f.clock, site_buses=buses)
    f.port = await f.server.start()
    try:
        async with f.channel("aggregator-1") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await f.fleet(ch).Cancel(ref)
            details = err.value.details() or ""
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
            # Both failed sites named, and b, between them, took its cancel.
            assert f"bus of site {a!r} unavailable" in details, details
            assert f"bus of site {c!r} unavailable" in details, details
            assert "Cancel again" in details, details
            assert await _published(buses, b) == 1

            # Retryable: once a's outbox is back, a takes it; c still fails, b gets it again.
            _outbox(tmp_path, a).rmdir()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await f.fleet(ch).Cancel(ref)
            details = err.value.details() or ""
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, details
            assert f"site {a!r}" not in details and f"bus of site {c!r}" in details, details
            assert (await _published(buses, a), await _published(buses, b)) == (1, 2)

            _outbox(tmp_path, c).rmdir()
            assert (await f.fleet(ch).Cancel(ref)).cancelled
            assert [await _published(buses, s) for s in (a, b, c)] == [2, 3, 1]
        held = await f.store.fleet_curtailment(FID)
        assert held is not None and held.revision == 2 and held.cancelled  # no new revision
    finally:
        await f.server.stop(0.5)
        await buses.close()
