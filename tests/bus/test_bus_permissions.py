"""The per-site permissions example in cloud/nats/: an edge user works on its own site's subjects
and streams (publish through the outbox, durable consume) and is refused another site's."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from bus_testkit import NATS_SERVER, AuditSink, free_port, port_open, wait_until
from evcore.bus import BusConfig, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.clock import WallClock
from evcore.v1 import audit_pb2

CONF = Path(__file__).resolve().parents[2] / "cloud" / "nats" / "site-permissions.example.conf"


@pytest.fixture
def secured_server(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    conf = tmp_path / "site-permissions.conf"
    shutil.copy(CONF, conf)
    proc = subprocess.Popen(
        [NATS_SERVER, "-c", str(conf), "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            if port_open(port) or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.02"], check=False)
        assert proc.poll() is None, "nats-server refused the example config"
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _bus(site: str, url: str, tmp: Path, name: str, *, manage: bool) -> NatsBus:
    cfg = BusConfig(
        kind="nats",
        urls=(url,),
        reconnect_wait_s=0.1,
        connect_timeout_s=2.0,
        publish_timeout_s=1.0,
        manage_streams=manage,
    )
    return NatsBus(site, cfg, clock=WallClock(), outbox_path=tmp / f"{name}.sqlite")


async def test_edge_user_limited_to_its_site(secured_server: int, tmp_path: Path) -> None:
    port = secured_server
    cloud_url = f"nats://cloud:cloud-change-me@127.0.0.1:{port}"
    edge_url = f"nats://depot-1:depot-1-change-me@127.0.0.1:{port}"
    cloud = _bus("depot-1", cloud_url, tmp_path, "cloud", manage=True)  # creates the streams
    await cloud.start()
    edge = _bus("depot-1", edge_url, tmp_path, "edge", manage=False)
    await edge.start()
    try:
        assert cloud.connected and edge.connected
        s = Subjects("depot-1")
        sink = AuditSink(tmp_path / "sink.sqlite")
        # The edge itself may run a durable consumer on its own stream ...
        await edge.consume(s.audit, durable="edge-local", handler=sink.handle, dedupe=sink.ids)
        for i in range(20):
            await edge.publish(s.audit, audit_pb2.AuditRecord(seq=i), event_id=f"a{i}")
        assert await edge.flush(timeout_s=10)
        await wait_until(lambda: sink.count() == 20, what="the edge's own audit records")
        assert sink.applied() == list(range(20))
        # ... and read its own stream's messages (STREAM.MSG.GET): what the audit log asks after
        # an outbox loss, to know from where to send again (docs/bus.md).
        last = await edge.last_stored(s.audit)
        assert last is not None and last.event_id == "a19"

        # ... but another site's subjects are refused by the server.
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)

        nc = await nats.connect(edge_url, error_cb=on_error, allow_reconnect=False)
        try:
            await nc.subscribe("evcore.depot-2.>")
            await nc.publish("evcore.depot-2.audit", b"x")
            await nc.flush()
            await asyncio.sleep(0.3)
            js = nc.jetstream(timeout=0.5)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.stream_info("EVCORE_depot-2_EVENTS")
        finally:
            await nc.close()
        text = " | ".join(str(e).lower() for e in errors)
        assert 'permissions violation for subscription to "evcore.depot-2.>"' in text, text
        assert 'permissions violation for publish to "evcore.depot-2.audit"' in text, text
    finally:
        await edge.close()
        await cloud.close()
