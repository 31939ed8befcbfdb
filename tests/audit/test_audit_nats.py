"""Audit records on a real NATS JetStream through the bus's disk outbox.

With the broker down, appends still return as soon as the record is durable in the store; the
records wait in the outbox and reach JetStream, in order, when the broker comes up. A restarted
edge republishes nothing that was accepted, and a durable consumer sees every record exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_testkit import NatsServer, make_nats_bus, wait_until
from evcore.audit import AuditLog, Decision
from evcore.bus import BusMessage
from evcore.bus.subjects import Subjects
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

pytestmark = pytest.mark.timeout(120)

REASON = "held at 16 A: feeder F2 phase L1 at 63 of 63 A"


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream of this test's own, started when the test says so."""
    server = NatsServer(tmp_path / "jetstream")
    try:
        yield server
    finally:
        server.kill()


def decision(i: int) -> Decision:
    return Decision(
        f"D{i}",
        "tick",
        inputs_digest=f"{i:064x}",
        setpoints=[Setpoint(charger_id="C1", setpoint_a=16.0, reason=REASON)],
    )


async def test_records_reach_jetstream_through_the_outbox(nats: NatsServer, tmp_path: Path) -> None:
    site = f"audit-{uuid.uuid4().hex[:8]}"
    clock = ManualClock()
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    outbox = tmp_path / "outbox"

    # The broker is down: appends are durable in the store and wait in the outbox.
    bus = make_nats_bus(site, nats.url, outbox, publish_timeout_s=2.0, ack_wait_s=5.0)
    await bus.start()
    log = AuditLog(store, clock=clock, bus=bus, site_id=site)
    await log.open()
    appended: list[AuditRecord] = []
    for i in range(3):
        clock.advance(1)
        appended.append(await asyncio.wait_for(log.append(decision(i)), 10))
    await log.flush()  # the publisher hands them to the outbox beside the appends
    assert not bus.connected
    assert bus.stats.outbox_pending == 3
    assert log.publish_failures == 0

    # The broker comes up: the outbox drains into JetStream in order.
    nats.start()
    got: list[Event] = []

    async def on_audit(msg: BusMessage) -> None:
        ev = Event()
        ev.ParseFromString(msg.data)
        assert msg.event_id == ev.event_id
        got.append(ev)

    try:
        await wait_until(lambda: bus.connected, 30, "the bus to connect")
        consumer = await bus.consume(Subjects(site).audit, durable="cloud-audit", handler=on_audit)
        await wait_until(lambda: len(got) >= 3, 30, "three audit events")
        assert [e.audit for e in got] == appended
        assert [e.event_id for e in got] == [f"audit-{r.hash}" for r in appended]
        assert bus.stats.outbox_pending == 0
        await consumer.stop()
        await log.close()  # writes the publish mark
        await bus.close()

        # A restarted edge: nothing already accepted is republished (and JetStream would drop a
        # repeat by its Nats-Msg-Id anyway); the next record follows.
        bus2 = make_nats_bus(site, nats.url, outbox, publish_timeout_s=2.0, ack_wait_s=5.0)
        await bus2.start()
        try:
            log2 = AuditLog(store, clock=clock, bus=bus2, site_id=site)
            await log2.open()
            await log2.flush()
            assert bus2.stats.published == 0  # the publish mark covered all three
            clock.advance(1)
            appended.append(await log2.append(decision(3)))
            got.clear()
            consumer2 = await bus2.consume(
                Subjects(site).audit, durable="cloud-audit", handler=on_audit
            )
            await wait_until(lambda: len(got) >= 1, 30, "the fourth audit event")
            await asyncio.sleep(0.5)  # a republished record would arrive by now
            assert [e.audit.seq for e in got] == [3]
            assert got[0].audit == appended[3]
            await consumer2.stop()
            await log2.close()
            await bus2.delete_streams()
        finally:
            await bus2.close()
    finally:
        await bus.close()
        await store.close()


def big_decision(i: int, n: int, *, noisy: bool = False) -> Decision:
    """A decision over ``n`` chargers (a curtailment on a large site); ``noisy`` reasons do
    not compress."""
    return Decision(
        f"BIG{i}",
        "grid:dso-1",
        inputs_digest=f"{i:064x}",
        setpoints=[
            Setpoint(
                charger_id=f"C{c:05d}",
                setpoint_a=6.0 + (c % 7) * 0.5,
                reason=(uuid.uuid4().hex * 3)
                if noisy
                else f"held at 6 A: grid curtailment dso-1 at site 1200 of 1200 kW (F{c // 50})",
            )
            for c in range(n)
        ],
    )


async def _audit_on_bus(
    url: str, site: str, store: SqlStore, tmp_path: Path, decisions: list[Decision]
) -> tuple[AuditLog, list[AuditRecord], list[AuditRecord]]:
    """Append ``decisions`` through a NATS bus at ``url``; what was appended and what a durable
    consumer read back (decoded as the cloud decodes it)."""
    from evcore.cloud.consumer import audit_record_of

    clock = ManualClock()
    bus = make_nats_bus(site, url, tmp_path / "outbox", publish_timeout_s=5.0, ack_wait_s=5.0)
    await bus.start()
    got: list[AuditRecord] = []

    async def on_audit(msg: BusMessage) -> None:
        got.append(audit_record_of(msg.data, site))

    try:
        await wait_until(lambda: bus.connected, 30, "the bus to connect")
        log = AuditLog(store, clock=clock, bus=bus, site_id=site)
        await log.open()
        appended = []
        for d in decisions:
            clock.advance(1)
            appended.append(await log.append(d))
        consumer = await bus.consume(Subjects(site).audit, durable="cloud-audit", handler=on_audit)
        await log.close()
        await bus.flush(30)
        expected = len(appended) - len(log.too_large_for_bus)
        await wait_until(lambda: len(got) >= expected, 30, "the audit events")
        await consumer.stop()
        await bus.delete_streams()
        return log, appended, got
    finally:
        await bus.close()


async def test_a_decision_over_12000_chargers_reaches_the_bus_compressed(tmp_path: Path) -> None:
    """Review 2026-12-05 (HIGH): a 1.3 MB record was refused by the broker's 1 MiB max_payload,
    never reached the bus, and the publish mark froze for good (publish_failures 1, mark None
    after 41 records). Now it goes zlib-compressed and the cloud's decoder reads it back."""
    site = f"audit-big-{uuid.uuid4().hex[:8]}"
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        decisions = [decision(0), big_decision(1, 12_000), *(decision(i) for i in range(2, 36))]
        log, appended, got = await _audit_on_bus(
            "nats://127.0.0.1:4222", site, store, tmp_path, decisions
        )
        assert appended[1].ByteSize() > 1024 * 1024  # over nats-server's default max_payload
        assert log.publish_failures == 0 and log.too_large_for_bus == []
        assert got == appended  # every record, in order, the big one equal field for field
        assert await store.get_meta("audit.published_seq") == str(appended[-1].seq)
    finally:
        await store.close()


async def test_a_record_no_broker_can_take_does_not_hold_back_the_rest(tmp_path: Path) -> None:
    """A record too large even compressed (a broker with a 64 KiB max_payload, reasons that do
    not compress) is named in the log and kept in the store; the records after it still reach
    the bus and the publish mark moves on (before: every later record was held off the mark)."""
    server = NatsServer(tmp_path / "js", max_payload=64 * 1024)
    server.start()
    site = f"audit-huge-{uuid.uuid4().hex[:8]}"
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        decisions = [decision(0), big_decision(1, 3_000, noisy=True), decision(2), decision(3)]
        log, appended, got = await _audit_on_bus(server.url, site, store, tmp_path, decisions)
        assert log.too_large_for_bus == [appended[1].seq]
        assert got == [appended[0], appended[2], appended[3]]
        assert await store.get_meta("audit.published_seq") == str(appended[-1].seq)
        stored = await store.audit_records(after_seq=appended[0].seq)
        assert stored[0] == appended[1]  # the big one is durable all the same
    finally:
        await store.close()
        server.kill()


async def test_a_record_too_large_only_uncompressed_reaches_a_small_broker_compressed(
    tmp_path: Path,
) -> None:
    """Review 2027-01: records up to 256 KiB went uncompressed, so a broker with a smaller
    max_payload (64 KiB here) refused a 1000-charger decision of some 100 KB that compresses to a
    few KB; the log called it "too large for the bus even compressed" (it never was compressed)
    and it never reached the bus. Now a record the broker refuses as it is goes compressed."""
    server = NatsServer(tmp_path / "js", max_payload=64 * 1024)
    server.start()
    site = f"audit-small-{uuid.uuid4().hex[:8]}"
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    try:
        decisions = [decision(0), big_decision(1, 1_000), decision(2)]
        log, appended, got = await _audit_on_bus(server.url, site, store, tmp_path, decisions)
        assert 64 * 1024 < appended[1].ByteSize() < 256 * 1024
        assert log.too_large_for_bus == [] and log.publish_failures == 0
        assert got == appended  # every record, in order, the big one equal field for field
        assert await store.get_meta("audit.published_seq") == str(appended[-1].seq)
    finally:
        await store.close()
        server.kill()
