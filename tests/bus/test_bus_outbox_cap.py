"""The outbox's cap (``[bus] outbox_max_bytes``): while the broker is away the outbox grows, and
before the cap it grew until the disk was full and every write failed with SQLite's own error.
At the cap an append is refused whole, naming the cap, and nothing the outbox holds is dropped;
what it took reaches the stream once the broker is back (a real nats-server, stopped)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import nats.js.errors
import pytest
from bus_testkit import NatsServer, unique_site
from evcore.bus import OutboxFull, Subjects, parse_bus_config
from evcore.bus.natsbus import NatsBus
from evcore.bus.outbox import Outbox, entry_bytes
from evcore.bus.streams import stream_for_subject
from evcore.clock import WallClock

SUBJECT = "evcore.s.audit"


async def test_an_outbox_at_its_cap_refuses_whole_appends_naming_it_and_keeps_what_it_holds(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path, max_bytes=10_000)
    await ob.open()
    accepted = 0
    try:
        with pytest.raises(OutboxFull) as refused:
            for i in range(100):
                await ob.append(SUBJECT, f"e{i}", b"x" * 1000, 0.0)
                accepted += 1
        # 1016 bytes an entry: nine fit under 10,000, the tenth would pass it.
        assert accepted == 9 and ob.held_bytes == 9 * entry_bytes(SUBJECT, "e0", b"x" * 1000)
        assert refused.value.errno == errno.ENOSPC
        assert "outbox_max_bytes = 10000" in str(refused.value)
        assert str(path) in str(refused.value) and "e9" in str(refused.value)
        assert ob.refused == 1 and ob.pending == 9
        # A batch that does not fit is refused whole (a decision's setpoints are not split).
        with pytest.raises(OutboxFull, match="2 events"):
            await ob.append_many(
                [(SUBJECT, "m1", b"y" * 800, 0.0), (SUBJECT, "m2", b"y" * 100, 0.0)]
            )
        assert [e.event_id for e in await ob.peek(100)] == [f"e{i}" for i in range(9)]
        # Room is made as entries leave: two removed, one more taken.
        first = (await ob.peek(2))[1].seq
        await ob.remove_through(first)
        await ob.append(SUBJECT, "late", b"z" * 1000, 0.0)
        assert ob.pending == 8
    finally:
        await ob.close()
    # Counted again from the file at the next open: still at the cap.
    again = Outbox(path, max_bytes=10_000)
    await again.open()
    try:
        assert again.held_bytes == ob.held_bytes
        await again.append(SUBJECT, "e-", b"x" * 1000, 0.0)
        with pytest.raises(OutboxFull, match="outbox_max_bytes = 10000"):
            await again.append(SUBJECT, "e+", b"x" * 1000, 0.0)
        # An empty outbox takes any one entry, even above the cap: otherwise its publisher,
        # retrying it in order, would hold every later event of its off the bus for good.
        await again.remove_through((await again.peek(100))[-1].seq)
        assert again.held_bytes == 0
        await again.append(SUBJECT, "big", b"b" * 20_000, 0.0)
        with pytest.raises(OutboxFull):
            await again.append(SUBJECT, "next", b"n", 0.0)
    finally:
        await again.close()


def test_outbox_max_bytes_is_a_bus_key_with_a_default(tmp_path: Path) -> None:
    assert parse_bus_config(None).outbox_max_bytes == 1 << 30
    assert parse_bus_config({"outbox_max_bytes": 5_000_000}).outbox_max_bytes == 5_000_000
    for bad in (0, -1, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="outbox_max_bytes"):
            parse_bus_config({"outbox_max_bytes": bad})


async def _stored_ids(bus: NatsBus, subject: str) -> list[str]:
    spec = stream_for_subject(bus.streams, subject)
    assert spec is not None
    info = await bus._js.stream_info(spec.name)
    ids: list[str] = []
    for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
        try:
            m = await bus._js.get_msg(spec.name, seq=seq)
        except nats.js.errors.NotFoundError:
            continue
        if m.subject == subject:
            ids.append((m.headers or {}).get("Nats-Msg-Id", ""))
    return ids


async def test_a_bus_whose_broker_is_away_refuses_at_outbox_max_bytes_and_sends_all_it_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = NatsServer(tmp_path / "js")  # not started: the broker is away from the start
    site = unique_site()
    subject = Subjects(site).transaction("C1")
    cfg = parse_bus_config(
        {
            "kind": "nats",
            "urls": [srv.url],
            "outbox_dir": str(tmp_path / "outbox"),
            "outbox_max_bytes": 20_000,
            "connect_timeout_s": 0.5,
            "reconnect_wait_s": 0.1,
            "publish_timeout_s": 1.0,
        }
    )
    bus = NatsBus(site, cfg, clock=WallClock(), ack_wait_s=2.0)
    await bus.start()
    try:
        assert not bus.connected
        taken: list[str] = []
        with caplog.at_level(logging.ERROR, logger="evcore.bus.outbox"):
            with pytest.raises(OutboxFull) as refused:
                for i in range(1000):
                    taken.append(await bus.publish(subject, b"t" * 1000, event_id=f"tx-{i}"))
        assert "outbox_max_bytes = 20000" in str(refused.value)
        assert 15 <= len(taken) <= 20, len(taken)
        stats = bus.stats
        assert stats.outbox_refused == 1 and stats.outbox_pending == len(taken)
        assert stats.outbox_bytes <= 20_000
        assert any("outbox_max_bytes = 20000" in r.getMessage() for r in caplog.records)
        # The broker comes back: everything the outbox took reaches the stream, in order, and
        # the outbox takes events again.
        srv.start()
        assert await bus.flush(timeout_s=20), bus.stats
        assert await _stored_ids(bus, subject) == taken
        assert bus.stats.outbox_bytes == 0
        await bus.publish(subject, b"after", event_id="tx-after")
        assert await bus.flush(timeout_s=10)
        assert (await _stored_ids(bus, subject))[-1] == "tx-after"
    finally:
        if bus.connected:
            await bus.delete_streams()
        await bus.close()
        srv.kill()


async def test_audit_records_yield_the_last_room_to_events_with_no_other_copy(
    tmp_path: Path,
) -> None:
    """Audit records are in the audit log's store before the bus sees them (it sends a refused
    one again); a transaction or a fault has no other copy. Audit records filling the outbox
    refused every other critical event too; now they are refused at 90 % of the cap and the rest
    stays for the others."""
    srv = NatsServer(tmp_path / "js")  # never started: the broker is away
    site = unique_site()
    s = Subjects(site)
    cfg = parse_bus_config(
        {
            "kind": "nats",
            "urls": [srv.url],
            "outbox_dir": str(tmp_path / "outbox"),
            "outbox_max_bytes": 20_000,
            "connect_timeout_s": 0.2,
        }
    )
    bus = NatsBus(site, cfg, clock=WallClock())
    await bus.start()
    try:
        with pytest.raises(OutboxFull, match=r"90% of \[bus\] outbox_max_bytes = 20000"):
            for i in range(1000):
                await bus.publish(s.audit, b"a" * 1000, event_id=f"audit-{i}")
        held = bus.stats.outbox_bytes
        assert 17_000 < held <= 18_000, held
        taken = []
        with pytest.raises(OutboxFull, match=r"\[bus\] outbox_max_bytes = 20000; refused"):
            for i in range(1000):
                taken.append(await bus.publish(s.transaction("C1"), b"t" * 500, event_id=f"tx-{i}"))
        assert len(taken) >= 3 and bus.stats.outbox_bytes <= 20_000
        # A batch of audit records alone yields too.
        with pytest.raises(OutboxFull, match="90%"):
            await bus.publish_many([(s.audit, b"x", "audit-m")], critical=True)
    finally:
        await bus.close()
        srv.kill()
