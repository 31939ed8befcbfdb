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
