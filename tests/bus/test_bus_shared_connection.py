"""Several sites' NATS buses over one connection (``NatsConnection``), as the cloud reads every
site's audit: one client connection for all, each bus's own streams and consumers, and closing
one bus leaves the connection to the others."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from bus_testkit import NatsServer, wait_until
from evcore.bus import BusConfig, BusMessage, Subjects
from evcore.bus.natsbus import NatsBus, NatsConnection
from evcore.clock import WallClock


async def test_buses_share_one_connection_and_outlive_each_other(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", monitor=True)
    server.start()
    cfg = BusConfig(
        kind="nats",
        urls=(server.url,),
        outbox_dir=tmp_path / "outbox",
        name="shared-test",
        reconnect_wait_s=0.1,
    )
    shared = NatsConnection(cfg)
    sites = [f"shared-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    buses = [NatsBus(s, cfg, clock=WallClock(), connection=shared) for s in sites]
    got: dict[str, list[str]] = {s: [] for s in sites}
    try:
        for bus in buses:
            await bus.start()
            assert bus.connected
        assert shared.buses == 3
        assert server.connection_names().count("shared-test") == 1

        def collect(site: str) -> Callable[[BusMessage], Awaitable[None]]:
            async def handler(msg: BusMessage) -> None:
                got[site].append(msg.event_id)

            return handler

        for site, bus in zip(sites, buses, strict=True):
            await bus.consume(Subjects(site).audit, durable="d", handler=collect(site))
            await bus.publish(Subjects(site).audit, b"x", event_id=f"{site}-1", critical=True)
        await wait_until(lambda: all(len(v) == 1 for v in got.values()), 20, "one each")

        await buses[0].close()  # the others keep the connection
        assert shared.buses == 2
        for site, bus in zip(sites[1:], buses[1:], strict=True):
            await bus.publish(Subjects(site).audit, b"y", event_id=f"{site}-2", critical=True)
        await wait_until(lambda: all(len(got[s]) == 2 for s in sites[1:]), 20, "two each")
        assert got[sites[1]] == [f"{sites[1]}-1", f"{sites[1]}-2"]
        assert server.connection_names().count("shared-test") == 1
    finally:
        for bus in buses:
            await bus.close()
        await shared.close()
        server.kill()
