"""The bus outbox's fill and refusals in a scrape: a running ``EdgeApp`` with ``[metrics]`` on a
``NatsBus`` whose nats-server is away (a real server's address, never started), critical events
published until the outbox refuses them at ``[bus] outbox_max_bytes``, the real /metrics
endpoint scraped over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from bus_testkit import NatsServer, unique_site
from evcore.bus import OutboxFull, Subjects, parse_bus_config
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.edge.app import EdgeApp
from evcore.edge.sitegen import depot_table
from evcore.site import load_site
from metrics_testkit import scrape

pytestmark = pytest.mark.timeout(60)

CAP_BYTES = 20_000


async def test_an_outbox_refusing_at_its_cap_shows_in_a_scrape(tmp_path: Path) -> None:
    """Before, a scrape showed the outbox's pending count only: an outbox at its cap refusing
    every critical event (OutboxFull) looked like one merely holding them."""
    srv = NatsServer(tmp_path / "js")  # never started: the broker is away
    site = unique_site()
    conf = parse_bus_config(
        {
            "kind": "nats",
            "urls": [srv.url],
            "outbox_dir": str(tmp_path / "outbox"),
            "outbox_max_bytes": CAP_BYTES,
            "connect_timeout_s": 0.5,
            "reconnect_wait_s": 0.1,
            "publish_timeout_s": 1.0,
        }
    )
    bus = NatsBus(site, conf, clock=WallClock())
    table = depot_table(2, per_feeder=2, site_id=site)
    table["metrics"] = {"listen": "127.0.0.1:0"}
    app = EdgeApp(load_site(table), table, clock=WallClock(), bus=bus)
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 20)
        assert not bus.connected
        before = await scrape(app.metrics_port)
        assert before.types.get("evcore_bus_outbox_refused_total") == "counter"
        assert before.types.get("evcore_bus_outbox_bytes") == "gauge"
        assert before.value("evcore_bus_outbox_max_bytes") == CAP_BYTES
        assert before.value("evcore_bus_outbox_refused_total") == 0
        # Transactions (critical: they wait in the outbox) until the outbox refuses one.
        with pytest.raises(OutboxFull):
            for i in range(100):
                await bus.publish(
                    Subjects(site).transaction("cp-0001"), b"t" * 1000, event_id=f"tx-{i}"
                )
        refused_before = bus.stats.outbox_refused
        assert refused_before >= 1
        full = await scrape(app.metrics_port)
        held = full.value("evcore_bus_outbox_bytes")
        # Nothing leaves an outbox whose broker is away: what it holds stays as scraped.
        assert held == bus.stats.outbox_bytes
        assert CAP_BYTES - 1100 < held <= CAP_BYTES, held
        # (The audit log's records may be refused too meanwhile: at least the transaction.)
        refused = full.value("evcore_bus_outbox_refused_total")
        assert refused_before <= refused <= bus.stats.outbox_refused, refused
        assert full.value("evcore_bus_outbox_pending_messages") == bus.stats.outbox_pending
    finally:
        app.stop()
        await asyncio.wait_for(runner, 20)
