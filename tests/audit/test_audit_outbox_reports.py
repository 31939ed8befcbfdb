"""The audit log's part in what the NATS bus's outbox accepted and will never send (review 2027-01,
docs/audit.md and docs/bus.md "What the outbox will never send"), on a real nats-server of the
test's own and a real store: after an outbox file was lost the log moves its publish mark back to
the last record the stream held before the loss and sends the rest again, holding newer records
back until it knows; a record the bus set aside for its size goes again compressed, or is listed
in ``too_large_for_bus``."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from bus_testkit import wait_until
from evcore.audit import seal
from evcore.audit.log import PUBLISHED_MARK, _record_of, build_record
from evcore.v1.event_pb2 import Event
from outbox_testkit import decision, scene, stored_events, stored_records

pytestmark = pytest.mark.timeout(60)


async def test_after_an_outbox_loss_the_audit_log_sends_again_what_it_held(
    tmp_path: Path,
) -> None:
    """Records 0..2 reach the stream; 3..6 wait in the outbox (broker down) and are lost with it
    (its header gone), while the mark already covers them. Before, they reached the cloud by the
    gRPC upload only: the stream held [0, 1, 2, 7, 8]. Now the log, at open, holds the records
    appended since (7, 8) in the store until the bus can say where the stream stood at the loss,
    moves its mark back to 2 and sends 3..8 in order; a restart does not do it again."""
    async with scene(tmp_path, "audit-loss") as sc:
        appended = await sc.lose_an_outbox()
        assert await sc.store.get_meta(PUBLISHED_MARK) == "6"  # the mark covers the lost ones

        bus = sc.bus()
        await bus.start()
        try:
            [loss] = await bus.outbox_losses()
            log = await sc.audit(bus)
            for i in range(7, 9):
                sc.clock.advance(1)
                appended.append(await log.append(decision(i)))
            # Handed to the bus now, 7 and 8 would move the mark past 3..6 for good.
            assert bus.outbox.pending == 0, "newer records went to the bus before the loss was met"
            sc.srv.start()
            await wait_until(lambda: bus.connected, 10, "the bus to connect")
            await wait_until(lambda: log.publish_backlog == 0, 15, "the records sent again")
            assert await bus.flush(timeout_s=10)
            assert await stored_records(bus, sc.s.audit) == appended  # in order, each once
            await log.close()
            assert json.loads(await sc.store.get_meta("audit.outbox_losses_handled") or "") == [
                loss.id
            ]
            assert await sc.store.get_meta(PUBLISHED_MARK) == "8"
        finally:
            await bus.close()

        bus = sc.bus()  # the next start: the loss is still noted by the bus, and handled
        await bus.start()
        try:
            assert [x.id for x in await bus.outbox_losses()] == [loss.id]
            log = await sc.audit(bus)
            await log.flush()
            assert bus.stats.published == 0 and log.publish_backlog == 0
            await log.close()
        finally:
            await bus.close()


async def test_a_record_the_bus_set_aside_for_its_size_goes_compressed_or_is_listed(
    tmp_path: Path,
) -> None:
    """A broker with a 64 KiB max_payload, never reached before: the bus can only assume nats-
    server's 1 MiB default, so it takes a 100 KB record (1) and a 174 KB one that compresses
    badly (2), both below the log's 256 KiB compression threshold, and sets them aside once the
    broker answers. Before, the log was never told: neither reached the bus, too_large_for_bus
    stayed empty. Now record 1 goes again compressed under its event id and record 2, 90 KB even
    compressed, is listed in too_large_for_bus; the records after them go on."""
    async with scene(tmp_path, "audit-size", max_payload=64 * 1024) as sc:
        bus = sc.bus()
        await bus.start()
        try:
            assert not bus.connected and not bus.max_payload_known
            log = await sc.audit(bus)
            appended = []
            decisions = [
                decision(0),
                decision(1, 2000),
                decision(2, 1100, incompressible=True),
                decision(3),
            ]
            for d in decisions:
                sc.clock.advance(1)
                appended.append(await log.append(d))
            await log.flush()
            assert 64 * 1024 < appended[1].ByteSize() < appended[2].ByteSize() < 256 * 1024
            assert bus.outbox.pending == 4

            sc.srv.start()
            await wait_until(lambda: log.too_large_for_bus == [2], 10, "record 2 listed")
            await wait_until(lambda: bus.outbox.pending == 0, 10, "record 1 sent compressed")
            assert await bus.flush(timeout_s=10)
            events = await stored_events(bus, sc.s.audit)
            assert [e.event_id for e in events] == [f"audit-{appended[i].hash}" for i in (0, 3, 1)]
            assert events[2].WhichOneof("payload") == "audit_zlib"
            assert await stored_records(bus, sc.s.audit) == [appended[i] for i in (0, 3, 1)]
            assert await bus.outbox.unreported_set_aside() == []  # both dealt with
            await log.close()
            assert await sc.store.get_meta(PUBLISHED_MARK) == "3"
        finally:
            await bus.close()


async def test_a_bus_that_cannot_tell_its_losses_yet_never_stops_a_record(tmp_path: Path) -> None:
    """The losses are the bus's outbox file's to tell; while it cannot (here: not started yet),
    decisions are still recorded, and reach the bus once it can. Before, open() asked at once
    and raised ("bus not started"), and with it every append: no decision could be recorded."""
    async with scene(tmp_path, "audit-early") as sc:
        sc.srv.start()
        bus = sc.bus()
        try:
            log = await sc.audit(bus)
            sc.clock.advance(1)
            record = await log.append(decision(0))
            assert bus.outbox.pending == 0  # waits in the store
            await bus.start()
            await wait_until(lambda: log.publish_backlog == 0, 10, "the record published")
            assert await bus.flush(timeout_s=10)
            assert await stored_records(bus, sc.s.audit) == [record]
            await log.close()
        finally:
            await bus.close()


def test_the_record_a_stored_event_carries_is_read_compressed_or_not() -> None:
    """What ``last_stored`` hands back may be a record sent compressed; an event inflating past
    the limit (a zlib bomb) or carrying no record is not taken for one."""
    record = seal(build_record(decision(4, 300), now_s=1e9), seq=4, prev_hash="")
    plain = Event(event_id="a", audit=record)
    packed = Event(event_id="a", audit_zlib=zlib.compress(record.SerializeToString(), 1))
    assert _record_of(plain) == record == _record_of(packed)
    assert _record_of(Event(event_id="x")) is None
    with pytest.raises(ValueError, match="256 MiB"):
        _record_of(Event(audit_zlib=zlib.compress(b"\0" * (257 * 1024 * 1024), 9)))
