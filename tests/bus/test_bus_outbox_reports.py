"""What the NATS bus's outbox accepted and will never send reaches its publisher, on a real
nats-server of the test's own: an outbox file found unreadable keeps every entry that can still be
read and says where the streams stood (review 2027-01, docs/audit.md: its audit records were lost
from the bus, the publish mark covered them); an entry set aside for its size is handed to the
publisher's listener (a record accepted against the 1 MiB default before the broker first
answered was set aside without the audit log knowing)."""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path

import pytest
from bus_testkit import wait_until
from evcore.audit.log import PUBLISHED_MARK
from evcore.bus import BusUnavailable, OutboxReports, SetAside
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from outbox_testkit import (
    decision,
    record_of,
    scene,
    stored_records,
    tear_the_page_holding,
)

pytestmark = pytest.mark.timeout(120)


async def test_an_unreadable_outbox_still_sends_every_audit_record_it_can_read(
    tmp_path: Path,
) -> None:
    """Twelve audit records wait in the outbox (broker down; the publish mark covers them all);
    a torn page makes the file unreadable. Before, the outbox was set aside whole and started
    empty: none of the twelve ever reached the bus (the review's finding). Now the new outbox
    holds every entry that still reads, and those reach JetStream in their order; the loss says
    what could not be read. The audit log, opened next, sends again what the torn page held."""
    async with scene(tmp_path, "loss") as sc:
        bus = sc.bus()
        await bus.start()
        log = await sc.audit(bus)
        appended: list[AuditRecord] = []
        for i in range(12):
            sc.clock.advance(1)
            appended.append(await log.append(decision(i, chargers=40)))  # about 2.5 KB each
        await log.close()
        assert bus.outbox.pending == 12
        assert await sc.store.get_meta(PUBLISHED_MARK) == str(appended[-1].seq)
        path = bus.outbox.path
        await bus.close()
        torn = appended[6]
        tear_the_page_holding(path, f"audit-{torn.hash}".encode())

        sc.srv.start()
        bus = sc.bus()
        await bus.start()
        try:
            assert await bus.flush(timeout_s=30)  # what the bus kept, before any publisher
            got = await stored_records(bus, sc.s.audit)
            lost = {r.seq for r in appended} - {r.seq for r in got}
            assert torn.seq in lost and lost <= {torn.seq - 1, torn.seq, torn.seq + 1}
            assert got == [r for r in appended if r.seq not in lost]  # in order, intact
            loss = bus.outbox.loss
            assert loss is not None and not loss.complete
            assert bus.outbox.corrupt_moved_to is not None
            assert loss.moved_to == str(bus.outbox.corrupt_moved_to)
            assert loss.salvaged == len(got) == 12 - len(lost)
            assert (await bus.outbox_losses())[-1].stream_last_seq == {
                spec.name: 0 for spec in bus.streams
            }
            # The stream held nothing before the loss: the audit log sends everything again
            # (tests/audit/test_audit_outbox_reports.py), the repeats dropped by event id.
            log = await sc.audit(bus)
            await log.flush()
            assert bus.stats.published == 12
            assert await bus.flush(timeout_s=30)
            got = await stored_records(bus, sc.s.audit)
            assert sorted(got, key=lambda r: r.seq) == appended
            await log.close()
        finally:
            await bus.close()


async def test_after_an_outbox_loss_the_publisher_learns_from_where_to_send_again(
    tmp_path: Path,
) -> None:
    """An outbox that cannot be read at all (its header gone) keeps nothing. The bus notes the
    loss in the new file and, when the broker is first reached again, where each stream stood
    before it sends anything more: ``last_stored(subject, before_loss=)`` then names the last
    record the stream held before the loss, even once later records were sent, so the audit log
    can move its publish mark back to it (it does: tests/audit/test_audit_outbox_reports.py) and
    every record reaches the stream once."""
    async with scene(tmp_path, "loss") as sc:
        appended = await sc.lose_an_outbox()

        bus = sc.bus()
        await bus.start()
        assert isinstance(bus, OutboxReports)
        try:
            [loss] = await bus.outbox_losses()
            assert loss.salvaged == 0 and not loss.complete and loss.stream_last_seq is None
            with pytest.raises(BusUnavailable, match="not been reached since"):
                await bus.last_stored(sc.s.audit, before_loss=loss)
            # Accepted after the loss (published here by hand: the audit log would hold them
            # back until it knows where the stream stood), sent once the broker is back.
            for i in range(7, 9):
                sc.clock.advance(1)
                record = await sc.append_without_bus(decision(i))
                appended.append(record)
                event = Event(event_id=f"audit-{record.hash}", site_id=sc.site, audit=record)
                await bus.publish(sc.s.audit, event, critical=True)
            sc.srv.start()
            await wait_until(lambda: bus.connected, 30, "the bus to connect")
            assert await bus.flush(timeout_s=30)
            assert [r.seq for r in await stored_records(bus, sc.s.audit)] == [0, 1, 2, 7, 8]

            newest = await bus.last_stored(sc.s.audit)
            assert newest is not None and record_of(Event.FromString(newest.data)).seq == 8
            before = await bus.last_stored(sc.s.audit, before_loss=loss)
            assert before is not None and before.event_id == f"audit-{appended[2].hash}"
            assert record_of(Event.FromString(before.data)) == appended[2]
        finally:
            await bus.close()

        # The next start: the loss is kept, with where the streams stood; the audit log moves
        # its mark back to the record stored before it and sends what follows again.
        bus = sc.bus()
        await bus.start()
        try:
            [loss] = await bus.outbox_losses()
            assert loss.stream_last_seq is not None
            log = await sc.audit(bus)
            await wait_until(lambda: log.publish_backlog == 0, 15, "the records sent again")
            assert await bus.flush(timeout_s=30)
            got = await stored_records(bus, sc.s.audit)
            assert sorted(r.seq for r in got) == [r.seq for r in appended]  # each once
            assert sorted(got, key=lambda r: r.seq) == appended
            await log.close()
        finally:
            await bus.close()


async def test_a_record_set_aside_for_its_size_is_handed_to_its_publisher(tmp_path: Path) -> None:
    """A broker with a 64 KiB max_payload, never reached before: the bus can only assume nats-
    server's 1 MiB default and takes a 100 KB audit record (below the audit log's 256 KiB
    compression threshold). Before, the pump set it aside once the broker answered and nobody was
    told: not compressed, not in too_large_for_bus, never on the bus. Now it goes to the listener
    of its subject (offered again while the listener cannot deal with it, and at the next start
    until one does); the listener here does what the audit log does (docs/bus.md; the audit log's
    own listener: tests/audit/test_audit_outbox_reports.py): send it compressed under the same
    event id. An entry of another subject waits for its own listener."""
    offered: list[SetAside] = []
    resent: list[str] = []
    async with scene(tmp_path, "size", max_payload=64 * 1024) as sc:
        s = sc.s
        bus = sc.bus()
        await bus.start()
        assert not bus.connected and not bus.max_payload_known
        assert bus.max_payload == 1024 * 1024
        with pytest.raises(ValueError, match="nats-server's default: no broker has answered"):
            await bus.publish(s.audit, b"x" * (1024 * 1024), event_id="far-too-big")

        async def audit_listener(entry: SetAside) -> bool:
            offered.append(entry)
            if len(offered) == 1:
                return False  # (the publisher's store away, say): offered again
            event = Event.FromString(entry.payload)
            assert event.WhichOneof("payload") == "audit"
            event.audit_zlib = zlib.compress(event.audit.SerializeToString(), 1)
            await bus.publish(entry.subject, event, event_id=entry.event_id, critical=True)
            resent.append(entry.event_id)
            return True

        bus.on_set_aside(s.audit, audit_listener)
        appended = []
        for i, chargers in enumerate((1, 2000, 1)):
            sc.clock.advance(1)
            record = await sc.append_without_bus(decision(i, chargers))
            appended.append(record)
            event = Event(event_id=f"audit-{record.hash}", site_id=sc.site, audit=record)
            await bus.publish(s.audit, event, critical=True)
        assert 64 * 1024 < appended[1].ByteSize() < 256 * 1024
        await bus.publish(s.setpoint("C1"), b"s" * 100_000, event_id="big-setpoint")
        assert bus.outbox.pending == 4

        sc.srv.start()
        await wait_until(lambda: bool(resent), 30, "the set-aside record sent compressed")
        assert bus.max_payload == 64 * 1024 and bus.max_payload_known
        assert [e.event_id for e in offered] == [f"audit-{appended[1].hash}"] * 2
        assert "max_payload of 65536" in offered[0].reason
        assert await bus.flush(timeout_s=30)
        assert await stored_records(bus, s.audit) == [appended[0], appended[2], appended[1]]
        await bus.close()

        # The next start, broker away: the figure is known, the record dealt with is not offered
        # again; the setpoint no listener took is, to the first that listens for it.
        sc.srv.kill()
        bus = sc.bus()
        await bus.start()
        try:
            assert bus.max_payload == 64 * 1024 and bus.max_payload_known
            again: list[SetAside] = []

            async def take(entry: SetAside) -> bool:
                again.append(entry)
                return True

            bus.on_set_aside(s.audit, take)
            bus.on_set_aside(s.setpoint(), take)
            await wait_until(lambda: len(again) >= 1, 10, "the set-aside setpoint offered")
            await asyncio.sleep(0.2)
            assert [e.event_id for e in again] == ["big-setpoint"]
            assert await bus.outbox.unreported_set_aside() == []
        finally:
            await bus.close()
