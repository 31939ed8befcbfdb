"""A site's bus that cannot take the fleet's signals (its outbox file cannot be opened) is an
outage of that bus: FleetApi answers UNAVAILABLE naming the site and the outbox, says that the
revision is stored, the other sites' signals go out, and the site's go out once its bus takes
them; ListSites still answers. Real mTLS, the real NATS, SQLite and PostgreSQL stores.

Before: INTERNAL "Curtail failed: OperationalError('unable to open database file')" (logged as a
bug; nothing said the revision was stored), and once a site had a signal its edge had not taken,
ListSites, Curtail and Resplit failed as a whole (INTERNAL) because asking that site's bus what
its edge took raised instead of answering "not known".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cloud_testkit import T0
from evcore.bus.subjects import escape_token
from evcore.cloud import CloudApiServer, open_cloud_store
from evcore.v1.fleet_api_pb2 import FleetCurtailment, FleetCurtailmentRef, ListSitesRequest
from fleet_testkit import FleetCloud, site_table, start_fleet_cloud, topology

pytestmark = pytest.mark.timeout(120)

CLOUD_LOG = "evcore.cloud"
FID = "f-1"


@pytest.fixture
async def fleet(tmp_path: Path, store_url: str) -> AsyncIterator[FleetCloud]:
    # No background re-splits, and republishing only when the test asks (or at start).
    f = await start_fleet_cloud(
        tmp_path, store_url, n_sites=2, fleet={"resplit_every_s": 0, "republish_every_s": 0}
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
    """The cloud's outbox file of ``site`` (fleet_testkit: ``[bus] outbox_dir``)."""
    return tmp_path / "cloud-outbox" / f"{escape_token(site)}.sqlite"


def _break(outbox: Path) -> None:
    """A directory where the outbox file goes: SQLite cannot open it."""
    for suffix in ("", "-wal", "-shm"):
        held = Path(f"{outbox}{suffix}")
        if held.exists():
            held.rename(Path(f"{outbox}{suffix}.aside"))
    outbox.mkdir(parents=True)


def _request(sites: list[str], kw: float = 200.0) -> FleetCurtailment:
    r = FleetCurtailment(fleet_curtailment_id=FID, site_ids=sites, max_kw=kw, issuer="DSO")
    r.start.FromSeconds(int(T0))
    r.end.FromSeconds(int(T0 + 3600))
    return r


async def _unavailable(call: Any) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    return err.value.details() or ""


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(CLOUD_LOG) and r.exc_info is not None]


async def test_a_site_bus_that_cannot_be_opened_is_unavailable_and_the_revision_stands(
    fleet: FleetCloud, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = fleet
    a, b = f.sites
    outbox = _outbox(tmp_path, b)
    _break(outbox)
    async with f.channel("aggregator-1") as ch:
        with caplog.at_level(logging.WARNING, logger=CLOUD_LOG):
            details = await _unavailable(f.fleet(ch).Curtail(_request([a, b])))
    assert details.startswith(f"Curtail: bus of site {b!r} unavailable: outbox {outbox}"), details
    assert f"revision 1 of {FID!r} is stored" in details, details
    assert any(r.getMessage().startswith("cloud: Curtail: bus of site") for r in caplog.records)
    assert _tracebacks(caplog) == []
    # a's signal went out; b's waits in the store.
    await f.wait_signals({a: 1})
    held = await f.store.fleet_curtailment(FID)
    assert held is not None and held.revision == 1
    assert await f.store.fleet_published_revision(FID) == 0
    assert f.watches[b].signals == []

    # The outbox can be opened again: the next republish round sends b's signal.
    outbox.rmdir()
    await f.coordinator.republish_pending()
    await f.wait_signals({a: 1, b: 1})
    await f.wait_published(FID, 1)
    assert f.watches[b].signals[0].signal_id == f"fleet:{FID}:{b}#r1"


async def test_list_sites_answers_when_a_site_bus_cannot_be_opened(
    fleet: FleetCloud, tmp_path: Path, store_url: str
) -> None:
    """b's edge has not taken its signal when the cloud restarts and b's outbox cannot be
    opened: what b's edge took cannot be known now, which is no reason to fail."""
    f = fleet
    a, b = f.sites
    await f.edge_offline(b)
    async with f.channel("aggregator-1") as ch:
        first = await f.fleet(ch).Curtail(_request([a, b]))
    await f.wait_signals({a: 1})
    await f.wait_published(FID, 1)

    await f.server.stop(0.5)
    await f.store.close()
    _break(_outbox(tmp_path, b))
    f.store = open_cloud_store(store_url, tmp_path)
    f.server = CloudApiServer(f.server.config, f.store, clock=f.clock)
    f.port = await f.server.start()

    async with f.channel("viewer-1") as ch:
        listed = await f.fleet(ch).ListSites(ListSitesRequest())
    shares = {s.site_id: s.fleet_shares for s in listed.sites}
    assert [x.taken for x in shares[a]] == [True]
    assert [(x.site_revision, x.taken) for x in shares[b]] == [(1, False)]
    assert shares[b][0].HasField("untaken_since")

    # A re-split asks b's bus too: it splits and stores revision 2, b's signal cannot go out.
    async with f.channel("aggregator-1") as ch:
        details = await _unavailable(
            f.fleet(ch).Resplit(FleetCurtailmentRef(fleet_curtailment_id=FID))
        )
    assert details.startswith(f"Resplit: bus of site {b!r} unavailable: outbox "), details
    assert f"revision 2 of {FID!r} is stored" in details, details
    held = await f.store.fleet_curtailment(FID)
    assert held is not None and held.revision == 2
    assert [sh.max_kw for sh in held.shares] == [sh.max_kw for sh in first.shares]
