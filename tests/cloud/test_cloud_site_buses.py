"""The cloud opens one bus per site for everything in it: the audit consumers and the fleet's
grid publisher share it (``SiteBuses``). Each opened its own before (review of session 12): two
buses on one outbox file, so after one pump sent the leftover entries the other counted them
pending for good, polling the empty file, and its ``flush`` never drained. Real NATS."""

from __future__ import annotations

from pathlib import Path

import pytest
from bus_testkit import SHARED_NATS, unique_site
from evcore.bus.outbox import Outbox
from evcore.bus.subjects import Subjects, escape_token
from evcore.clock import WallClock
from evcore.cloud.cli import AuditConsumers
from evcore.cloud.config import CloudConfig
from evcore.cloud.fleet import BusGridPublisher
from evcore.cloud.sitebuses import SiteBuses
from evcore.cloud.store import open_cloud_store
from evcore.v1.grid_pb2 import GridSignal

pytestmark = pytest.mark.timeout(60)


async def test_the_audit_consumers_and_the_grid_publisher_share_each_sites_bus(
    tmp_path: Path,
) -> None:
    site = unique_site()
    outbox_dir = tmp_path / "outbox"
    bus_section = {"urls": [SHARED_NATS], "outbox_dir": str(outbox_dir), "sites": [site]}
    # Left over from the last run: a grid signal accepted and never sent.
    left = Outbox(outbox_dir / f"{escape_token(site)}.sqlite")
    await left.open()
    await left.append(Subjects(site).grid, "grid-left-1", GridSignal().SerializeToString(), 0.0)
    await left.close()
    config = CloudConfig.from_table(
        {"insecure": True, "store": {"url": "sqlite:store"}, "bus": bus_section}, tmp_path
    )
    assert config.bus is not None
    store = open_cloud_store(config.store_url, tmp_path)
    await store.open()
    buses = SiteBuses(config.bus, WallClock())
    consumers = AuditConsumers(config, store, WallClock(), buses)
    publisher = BusGridPublisher(buses.get)
    try:
        await consumers.start()
        consumer_bus = consumers.by_site[site][1]
        assert consumer_bus.connected, f"nats-server at {SHARED_NATS} unreachable"
        sig = GridSignal()
        await publisher.publish_grid(site, sig, event_id="grid-new-1")
        assert await publisher._bus(site) is consumer_bus
        assert buses.sites() == [site]
        # Both entries leave, and the one outbox counts none pending after.
        assert await consumer_bus.flush(timeout_s=15.0)
        assert consumer_bus.outbox.pending == 0  # type: ignore[attr-defined]
        assert await publisher.stored(site, "grid-left-1")
        assert await publisher.stored(site, "grid-new-1")
    finally:
        await consumers.stop()
        bus = await buses.get(site)
        await bus.delete_streams()  # type: ignore[attr-defined]
        await buses.close()
        await store.close()
