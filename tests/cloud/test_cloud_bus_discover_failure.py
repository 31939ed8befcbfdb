"""``[bus] sites = "*"``: one known site whose bus cannot be opened (its outbox file cannot be
opened) holds back no other site's audit consumer, and is tried again at the next look. Real NATS
(127.0.0.1:4222), real cloud store, the serve command's ``AuditConsumers``.

Before: the sites were added in order and the first whose bus failed ended the look, at start and
at every ``discover_s``: the sites after it were never read (here c: no consumer, its records
never stored) and the serve command, with ``sites = "*"``, would not start at all.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bus_testkit import patient_nats_bus
from cloud_testkit import chain, wait_until
from evcore.bus.natsbus import NatsBus
from evcore.bus.subjects import Subjects, escape_token
from evcore.clock import WallClock
from evcore.cloud import CloudConfig, CloudStore, open_cloud_store
from evcore.cloud.cli import AuditConsumers
from evcore.cloud.sitebuses import SiteBuses
from evcore.v1.event_pb2 import Event

pytestmark = pytest.mark.timeout(60)
NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CloudStore]:
    s = open_cloud_store(f"sqlite:{tmp_path / 'store'}")
    await s.open()
    yield s
    await s.close()


async def test_a_site_whose_bus_fails_holds_back_no_other_site(
    tmp_path: Path, store: CloudStore
) -> None:
    tag = uuid.uuid4().hex[:8]
    a, b, c = (f"disc-{tag}-{x}" for x in "abc")
    records = chain(3)
    edges: list[NatsBus] = []
    for site in (a, b, c):
        await store.put_audit(site, records[:1], now_s=1.0)  # the cloud knows the site
        edge = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
        await edge.start()
        assert edge.connected, f"nats-server at {NATS_URL} unreachable"
        edges.append(edge)
        for r in records:
            e = Event(event_id=f"audit-{r.hash}", site_id=site, source="test")
            e.audit.CopyFrom(r)
            await edge.publish(Subjects(site).audit, e, critical=True)
        assert await edge.flush(10.0)
    outbox_dir = tmp_path / "cloud-outbox"
    (outbox_dir / f"{escape_token(b)}.sqlite").mkdir(parents=True)  # b's outbox cannot open
    config = CloudConfig.from_table(
        {
            "insecure": True,
            "store": {"url": "sqlite:store"},
            "bus": {
                "urls": [NATS_URL],
                "outbox_dir": str(outbox_dir),
                "sites": "*",
                "discover_s": 3600,
            },
        },
        tmp_path,
    )
    assert config.bus is not None
    buses = SiteBuses(config.bus, WallClock())
    consumers = AuditConsumers(config, store, WallClock(), buses)
    try:
        await consumers.start()  # raised SiteBusUnavailable for b before
        assert sorted(consumers.by_site) == [a, c]

        async def held(site: str) -> int:
            return await store.contiguous_seq(site)

        for consumer, _ in consumers.by_site.values():
            stats = consumer.stats
            # seq 0 is held already (a repeat), seqs 1 and 2 are stored from the bus.
            await wait_until(lambda s=stats: s.duplicates >= 1 and s.stored >= 2, consumer.site_id)
        assert [await held(site) for site in (a, c)] == [2, 2]
        assert await held(b) == 0

        # b's outbox can be opened again: the next look reads it.
        (outbox_dir / f"{escape_token(b)}.sqlite").rmdir()
        assert await consumers.discover() == [b]
        stats_b = consumers.by_site[b][0].stats
        await wait_until(lambda: stats_b.stored >= 2, b)
        assert await held(b) == 2
    finally:
        await consumers.stop()
        await buses.close()
        for edge in edges:
            await edge.delete_streams()
            await edge.close()
