"""The outbox's cap (``[bus] outbox_max_bytes``): while the broker is away the outbox grows, and
before the cap it grew until the disk was full and every write failed with SQLite's own error.
At the cap an append is refused whole, naming the cap, and nothing the outbox holds is dropped;
what it took reaches the stream once the broker is back (a real nats-server, stopped)."""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

import pytest
from bus_testkit import NatsServer, make_nats_bus, stored_msgs, unique_site, wait_until
from evcore.bus import OutboxFull, Subjects, parse_bus_config
from evcore.bus.natsbus import NatsBus
from evcore.bus.outbox import Outbox, SetAside, entry_bytes
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
    return [(m.headers or {}).get("Nats-Msg-Id", "") for m in await stored_msgs(bus, subject)]


async def test_a_bus_whose_broker_is_away_refuses_at_outbox_max_bytes_and_sends_all_it_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = NatsServer(tmp_path / "js")  # not started: the broker is away from the start
    site = unique_site()
    subject = Subjects(site).transaction("C1")
    bus = make_nats_bus(
        site, srv.url, tmp_path / "outbox", outbox_max_bytes=20_000, connect_timeout_s=0.5
    )
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


def _on_disk(path: Path) -> tuple[int, int]:
    """What the outbox file holds, as the cap counts it: (queue bytes, set-aside bytes)."""
    db = sqlite3.connect(path)
    try:
        return tuple(  # type: ignore[return-value]
            int(
                db.execute(
                    "SELECT COALESCE(SUM(length(CAST(subject AS BLOB))"
                    f" + length(CAST(event_id AS BLOB)) + length(payload)), 0) FROM {table}"
                ).fetchone()[0]
            )
            for table in ("outbox", "outbox_set_aside")
        )
    finally:
        db.close()


async def test_set_aside_entries_count_against_the_cap_until_their_publisher_dealt_with_them(
    tmp_path: Path,
) -> None:
    """An entry the broker can never take is moved to ``outbox_set_aside`` and kept on disk. It
    left the cap's count when it left the queue, so the queue took the cap again beside it: a
    200,000-byte transaction set aside under a 300,000-byte cap, and the outbox took 286 more
    entries of 1,046 bytes (499,199 bytes in the file; now 95). It counts until its publisher
    says it dealt with it (its payload is then dropped, the row kept)."""
    srv = NatsServer(tmp_path / "js", max_payload=64 * 1024)  # not started yet
    site = unique_site()
    s = Subjects(site)
    cap = 300_000
    bus = make_nats_bus(
        site, srv.url, tmp_path / "outbox", outbox_max_bytes=cap, connect_timeout_s=0.2
    )
    await bus.start()
    path = bus.outbox.path
    try:
        # Accepted against nats-server's default max_payload (1 MiB): no broker answered yet.
        await bus.publish(s.transaction("C1"), b"B" * 200_000, event_id="big")
        srv.start()
        assert await bus.flush(timeout_s=20), bus.stats
        assert bus.stats.set_aside == 1
        big = entry_bytes(s.transaction("C1"), "big", b"B" * 200_000)
        assert _on_disk(path) == (0, big)
        assert bus.stats.outbox_bytes == big
        srv.kill()
        await wait_until(lambda: not bus.connected, 10, "the bus to see the broker gone")
        taken = 0
        with pytest.raises(OutboxFull, match="set aside") as refused:
            for i in range(1000):
                await bus.publish(s.transaction("C2"), b"t" * 1000, event_id=f"tx-{i:03}")
                taken += 1
        assert "outbox_max_bytes = 300000" in str(refused.value)
        queue, aside = _on_disk(path)
        assert aside == big and queue + aside <= cap, (taken, queue, aside)
        assert bus.stats.outbox_bytes == queue + aside
        # Its publisher deals with it (sends it otherwise, or records that it is not on the
        # bus): the payload goes, the row stays, and the room comes back.
        dealt: list[SetAside] = []

        async def listener(entry: SetAside) -> bool:
            dealt.append(entry)
            return True

        bus.on_set_aside(s.transaction(), listener)
        await wait_until(lambda: bus.stats.outbox_bytes < queue + aside, 10, "the room back")
        assert [e.event_id for e in dealt] == ["big"] and len(dealt[0].payload) == 200_000
        rows = [(e.event_id, e.payload) for e, _ in await bus.outbox.set_aside_entries()]
        assert rows == [("big", b"")]
        assert _on_disk(path) == (queue, entry_bytes(s.transaction("C1"), "big", b""))
        await bus.publish(s.transaction("C2"), b"t" * 1000, event_id="tx-more")
        assert sum(_on_disk(path)) == bus.stats.outbox_bytes <= cap
    finally:
        await bus.close()
        srv.kill()
    # Counted again from the file at the next open, the set-aside row included.
    again = Outbox(path, max_bytes=cap)
    await again.open()
    try:
        assert again.held_bytes == sum(_on_disk(path))
    finally:
        await again.close()
