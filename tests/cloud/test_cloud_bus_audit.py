"""Audit records from an edge's AuditLog over the real NATS JetStream (127.0.0.1:4222) into the
cloud store through the durable ``cloud-audit`` consumer and the same chain check as UploadAudit."""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import patient_nats_bus
from cloud_testkit import chain, wait_until
from evcore.audit import AuditLog, Decision, verify_chain
from evcore.audit.chain import seal
from evcore.bus.subjects import Subjects
from evcore.clock import ManualClock
from evcore.cloud import open_cloud_store
from evcore.cloud.consumer import AuditConsumer
from evcore.store import open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

pytestmark = pytest.mark.timeout(120)
NATS_URL = "nats://127.0.0.1:4222"


def decision(i: int) -> Decision:
    return Decision(
        f"D{i}",
        "tick",
        inputs_digest=f"{i:064x}",
        setpoints=[Setpoint(charger_id="C1", setpoint_a=16.0 + i, reason="held: feeder F1 L1")],
    )


def event(site: str, record: AuditRecord, event_id: str) -> Event:
    e = Event(event_id=event_id, site_id=site, source="test")
    e.audit.CopyFrom(record)
    return e


async def _edge_and_cloud(store_url: str, tmp_path: Path) -> tuple[str, Any, Any, Any]:
    """A new site id, its edge's and the cloud's NATS buses (started), the cloud store."""
    site = f"cloud-bus-{uuid.uuid4().hex[:8]}"
    edge_bus = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
    cloud_bus = patient_nats_bus(site, NATS_URL, tmp_path / "cloud-outbox")
    cloud_store = open_cloud_store(store_url, tmp_path)
    await edge_bus.start()
    await cloud_bus.start()
    assert edge_bus.connected, f"nats-server at {NATS_URL} unreachable"
    return site, edge_bus, cloud_bus, cloud_store


async def test_bus_audit_records_are_chain_checked_into_the_cloud(
    store_url: str, tmp_path: Path
) -> None:
    site, edge_bus, cloud_bus, cloud_store = await _edge_and_cloud(store_url, tmp_path)
    clock = ManualClock()
    edge_store = open_store({"path": str(tmp_path / "edge-store")}, tmp_path)
    audit = AuditLog(edge_store, clock=clock, bus=edge_bus, site_id=site, edge_id="edge-1")
    consumer = AuditConsumer(cloud_bus, cloud_store, clock=clock)
    try:
        await audit.open()
        for i in range(5):
            clock.advance(1.0)
            await audit.append(decision(i))
        await consumer.start()
        await wait_until(lambda: consumer.stats.stored == 5, "5 records stored")
        assert await cloud_store.contiguous_seq(site) == 4
        report = await verify_chain(edge_store)
        assert report.ok and report.head is not None
        held = await cloud_store.audit_records(site)
        assert held[-1].hash == report.head.hash  # the cloud witnesses the edge's head

        # A repeat under another event id (past JetStream's duplicate window), a record changed
        # after sealing, then the true next record: the repeat is kept once, the changed one is
        # refused and acknowledged, and the durable goes on to the true one.
        subject = Subjects(site).audit
        await edge_bus.publish(subject, event(site, held[2], "again-2"), critical=True)
        changed = AuditRecord()
        changed.CopyFrom(held[4])
        changed.seq = 5
        changed.prev_hash = held[4].hash
        await edge_bus.publish(subject, event(site, changed, "changed-5"), critical=True)
        clock.advance(1.0)
        await audit.append(decision(5))
        await wait_until(lambda: consumer.stats.stored == 6, "the true seq 5 stored")
        assert (consumer.stats.duplicates, consumer.stats.refused) == (1, 1)
        assert await cloud_store.contiguous_seq(site) == 5
        assert cloud_bus.stats.rejected == 1
        held = await cloud_store.audit_records(site)
        assert [r.seq for r in held] == list(range(6))
        assert held[5].hash != changed.hash  # the true seq 5, not the changed one
        # An event that claims another site is refused too.
        stranger = event("elsewhere", held[0], "stranger-0")
        await edge_bus.publish(subject, stranger, critical=True)
        await wait_until(lambda: cloud_bus.stats.rejected == 2, "the stranger rejected")
    finally:
        await consumer.stop()
        await audit.close(flush_timeout_s=5)
        await edge_bus.delete_streams()
        await edge_bus.close()
        await cloud_bus.close()
        await cloud_store.close()
        await edge_store.close()


async def test_records_the_store_cannot_hold_are_refused_and_the_rest_goes_on(
    store_url: str, tmp_path: Path
) -> None:
    """Review of session 12: a record at seq 2^63 - 1 (its neighbour seq + 1 overflowed the
    store's query) or with a non-ASCII prev_hash (it could not be hashed) raised a plain error:
    the consumer retried it for ever and every later record of the site waited. Now both are
    refused and acknowledged; the site's true records are stored. A plan asked for above the
    store's largest version is None (it was an OverflowError, INTERNAL over gRPC)."""
    site, edge_bus, cloud_bus, cloud_store = await _edge_and_cloud(store_url, tmp_path)
    clock = ManualClock()
    await cloud_store.open()
    consumer = AuditConsumer(cloud_bus, cloud_store, clock=clock)
    subject = Subjects(site).audit
    try:
        await consumer.start()
        far = seal(AuditRecord(decision_id="far"), seq=2**63 - 1, prev_hash="ab" * 32)
        await edge_bus.publish(subject, event(site, far, "far"), critical=True)
        odd = AuditRecord(decision_id="odd", seq=3, prev_hash="\u00e9" * 64, hash="00" * 32)
        await edge_bus.publish(subject, event(site, odd, "odd"), critical=True)
        first = seal(AuditRecord(decision_id="first"), seq=0, prev_hash="")
        await edge_bus.publish(subject, event(site, first, "first"), critical=True)
        await wait_until(lambda: consumer.stats.stored == 1, "the true seq 0 stored")
        assert consumer.stats.refused == 2
        assert cloud_bus.stats.rejected == 2
        assert await cloud_store.contiguous_seq(site) == 0
        assert await cloud_store.newest_plan(site, newer_than_version=2**64 - 1) is None
    finally:
        await consumer.stop()
        await edge_bus.delete_streams()
        await edge_bus.close()
        await cloud_bus.close()
        await cloud_store.close()


async def test_a_decision_over_12000_chargers_reaches_the_cloud_over_the_bus(
    store_url: str, tmp_path: Path
) -> None:
    """A 1.3 MB record (above nats-server's 1 MiB max_payload) goes compressed and is stored
    by the cloud's consumer through the chain check (before: never on the bus; the cloud's
    contiguous seq stayed below it for good). A compressed payload that does not inflate, or
    would inflate past the bound, is refused and acknowledged."""
    from evcore.bus.api import BadPayload
    from evcore.cloud.consumer import audit_record_of

    site = f"cloud-big-{uuid.uuid4().hex[:8]}"
    clock = ManualClock()
    edge_store = open_store({"path": str(tmp_path / "edge-store")}, tmp_path)
    edge_bus = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
    cloud_bus = patient_nats_bus(site, NATS_URL, tmp_path / "cloud-outbox")
    cloud_store = open_cloud_store(store_url, tmp_path)
    await edge_bus.start()
    await cloud_bus.start()
    audit = AuditLog(edge_store, clock=clock, bus=edge_bus, site_id=site, edge_id="edge-1")
    consumer = AuditConsumer(cloud_bus, cloud_store, clock=clock)
    big = Decision(
        "BIG",
        "grid:dso-1",
        inputs_digest="b" * 64,
        setpoints=[
            Setpoint(
                charger_id=f"C{c:05d}",
                setpoint_a=6.0,
                reason=f"held at 6 A: grid curtailment dso-1 at site 1200 of 1200 kW (F{c // 50})",
            )
            for c in range(12_000)
        ],
    )
    try:
        await audit.open()
        await consumer.start()
        for d in (decision(0), big, decision(2)):
            clock.advance(1.0)
            await audit.append(d)
        await wait_until(lambda: consumer.stats.stored == 3, "3 records stored")
        assert await cloud_store.contiguous_seq(site) == 2
        held = await cloud_store.audit_records(site)
        assert len(held[1].setpoints) == 12_000 and held[1].ByteSize() > 1024 * 1024
        report = await verify_chain(edge_store)
        assert report.head is not None and held[-1].hash == report.head.hash
    finally:
        await consumer.stop()
        await audit.close(flush_timeout_s=5)
        await edge_bus.delete_streams()
        await edge_bus.close()
        await cloud_bus.close()
        await cloud_store.close()
        await edge_store.close()
    bad = Event(event_id="bad", site_id=site)
    bad.audit_zlib = b"not zlib at all"
    with pytest.raises(BadPayload, match="does not inflate"):
        audit_record_of(bad.SerializeToString(), site)
    import zlib

    bomb = Event(event_id="bomb", site_id=site)
    bomb.audit_zlib = zlib.compress(b"\0" * (300 * 1024 * 1024), 9)
    with pytest.raises(BadPayload, match="inflates beyond"):
        audit_record_of(bomb.SerializeToString(), site)


async def serve_cloud(tmp_path: Path, bus: str) -> asyncio.subprocess.Process:
    """`evcore cloud serve` (insecure, SQLite store in ``tmp_path``) with the ``[bus]`` lines
    ``bus``, once it says it serves."""
    exe = shutil.which("evcore")
    assert exe is not None, "the evcore console script is not installed"
    config = tmp_path / "cloud.toml"
    config.write_text(
        'listen = "127.0.0.1:0"\ninsecure = true\n[store]\nurl = "sqlite:store"\n'
        f'[bus]\n{bus}outbox_dir = "outbox"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        exe, "cloud", "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    assert "CloudApi on port" in line, line
    return proc


async def stop_cloud(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0


async def stored_up_to(store: Any, sites: list[str], seq: int, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    for site in sites:
        while await store.contiguous_seq(site) < seq:
            assert asyncio.get_running_loop().time() < deadline, f"{site}: {what}"
            await asyncio.sleep(0.1)


async def test_the_command_consumes_the_configured_sites_audit(tmp_path: Path) -> None:
    site = f"cloud-cmd-{uuid.uuid4().hex[:8]}"
    edge_bus = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
    await edge_bus.start()
    records = chain(3)
    proc: asyncio.subprocess.Process | None = None
    try:
        for r in records:
            await edge_bus.publish(
                Subjects(site).audit, event(site, r, f"audit-{r.hash}"), critical=True
            )
        assert await edge_bus.flush(10.0)
        proc = await serve_cloud(tmp_path, f'url = "{NATS_URL}"\nsites = ["{site}"]\n')
        store = open_cloud_store(f"sqlite:{tmp_path / 'store'}")
        try:
            await stored_up_to(store, [site], 2, "records never stored")
            held = await store.audit_records(site)
            assert [r.hash for r in held] == [r.hash for r in records]
        finally:
            await store.close()
        await stop_cloud(proc)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await edge_bus.delete_streams()
        await edge_bus.close()


async def test_the_command_reads_every_site_over_one_connection_and_after_a_broker_restart(
    tmp_path: Path,
) -> None:
    """`evcore cloud serve` with three sites under [bus]: one NATS connection named as the
    config says (before: one per site, three), and after the broker restarts (same store) the
    records published meanwhile are stored for every site (the reconnect reaches each site's
    consumer over the shared connection)."""
    from bus_testkit import NatsServer

    server = NatsServer(tmp_path / "js", monitor=True)
    server.start()
    sites = [f"one-conn-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    records = chain(4)
    edges = [patient_nats_bus(s, server.url, tmp_path / f"edge-{i}") for i, s in enumerate(sites)]
    proc: asyncio.subprocess.Process | None = None
    store = open_cloud_store(f"sqlite:{tmp_path / 'store'}")

    async def publish(rs: list[AuditRecord]) -> None:
        for site, bus in zip(sites, edges, strict=True):
            for r in rs:
                e = event(site, r, f"audit-{site}-{r.hash}")
                await bus.publish(Subjects(site).audit, e, critical=True)
            assert await bus.flush(20.0)

    try:
        for bus in edges:
            await bus.start()
        await publish(records[:2])
        names = ", ".join(f'"{s}"' for s in sites)
        proc = await serve_cloud(
            tmp_path,
            f'url = "{server.url}"\nsites = [{names}]\n'
            'name = "evcore-cloud-test"\nreconnect_wait_s = 0.2\n',
        )
        await stored_up_to(store, sites, 1, "not stored")
        assert server.connection_names().count("evcore-cloud-test") == 1

        server.restart()  # same JetStream store: the streams and durables are kept
        await publish(records[2:])
        await stored_up_to(store, sites, 3, "not stored after the restart")
        for site in sites:
            held = await store.audit_records(site)
            assert [r.hash for r in held] == [r.hash for r in records]
        assert server.connection_names().count("evcore-cloud-test") == 1
        await stop_cloud(proc)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for bus in edges:
            await bus.close()
        await store.close()
        server.kill()


async def test_the_command_with_every_site_reads_a_new_site_without_a_restart(
    tmp_path: Path,
) -> None:
    """`[bus] sites = "*"`: a site the cloud comes to know while it runs (here its first record
    uploaded, as an edge's CloudLink does) gets its audit read over the bus within
    `discover_s`, with no restart (before: `sites` had to list every site; "*" was refused)."""
    site = f"discovered-{uuid.uuid4().hex[:8]}"
    edge_bus = patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
    await edge_bus.start()
    records = chain(4)
    proc: asyncio.subprocess.Process | None = None
    store = open_cloud_store(f"sqlite:{tmp_path / 'store'}")
    try:
        for r in records:
            await edge_bus.publish(
                Subjects(site).audit, event(site, r, f"audit-{r.hash}"), critical=True
            )
        assert await edge_bus.flush(10.0)
        proc = await serve_cloud(tmp_path, f'url = "{NATS_URL}"\nsites = "*"\ndiscover_s = 0.2\n')
        await asyncio.sleep(1.0)
        assert await store.contiguous_seq(site) == -1  # unknown: nothing read yet
        await store.put_audit(site, records[:1], now_s=1.0)  # the site makes itself known
        await stored_up_to(store, [site], 3, "the new site was never read")
        held = await store.audit_records(site)
        assert [r.hash for r in held] == [r.hash for r in records]
        await stop_cloud(proc)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.close()
        await edge_bus.delete_streams()
        await edge_bus.close()
