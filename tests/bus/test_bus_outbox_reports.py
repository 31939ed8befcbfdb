"""What the NATS bus's outbox accepted and will never send reaches its publisher, on a real
nats-server of the test's own: an outbox file found unreadable keeps every entry that can still be
read and says where the streams stood (review 2027-01, docs/audit.md: its audit records were lost
from the bus, the publish mark covered them); an entry set aside for its size is handed to the
publisher's listener (a record accepted against the 1 MiB default before the broker first
answered was set aside without the audit log knowing)."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from pathlib import Path

import nats.js.errors
import pytest
from bus_testkit import NatsServer, make_nats_bus, wait_until
from evcore.audit import AuditLog, Decision
from evcore.audit.log import PUBLISHED_MARK
from evcore.bus import BusUnavailable, OutboxReports, SetAside, Subjects
from evcore.bus.natsbus import NatsBus
from evcore.bus.streams import stream_for_subject
from evcore.clock import ManualClock
from evcore.store import SqlStore, open_store
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.event_pb2 import Event
from evcore.v1.setpoint_pb2 import Setpoint

pytestmark = pytest.mark.timeout(120)

PAGE_SIZE = 4096  # SQLite's default, the outbox's
TABLE_LEAF = 0x0D  # the page type byte of a table b-tree leaf


def decision(i: int, chargers: int = 1) -> Decision:
    return Decision(
        f"D{i}",
        "tick",
        inputs_digest=f"{i:064x}",
        setpoints=[
            Setpoint(charger_id=f"C{c:04d}", setpoint_a=16.0, reason=f"held at 16 A ({i}, {c})")
            for c in range(chargers)
        ],
    )


def record_of(event: Event) -> AuditRecord:
    if event.WhichOneof("payload") == "audit_zlib":
        return AuditRecord.FromString(zlib.decompress(event.audit_zlib))
    return event.audit


async def stored_records(bus: NatsBus, subject: str) -> list[AuditRecord]:
    """Every audit record the stream holds on ``subject``, in stream order."""
    spec = stream_for_subject(bus.streams, subject)
    assert spec is not None
    info = await bus._js.stream_info(spec.name)
    out: list[AuditRecord] = []
    if not info.state.messages:
        return out
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            m = await bus._js.get_msg(spec.name, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        if m.subject == subject:
            out.append(record_of(Event.FromString(m.data or b"")))
    return out


def tear_the_page_holding(path: Path, marker: bytes) -> None:
    """Overwrite the table leaf page holding ``marker`` (an entry's event id) with 0xFF, as a
    torn write would leave it."""
    data = bytearray(path.read_bytes())
    for page in range(len(data) // PAGE_SIZE):
        start = page * PAGE_SIZE
        header = start + (100 if page == 0 else 0)
        if data[header] == TABLE_LEAF and marker in data[start : start + PAGE_SIZE]:
            data[start : start + PAGE_SIZE] = b"\xff" * PAGE_SIZE
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no leaf page holds {marker!r}")


async def open_audit(store: SqlStore, bus: NatsBus, site: str, clock: ManualClock) -> AuditLog:
    log = AuditLog(store, clock=clock, bus=bus, site_id=site)
    await log.open()
    return log


async def test_an_unreadable_outbox_still_sends_every_audit_record_it_can_read(
    tmp_path: Path,
) -> None:
    """Twelve audit records wait in the outbox (broker down; the publish mark covers them all);
    a torn page makes the file unreadable. Before, the outbox was set aside whole and started
    empty: none of the twelve ever reached the bus (the review's finding). Now the new outbox
    holds every entry that still reads, and those reach JetStream in their order; the loss says
    what could not be read."""
    srv = NatsServer(tmp_path / "js")
    site = f"loss-{uuid.uuid4().hex[:8]}"
    s = Subjects(site)
    clock = ManualClock()
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    outbox = tmp_path / "outbox"
    try:
        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        log = await open_audit(store, bus, site, clock)
        appended: list[AuditRecord] = []
        for i in range(12):
            clock.advance(1)
            appended.append(await log.append(decision(i, chargers=40)))  # about 2.5 KB each
        await log.close()
        assert bus.outbox.pending == 12
        assert await store.get_meta(PUBLISHED_MARK) == str(appended[-1].seq)
        path = bus.outbox.path
        await bus.close()
        torn = appended[6]
        tear_the_page_holding(path, f"audit-{torn.hash}".encode())

        srv.start()
        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        try:
            log = await open_audit(store, bus, site, clock)
            await log.flush()
            assert bus.stats.published == 0, "the mark covers them: the audit log sends none"
            assert await bus.flush(timeout_s=30)
            got = await stored_records(bus, s.audit)
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
            await log.close()
        finally:
            await bus.close()
    finally:
        await store.close()
        srv.kill()


async def test_after_an_outbox_loss_the_publisher_learns_from_where_to_send_again(
    tmp_path: Path,
) -> None:
    """An outbox that cannot be read at all (its header gone) keeps nothing. The bus notes the
    loss in the new file and, when the broker is first reached again, where each stream stood
    before it sends anything more: ``last_stored(subject, before_loss=)`` then names the last
    record the stream held before the loss, even once later records were sent, so the audit log
    can move its publish mark back to it (done here by hand: docs/bus.md) and every record
    reaches the stream once."""
    srv = NatsServer(tmp_path / "js")
    srv.start()
    site = f"loss-{uuid.uuid4().hex[:8]}"
    s = Subjects(site)
    clock = ManualClock()
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    outbox = tmp_path / "outbox"
    appended: list[AuditRecord] = []
    try:
        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        assert isinstance(bus, OutboxReports)
        log = await open_audit(store, bus, site, clock)
        for i in range(3):  # these reach the stream
            clock.advance(1)
            appended.append(await log.append(decision(i)))
        await log.flush()
        assert await bus.flush(timeout_s=30)
        srv.kill()
        for i in range(3, 7):  # these wait in the outbox, and are lost with it
            clock.advance(1)
            appended.append(await log.append(decision(i)))
        await log.close()
        path = bus.outbox.path
        await bus.close()
        path.write_bytes(b"\0" * 100 + path.read_bytes()[100:])  # SQLite's header gone

        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        try:
            [loss] = await bus.outbox_losses()
            assert loss.salvaged == 0 and not loss.complete and loss.stream_last_seq is None
            with pytest.raises(BusUnavailable, match="not been reached since"):
                await bus.last_stored(s.audit, before_loss=loss)
            log = await open_audit(store, bus, site, clock)
            for i in range(7, 9):  # accepted after the loss, sent once the broker is back
                clock.advance(1)
                appended.append(await log.append(decision(i)))
            await log.close()
            srv.start()
            await wait_until(lambda: bus.connected, 30, "the bus to connect")
            assert await bus.flush(timeout_s=30)
            assert [r.seq for r in await stored_records(bus, s.audit)] == [0, 1, 2, 7, 8]

            newest = await bus.last_stored(s.audit)
            assert newest is not None and record_of(Event.FromString(newest.data)).seq == 8
            before = await bus.last_stored(s.audit, before_loss=loss)
            assert before is not None and before.event_id == f"audit-{appended[2].hash}"
            assert record_of(Event.FromString(before.data)) == appended[2]
        finally:
            await bus.close()

        # The audit side's part (docs/bus.md): the mark back to the last record stored before
        # the loss, then an ordinary open republishes what follows it.
        bus = make_nats_bus(site, srv.url, outbox)
        await bus.start()
        try:
            [loss] = await bus.outbox_losses()  # kept, with where the streams stood
            assert loss.stream_last_seq is not None
            before = await bus.last_stored(s.audit, before_loss=loss)
            assert before is not None
            await store.set_meta(PUBLISHED_MARK, str(record_of(Event.FromString(before.data)).seq))
            log = await open_audit(store, bus, site, clock)
            await log.flush()
            assert await bus.flush(timeout_s=30)
            got = await stored_records(bus, s.audit)
            assert sorted(r.seq for r in got) == [r.seq for r in appended]  # each once
            assert sorted(got, key=lambda r: r.seq) == appended
            await log.close()
        finally:
            await bus.close()
    finally:
        await store.close()
        srv.kill()


async def test_a_record_set_aside_for_its_size_is_handed_to_its_publisher(tmp_path: Path) -> None:
    """A broker with a 64 KiB max_payload, never reached before: the bus can only assume nats-
    server's 1 MiB default and takes a 100 KB audit record (below the audit log's 256 KiB
    compression threshold). Before, the pump set it aside once the broker answered and nobody was
    told: not compressed, not in too_large_for_bus, never on the bus. Now it goes to the listener
    of its subject (offered again while the listener cannot deal with it, and at the next start
    until one does); the listener here does what the audit log is to do (docs/bus.md): send it
    compressed under the same event id. An entry of another subject waits for its own listener."""
    srv = NatsServer(tmp_path / "js", max_payload=64 * 1024)
    site = f"size-{uuid.uuid4().hex[:8]}"
    s = Subjects(site)
    clock = ManualClock()
    store: SqlStore = open_store({"path": str(tmp_path / "store")}, tmp_path)
    await store.open()
    outbox = tmp_path / "outbox"
    offered: list[SetAside] = []
    resent: list[str] = []
    try:
        bus = make_nats_bus(site, srv.url, outbox)
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
        log = await open_audit(store, bus, site, clock)
        appended = []
        for i, chargers in enumerate((1, 2000, 1)):
            clock.advance(1)
            appended.append(await log.append(decision(i, chargers)))
        await log.flush()
        assert 64 * 1024 < appended[1].ByteSize() < 256 * 1024
        await bus.publish(s.setpoint("C1"), b"s" * 100_000, event_id="big-setpoint")
        assert bus.outbox.pending == 4

        srv.start()
        await wait_until(lambda: bool(resent), 30, "the set-aside record sent compressed")
        assert bus.max_payload == 64 * 1024 and bus.max_payload_known
        assert [e.event_id for e in offered] == [f"audit-{appended[1].hash}"] * 2
        assert "max_payload of 65536" in offered[0].reason
        assert await bus.flush(timeout_s=30)
        assert await stored_records(bus, s.audit) == [appended[0], appended[2], appended[1]]
        assert log.too_large_for_bus == []  # (the audit log was never told: docs/bus.md)
        await log.close()
        await bus.close()

        # The next start, broker away: the figure is known, the record dealt with is not offered
        # again; the setpoint no listener took is, to the first that listens for it.
        srv.kill()
        bus = make_nats_bus(site, srv.url, outbox)
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
    finally:
        await store.close()
        srv.kill()
