"""A second ``evcore edge`` for a site whose edge runs (one site file started twice: by the unit
and by hand, or on a second host) does not start: both consumed the site's grid signals with the
durable ``edge-grid`` and JetStream shared them between the two. It exits 1 ("could not start")
naming the durable; the first edge runs on. The real command, twice, on the shared nats-server."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import pytest
from bus_testkit import SHARED_NATS, free_port
from edge_testkit import spawn_edge, start_edge
from evcore.bus import parse_bus_config
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.edge.sitegen import depot_table, to_toml

pytestmark = pytest.mark.timeout(120)


def _site_file(tmp_path: Path, site: str, name: str) -> Path:
    table = depot_table(2, per_feeder=2, site_id=site)
    table["ocpp"]["port"] = free_port()
    table["store"] = {"kind": "embedded", "path": str(tmp_path / name / "store")}
    table["bus"] = {
        "kind": "nats",
        "url": SHARED_NATS,
        "outbox_dir": str(tmp_path / name / "outbox"),
        "connect_timeout_s": 2.0,
    }
    path = tmp_path / f"{name}.toml"
    path.write_text(to_toml(table))
    return path


async def test_a_second_edge_of_a_running_site_does_not_start(tmp_path: Path) -> None:
    site = f"second-edge-{uuid.uuid4().hex[:8]}"
    first = await start_edge(_site_file(tmp_path, site, "first"))
    assert first.stdout is not None
    # Its output read on (a full pipe would stop the first edge, and its pulls with it).
    drain = asyncio.ensure_future(first.stdout.read())
    try:
        second = await spawn_edge(_site_file(tmp_path, site, "second"))
        assert second.stdout is not None
        said = asyncio.ensure_future(second.stdout.read())  # kept when it has to be killed
        try:
            await asyncio.wait_for(second.wait(), 45)
        except TimeoutError:
            second.send_signal(signal.SIGKILL)
            await second.wait()
        text = (await said).decode()
        assert second.returncode == 1, text[-2000:]
        assert "could not start" in text and "DurableInUse" in text, text[-2000:]
        assert "'edge-grid'" in text and "another consumer" in text, text[-2000:]
        assert first.returncode is None, "the first edge stopped"
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.wait_for(first.wait(), 30)
        await drain
        bus = NatsBus(
            site,
            parse_bus_config({"kind": "nats", "url": SHARED_NATS, "outbox_dir": str(tmp_path)}),
            clock=WallClock(),
        )
        await bus.start()
        await bus.delete_streams()
        await bus.close()
