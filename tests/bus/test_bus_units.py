"""Unit tests of the bus's pure parts: subject escaping, matching, config, outbox, processed ids."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import SHARED_NATS, unique_site, wait_until
from evcore.bus import (
    BadPayload,
    BusConfig,
    BusMessage,
    InProcessBus,
    ProcessedIds,
    Subjects,
    bus_from_config,
    decode,
    escape_token,
    parse_bus_config,
    subject_matches,
    unescape_token,
)
from evcore.bus.config import default_streams
from evcore.bus.natsbus import NatsBus
from evcore.bus.outbox import Outbox, OutboxFull, OutboxLoss, entry_bytes
from evcore.bus.streams import stream_for_pattern, stream_for_subject
from evcore.bus.subjects import CRITICAL_KINDS, name_token, validate_subject
from evcore.clock import ManualClock, WallClock
from evcore.v1 import event_pb2, meter_pb2
from hypothesis import given
from hypothesis import strategies as st


@given(st.text(min_size=1))
def test_escape_roundtrip_single_token(raw: str) -> None:
    tok = escape_token(raw)
    assert unescape_token(tok) == raw
    assert "." not in tok and "*" not in tok and ">" not in tok
    assert not any(c.isspace() for c in tok)
    validate_subject(f"evcore.{tok}.status", wildcards=False)


@given(st.text(min_size=1), st.text(min_size=1))
def test_name_token_injective_and_safe(a: str, b: str) -> None:
    ta, tb = name_token(a), name_token(b)
    assert all(c.isascii() and (c.isalnum() or c in "-_") for c in ta)
    assert (ta == tb) == (a == b)


def test_escape_examples_and_errors() -> None:
    assert escape_token("CP.1") == "CP%2E1"
    assert escape_token("a>b*c d") == "a%3Eb%2Ac%20d"
    assert escape_token("100%") == "100%25"
    with pytest.raises(ValueError, match="empty"):
        escape_token("")
    with pytest.raises(ValueError, match="bad escape"):
        unescape_token("a%2")
    with pytest.raises(ValueError, match="cannot appear"):
        unescape_token("a.b")


def test_subjects_layout() -> None:
    s = Subjects("depot 1")
    assert s.telemetry("C.1") == "evcore.depot%201.telemetry.C%2E1"
    assert s.telemetry() == "evcore.depot%201.telemetry.*"
    assert s.audit == "evcore.depot%201.audit"
    assert s.all == "evcore.depot%201.>"
    assert s.charger_of(s.setpoint("x>y")) == "x>y"
    assert s.kind_of(s.transaction("a")) == "transaction"
    assert s.kind_of("evcore.other.audit") == ""
    assert s.charger_of(s.telemetry()) is None


@pytest.mark.parametrize(
    ("pattern", "subject", "match"),
    [
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.*", "a.b.c", False),
        ("a.b", "a.b", True),
        ("*", "a", True),
    ],
)
def test_subject_matches(pattern: str, subject: str, match: bool) -> None:
    assert subject_matches(pattern, subject) is match


def test_validate_subject_errors() -> None:
    for bad, msg in [
        ("", "empty"),
        ("a..b", "empty token"),
        ("a.b c", "whitespace"),
        ("a.>.b", "last token"),
        ("a.b*", "whole tokens"),
        ("a." + "%C3%BC" * 700, "subject of 4202 bytes"),
    ]:
        with pytest.raises(ValueError, match=msg):
            validate_subject(bad, wildcards=True)
    with pytest.raises(ValueError, match="wildcards"):
        validate_subject("a.*", wildcards=False)


def test_streams_cover_critical_subjects_and_patterns() -> None:
    specs = default_streams("d")
    s = Subjects("d")
    for subj in (
        s.audit,
        s.setpoint("c"),
        s.transaction("c"),
        s.grid,
        s.plan,
        s.status("c"),
        s.station_event("CP.1"),
    ):
        spec = stream_for_subject(specs, subj)
        assert spec is not None and spec.name.endswith("_EVENTS")
    # Station notifications (security events…) must not be lost: the outbox class on NATS.
    assert s.station_event("CP.1") == "evcore.d.station_event.CP%2E1"
    assert s.kind_of(s.station_event("CP.1")) in CRITICAL_KINDS
    assert stream_for_pattern(specs, s.station_event()).name.endswith("_EVENTS")
    tele = stream_for_subject(specs, s.telemetry("c"))
    assert tele is not None and tele.name.endswith("_TELEMETRY")
    assert stream_for_subject(specs, s.rpc("x")) is None
    assert stream_for_pattern(specs, s.setpoint()).name.endswith("_EVENTS")
    with pytest.raises(ValueError, match="no stream stores"):
        stream_for_pattern(specs, s.all)


def test_parse_bus_config_defaults_and_errors(tmp_path: Path) -> None:
    assert parse_bus_config(None).kind == "inprocess"
    cfg = parse_bus_config({"kind": "nats", "url": "nats://h:1", "replicas": 3})
    assert cfg.urls == ("nats://h:1",) and cfg.replicas == 3 and cfg.jetstream_domain == ""
    assert parse_bus_config({"jetstream_domain": "cloud"}).jetstream_domain == "cloud"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"kind": "kafka"}, "kind must be one of"),
        ({"kind": "nats", "url": "http://x"}, "must start with nats://"),
        ({"urls": []}, "non-empty list"),
        ({"url": "nats://a", "urls": ["nats://b"]}, "either url or urls"),
        ({"replicas": 0}, "replicas must be a positive integer"),
        ({"replicas": 7}, "1..5"),
        ({"publish_timeout_s": -1}, "publish_timeout_s must be > 0"),
        ({"publish_timeout_s": "2"}, "publish_timeout_s must be a finite number"),
        ({"events_max_age_s": float("inf")}, "events_max_age_s must be a finite number"),
        ({"telemetry_max_bytes": 2**70}, "telemetry_max_bytes must be a positive integer below"),
        ({"storage": "disk"}, "storage must be"),
        ({"outbx_dir": "x"}, "unknown key"),
        ({"manage_streams": "yes"}, "true or false"),
        ({"jetstream_domain": "cloud one"}, "jetstream_domain must be a name"),
        ({"jetstream_domain": 5}, "jetstream_domain must be a name"),
        (
            {"duplicate_window_s": 120, "events_max_age_s": 60},
            r"duplicate_window_s \(120\) must not exceed events_max_age_s \(60\)",
        ),
    ]
    for section, msg in bad:
        with pytest.raises(ValueError, match=msg):
            parse_bus_config(section)
    clock = ManualClock()
    assert isinstance(bus_from_config(None, "s", clock), InProcessBus)
    nb = bus_from_config({"kind": "nats", "outbox_dir": str(tmp_path)}, "s.1", clock)
    assert isinstance(nb, NatsBus)
    assert nb.outbox.path == tmp_path / "s%2E1.sqlite"


def test_decode_reasons() -> None:
    with pytest.raises(BadPayload, match=r"not a valid evcore\.v1\.MeterSample"):
        decode(meter_pb2.MeterSample, b"\xff\xff\xff")
    with pytest.raises(BadPayload, match="without event_id"):
        decode(event_pb2.Event, event_pb2.Event(site_id="s").SerializeToString())
    with pytest.raises(BadPayload, match="has no payload"):
        decode(event_pb2.Event, event_pb2.Event(event_id="e").SerializeToString())
    ok = decode(meter_pb2.MeterSample, meter_pb2.MeterSample(charger_id="c").SerializeToString())
    assert ok.charger_id == "c"


async def test_outbox_order_persistence_and_group_commit(tmp_path: Path) -> None:
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path)
    await ob.open()
    seqs = await asyncio.gather(
        *(ob.append("evcore.s.audit", f"e{i}", str(i).encode(), 0.0) for i in range(100))
    )
    assert seqs == sorted(seqs) and len(set(seqs)) == 100
    assert ob.pending == 100
    first = await ob.peek(10)
    assert [e.event_id for e in first] == [f"e{i}" for i in range(10)]
    await ob.remove_through(first[4].seq)
    assert ob.pending == 95
    await ob.close()
    # A new process finds what was accepted and not confirmed, in order.
    again = Outbox(path)
    await again.open()
    assert again.pending == 95 and again.nonempty.is_set()
    rest = await again.peek(1000)
    assert [e.payload for e in rest] == [str(i).encode() for i in range(5, 100)]
    await again.close()


async def test_an_unreadable_outbox_is_moved_aside_and_an_empty_one_serves(
    tmp_path: Path,
) -> None:
    """Review 2026-12-05: a garbage outbox file made NatsBus.start raise "file is not a
    database" and the edge could never start. Now it is kept aside and an empty one serves."""
    path = tmp_path / "ob.sqlite"
    path.write_bytes(b"garbage" * 200)
    ob = Outbox(path)
    await ob.open()
    assert ob.corrupt_moved_to is not None and ob.corrupt_moved_to.read_bytes().startswith(b"garb")
    assert ob.pending == 0
    assert ob.loss is not None and ob.loss.salvaged == 0 and not ob.loss.complete
    assert "file is not a database" in ob.loss.detail
    assert await ob.append("evcore.s.audit", "e1", b"1", 0.0) > 0
    assert [e.event_id for e in await ob.peek(10)] == ["e1"]
    await ob.close()
    again = Outbox(path)
    await again.open()
    assert again.loss is None and [x.id for x in await again.losses()] == [ob.loss.id]
    await again.close()


def _payload(i: int) -> bytes:
    return f"payload-{i:04d}|".encode() * 200  # 2.6 KB: about one entry a page


async def _outbox_of(path: Path, n: int) -> None:
    ob = Outbox(path)
    await ob.open()
    for i in range(n):
        await ob.append("evcore.s.audit", f"ev-{i:04d}", _payload(i), float(i))
    await ob.remember("broker_max_payload", "65536")
    await ob.close()


def _damage(path: Path, marker: bytes, *, tear: bool) -> None:
    """Tear (0xFF) the table leaf page holding ``marker``, or change one byte after it there
    (the file's structure intact, the entry's content not)."""
    data = bytearray(path.read_bytes())
    for page in range(len(data) // 4096):
        start = page * 4096
        at = data.find(marker, start, start + 4096)
        if data[start + (100 if page == 0 else 0)] == 0x0D and at >= 0:
            if tear:
                data[start : start + 4096] = b"\xff" * 4096
            else:
                data[at + len(marker) + 20] ^= 0x01
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"no leaf page holds {marker!r}")


async def test_an_unreadable_outbox_keeps_every_entry_that_reads_and_checks_each(
    tmp_path: Path,
) -> None:
    """Review 2027-01 (docs/audit.md): an unreadable outbox was set aside whole, and its audit
    records never reached the bus. The new file keeps, in their order and under their seqs, the
    entries that still read and match the CRC they were stored with (one changed byte drops its
    entry: sent, it would take its event id's place for good), the broker's max_payload figure
    and the notes of earlier losses; the loss names what could not be read."""
    path = tmp_path / "ob.sqlite"
    await _outbox_of(path, 40)
    _damage(path, b"ev-0020", tear=True)
    _damage(path, b"ev-0030", tear=False)
    ob = Outbox(path)
    await ob.open()
    try:
        loss = ob.loss
        assert loss is not None and not loss.complete
        kept = await ob.peek(100)
        ids = [int(e.event_id[3:]) for e in kept]
        assert 30 not in ids and 20 not in ids and ids == sorted(ids)
        assert set(range(40)) - set(ids) <= {19, 20, 21, 30}
        assert loss.salvaged == ob.pending == len(kept)
        assert "1 entry damaged" in loss.detail and "rows after rowid" in loss.detail
        assert [(e.seq, e.payload) for e in kept] == [(i + 1, _payload(i)) for i in ids]
        assert await ob.recall("broker_max_payload") == "65536"
        assert await ob.append("evcore.s.audit", "next", b"n", 99.0) > kept[-1].seq
        assert (await ob.losses())[-1] == loss
    finally:
        await ob.close()
    # Torn again: the note of the first loss is read back beside the second's.
    _damage(path, b"ev-0010", tear=True)
    third = Outbox(path)
    await third.open()
    try:
        assert third.loss is not None
        assert [x.id for x in await third.losses()] == [loss.id, third.loss.id]
    finally:
        await third.close()


async def test_an_outbox_file_of_an_earlier_version_takes_crcs_and_reports(
    tmp_path: Path,
) -> None:
    """A file written before entries carried a CRC and set-aside entries a reported time gets
    both columns at open; what it holds is sent as it is, and an entry set aside in it is
    offered until its publisher says it dealt with it."""
    path = tmp_path / "ob.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL,"
        " event_id TEXT NOT NULL, payload BLOB NOT NULL, accepted_at REAL NOT NULL);"
        "CREATE TABLE outbox_set_aside (seq INTEGER PRIMARY KEY, subject TEXT NOT NULL,"
        " event_id TEXT NOT NULL, payload BLOB NOT NULL, accepted_at REAL NOT NULL,"
        " set_aside_at REAL NOT NULL, reason TEXT NOT NULL);"
        "INSERT INTO outbox VALUES (1, 'evcore.s.audit', 'old-1', x'01', 1.0);"
    )
    db.commit()
    db.close()
    ob = Outbox(path)
    await ob.open()
    try:
        seq = await ob.append("evcore.s.audit", "new-2", b"\x02", 2.0)
        assert [e.event_id for e in await ob.peek(10)] == ["old-1", "new-2"]
        await ob.set_aside(1, 3.0, "too large")
        [aside] = await ob.unreported_set_aside()
        assert (aside.event_id, aside.payload, aside.reason) == ("old-1", b"\x01", "too large")
        await ob.mark_reported(aside.seq, 4.0)
        assert await ob.unreported_set_aside() == []
        assert [e.seq for e in await ob.peek(10)] == [seq]
    finally:
        await ob.close()


async def test_an_outbox_salvage_cut_short_is_finished_at_the_next_open(tmp_path: Path) -> None:
    """The loss is noted before the salvage (a crash during it must not forget the file set
    aside); a note left unfinished is finished at the next open. A file from before entries
    carried a CRC is read back as it is."""
    aside = tmp_path / "ob.sqlite.corrupt-1"
    db = sqlite3.connect(aside)
    db.executescript(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL,"
        " event_id TEXT NOT NULL, payload BLOB NOT NULL, accepted_at REAL NOT NULL);"
        "INSERT INTO outbox VALUES (7, 'evcore.s.audit', 'old-7', x'07', 1.0);"
        "INSERT INTO outbox VALUES (8, 'evcore.s.audit', 'old-8', x'08', 2.0);"
    )
    db.commit()
    db.close()
    path = tmp_path / "ob.sqlite"
    first = Outbox(path)
    await first.open()
    note = OutboxLoss(id=aside.name, moved_to=str(aside), at=1.0, detail="torn")
    await first.remember("loss:" + note.id, note.to_json())  # as a crash mid-salvage leaves it
    await first.close()
    ob = Outbox(path)
    await ob.open()
    try:
        assert [(e.seq, e.event_id, e.payload) for e in await ob.peek(10)] == [
            (7, "old-7", b"\x07"),
            (8, "old-8", b"\x08"),
        ]
        [done] = await ob.losses()
        assert done == ob.loss and done.salvaged == 2 and done.complete
        assert done.detail == "torn"
    finally:
        await ob.close()


async def test_a_full_outbox_reports_that_it_is_full(tmp_path: Path) -> None:
    """Review 2026-12-05: after SQLITE_FULL the explicit ROLLBACK raised "cannot rollback - no
    transaction is active" and hid the cause. A disk that fills before the cap is OutboxFull
    naming the file, the cap and what to change (it was SQLite's bare "database or disk is
    full"). (A page cap stands in for a full disk.)"""
    ob = Outbox(tmp_path / "ob.sqlite", max_bytes=1 << 30)
    await ob.open()
    assert ob._db is not None
    pages = ob._db.execute("PRAGMA page_count").fetchone()[0]
    ob._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(OutboxFull, match="the disk is full") as full:
        for i in range(100):
            await ob.append("evcore.s.audit", f"e{i}", b"x" * 8192, 0.0)
    assert "database or disk is full" in str(full.value)
    assert "outbox_max_bytes = 1073741824" in str(full.value) and str(tmp_path) in str(full.value)
    assert isinstance(full.value.__cause__, sqlite3.OperationalError)
    # What was refused is not counted as held.
    held = [entry_bytes(e.subject, e.event_id, e.payload) for e in await ob.peek(100)]
    assert ob.refused == 1 and ob.held_bytes == sum(held)
    await ob.close()


def test_processed_ids(tmp_path: Path) -> None:
    clock = ManualClock()
    ids = ProcessedIds(tmp_path / "ids.sqlite", "c1", clock=clock)
    assert not ids.contains("a")
    assert ids.add("a") is True
    assert ids.add("a") is False
    assert "a" in ids and ids.count() == 1
    other = ProcessedIds(ids.db, "c2", clock=clock)
    assert not other.contains("a"), "ids are per consumer"
    # commit=False: the id rolls back with the caller's effect.
    ids.add("b", commit=False)
    ids.db.rollback()
    assert not ids.contains("b")
    clock.advance(100)
    ids.add("c")
    assert ids.prune(older_than_s=50) == 1
    assert not ids.contains("a") and ids.contains("c")
    ids.close()
    with pytest.raises(ValueError, match="consumer name"):
        ProcessedIds(sqlite3.connect(":memory:"), "")


async def test_inprocess_duplicate_window_and_limits() -> None:
    clock = ManualClock()
    from evcore.bus.api import StreamSpec

    s = Subjects("w")
    spec = StreamSpec(name="W", subjects=(s.audit,), max_msgs=3, duplicate_window_s=10)
    bus = InProcessBus("w", clock=clock, streams=[spec])
    await bus.start()
    await bus.publish(s.audit, b"1", event_id="x")
    await bus.publish(s.audit, b"1-again", event_id="x")
    clock.advance(11)
    await bus.publish(s.audit, b"1-late", event_id="x")  # outside the window: stored again
    for i in range(5):
        await bus.publish(s.audit, str(i).encode(), event_id=f"n{i}")
    got: list[bytes] = []

    async def h(m: object) -> None:
        got.append(m.data)  # type: ignore[attr-defined]

    await bus.consume(s.audit, durable="d", handler=h)
    for _ in range(20):
        await asyncio.sleep(0)
    assert got == [b"2", b"3", b"4"], "max_msgs keeps the newest three"
    await bus.close()


async def test_inprocess_route_cache_follows_subscriptions_and_stays_bounded() -> None:
    """Subjects are resolved once and cached, yet a subscription started or stopped after a
    subject was cached is honoured at once, and the cache never holds more than its bound."""
    with pytest.raises(ValueError, match="route_cache_size"):
        InProcessBus("r", route_cache_size=-1)
    s = Subjects("r")
    bus = InProcessBus("r", route_cache_size=3)
    await bus.start()
    early: list[str] = []
    late: list[str] = []
    grouped: list[str] = []

    def to(sink: list[str]) -> Callable[[BusMessage], Awaitable[None]]:
        async def handler(m: BusMessage) -> None:
            sink.append(m.event_id)

        return handler

    async def handled(sink: list[str], n: int) -> None:
        # Handlers run in their own tasks: let them take what was offered before a stop.
        for _ in range(500):
            if len(sink) >= n:
                return
            await asyncio.sleep(0.01)

    first = await bus.subscribe(s.status(), to(early))
    await bus.publish(s.status("C1"), b"x", event_id="a1")  # C1 resolved and cached now
    second = await bus.subscribe(s.status("C1"), to(late))
    workers = [await bus.subscribe(s.status(), to(grouped), queue="w") for _ in range(2)]
    await bus.publish(s.status("C1"), b"x", event_id="a2")
    await handled(early, 2)
    await first.stop()
    await bus.publish(s.status("C1"), b"x", event_id="a3")
    await handled(late, 2)
    await handled(grouped, 2)
    await second.stop()
    for w in workers:
        await w.stop()
    await bus.publish(s.status("C1"), b"x", event_id="a4")
    # Stopped subscriptions are not kept alive by the cache (their inboxes would only grow).
    route = bus._route(s.status("C1"))
    assert (route.plain, route.groups) == ((), ())
    # Ten subjects through a cache of three: all stored in order, the cache stays bounded.
    for i in range(10):
        await bus.publish(s.transaction(f"C{i}"), b"t", event_id=f"t{i}")
        assert len(bus._routes) <= 3
    # An invalid subject is refused every time (never cached as valid).
    for _ in range(2):
        with pytest.raises(ValueError, match="wildcards"):
            await bus.publish(s.status(), b"x")
    stored: list[str] = []
    await bus.consume(s.transaction(), durable="d", handler=to(stored))
    await handled(stored, 10)
    await asyncio.sleep(0.05)  # a4, if wrongly delivered, would be handled by now
    assert early == ["a1", "a2"]
    assert late == ["a2", "a3"]
    assert grouped == ["a2", "a3"]  # one member of the queue group each time
    assert stored == [f"t{i}" for i in range(10)]
    await bus.close()


async def _station_event_bus(
    tmp_path: Path, **kwargs: Any
) -> tuple[NatsBus, Subjects, list[str], Callable[[BusMessage], Awaitable[None]]]:
    """A started NATS bus of a new site on the shared server, its subjects, and a handler that
    collects event ids into the list."""
    site = unique_site()
    conf = BusConfig(kind="nats", urls=(SHARED_NATS,), outbox_dir=tmp_path, connect_timeout_s=1.0)
    bus = NatsBus(site, conf, clock=WallClock(), **kwargs)
    await bus.start()
    assert bus.connected, f"nats-server at {SHARED_NATS} unreachable (run .ci/services)"
    got: list[str] = []

    async def collect(m: BusMessage) -> None:
        got.append(m.event_id)

    return bus, Subjects(site), got, collect


async def test_nats_route_cache_is_bounded_and_routes_by_kind(tmp_path: Path) -> None:
    """The NATS bus resolves subjects through the same kind of bounded cache: critical kinds still
    go through the outbox (station events included), invalid subjects are refused every time."""
    bus, s, got, collect = await _station_event_bus(tmp_path, route_cache_size=2)

    try:
        await bus.consume(s.station_event(), durable="se", handler=collect)
        for i in range(5):
            await bus.publish(s.station_event(f"CP.{i}"), b"e", event_id=f"se{i}")
            assert len(bus._routes) <= 2
        assert bus.stats.published == 5
        for _ in range(2):
            with pytest.raises(ValueError, match="wildcards"):
                await bus.publish(s.station_event(), b"x")
        await bus.flush(timeout_s=10.0)
        await wait_until(lambda: len(got) == 5, 20.0, "the station events")
        assert got == [f"se{i}" for i in range(5)]
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_an_outbox_that_cannot_be_opened_for_another_reason_keeps_what_it_holds(
    tmp_path: Path,
) -> None:
    """Review of session 12: every ``sqlite3.DatabaseError`` at open counted as a corrupt file,
    so a healthy outbox that could not be opened for a passing reason (no file handles left, a
    lock, an I/O error) was moved aside and its pending events never sent. Here its WAL file's
    name is taken by a directory: open fails and says so; the events wait for the next open."""
    path = tmp_path / "ob.sqlite"
    ob = Outbox(path)
    await ob.open()
    await ob.append("evcore.s.audit", "rec-1", b"x", 1.0)
    await ob.close()
    wal = f"{path}-wal"
    os.mkdir(wal)  # (closed cleanly: no WAL file is left to clash with)
    blocked = Outbox(path)
    with pytest.raises(sqlite3.DatabaseError):
        await blocked.open()
    assert blocked.corrupt_moved_to is None
    assert sorted(os.listdir(tmp_path)) == ["ob.sqlite", "ob.sqlite-wal"]
    os.rmdir(wal)
    again = Outbox(path)
    await again.open()
    assert again.pending == 1
    assert [e.event_id for e in await again.peek(10)] == ["rec-1"]
    await again.close()


class _FlakyIds:
    """A processed-id store whose ``contains`` fails once and ``add`` once (a locked file)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.contains_calls = 0
        self.add_calls = 0

    def contains(self, event_id: str) -> bool:
        self.contains_calls += 1
        if self.contains_calls == 2:
            raise sqlite3.OperationalError("database is locked")
        return event_id in self.ids

    def add(self, event_id: str, *, commit: bool = True) -> bool:
        self.add_calls += 1
        if self.add_calls == 3:
            raise sqlite3.OperationalError("database is locked")
        new = event_id not in self.ids
        self.ids.add(event_id)
        return new


async def test_an_in_process_durable_consumer_outlives_its_id_store_failing() -> None:
    """Review of session 12: an exception from the processed-id store ended the in-process
    consumer's task: nothing more was delivered and nothing acknowledged (NATS's consumer
    retries). Now the message waits and is tried again; every event is handled."""
    bus = InProcessBus("s1")
    await bus.start()
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    ids = _FlakyIds()
    await bus.consume("evcore.s1.audit", durable="d", handler=handler, dedupe=ids)  # type: ignore[arg-type]
    for i in range(5):
        await bus.publish("evcore.s1.audit", b"x", event_id=f"e{i}")
    await wait_until(lambda: ids.ids == {f"e{i}" for i in range(5)}, 5)
    # The add that failed left its event unbooked: handled again (at least once), in order.
    assert sorted(set(got)) == [f"e{i}" for i in range(5)]
    assert got == sorted(got)
    assert bus.stats.handler_errors == 2
    state = await bus.ack_state("evcore.s1.audit", "e4", durable="d")
    assert state.acknowledged
    await bus.close()


async def test_a_nats_durable_consumer_waits_out_its_id_store_failing_in_order(
    tmp_path: Path,
) -> None:
    """The NATS consumer's id store failing (a locked SQLite file) left the fetched batch
    neither handled nor handed back: it waited for ack_wait (30 s in service) before anything
    was delivered again (before: the 5 events not all handled within 10 s). Now, as in-process,
    the message and those behind it are handed back and tried again after a back-off, in
    order."""
    from bus_testkit import make_nats_bus

    site = unique_site()
    bus = make_nats_bus(site, SHARED_NATS, tmp_path / "outbox", ack_wait_s=30.0)
    await bus.start()
    subject = f"{bus.subjects.root}.audit"
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    ids = _FlakyIds()
    try:
        for i in range(5):
            await bus.publish(subject, b"x", event_id=f"e{i}")
        assert await bus.flush(timeout_s=10)
        await bus.consume(subject, durable="d", handler=handler, dedupe=ids)  # type: ignore[arg-type]
        await wait_until(lambda: ids.ids == {f"e{i}" for i in range(5)}, 10, "every id booked")
        # The add that failed left its event unbooked: handled again (at least once), in order.
        assert sorted(set(got)) == [f"e{i}" for i in range(5)]
        assert got == sorted(got)
        assert bus.stats.handler_errors == 2
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_the_nats_pump_outlives_an_outbox_read_failing(tmp_path: Path) -> None:
    """Review of session 12: an outbox read or removal raising (a locked file, an I/O error)
    ended the pump task for good and silently: publish() went on accepting critical events and
    none left. Real NATS; the outbox's read fails twice (a stand-in for the lock)."""
    bus, s, got, collect = await _station_event_bus(tmp_path)

    real_read = bus.outbox._read_sync
    fails = {"left": 2}

    def flaky_read(limit: int) -> Any:
        if fails["left"]:
            fails["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real_read(limit)

    try:
        await bus.consume(s.station_event(), durable="se", handler=collect)
        bus.outbox._read_sync = flaky_read  # type: ignore[method-assign]
        for i in range(3):
            await bus.publish(s.station_event(f"CP.{i}"), b"e", event_id=f"se{i}")
        assert await bus.flush(timeout_s=15.0)
        assert fails["left"] == 0 and bus.stats.send_failures >= 2
        await wait_until(lambda: len(got) == 3, 20.0, "the station events")
        assert got == ["se0", "se1", "se2"]
        assert bus.outbox.pending == 0
    finally:
        await bus.delete_streams()
        await bus.close()


async def test_an_outbox_counts_again_what_another_took(tmp_path: Path) -> None:
    """Two outboxes on one file (review of session 12: the cloud opened a second bus per site on
    the same file): each counted only what it saw, so one was left with entries pending that
    the file no longer held. ``recount`` reads the file again."""
    path = tmp_path / "ob.sqlite"
    a, b = Outbox(path), Outbox(path)
    await a.open()
    await a.append("evcore.s.audit", "e1", b"1", 0.0)
    await b.open()
    assert b.pending == 1
    await a.remove_through(10)
    assert await b.peek(10) == [] and b.pending == 1
    assert await b.recount() == 0 and b.pending == 0 and not b.nonempty.is_set()
    await a.close()
    await b.close()


async def test_an_in_process_stream_is_bounded_in_bytes_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The in-process EVENTS stream holds every audit record the edge publishes, in memory, for
    30 days or 100,000 messages: with no byte cap, a 100-charger site's records (5.3 KB each)
    came to about 550 MB at the cap, a 1000-charger site's far more (before: all 1,000 records
    of 100 KB below held, 100 MB). Each stream without a byte limit of its own is now capped at
    max_bytes_per_stream (64 MiB by default; the oldest go first), and a durable consumer that
    the cap overtook says what it missed."""
    bus = InProcessBus("m")
    await bus.start()
    s = Subjects("m")
    got: list[str] = []

    async def handler(m: BusMessage) -> None:
        got.append(m.event_id)

    sub = await bus.consume(s.audit, durable="d", handler=handler)
    await sub.stop()  # the durable stays, at the stream's start
    for i in range(1000):
        await bus.publish(s.audit, i.to_bytes(4, "big") * 25_000, event_id=f"a{i}")
    held = sum(stream.bytes for stream in bus._streams.values())
    assert held <= 64 * 1024 * 1024, f"{held} bytes held"
    newest = await bus.ack_state(s.audit, "a999", durable="d")
    assert newest.stored_seq == 1000
    assert (await bus.ack_state(s.audit, "a0", durable="d")).stored_seq == 0
    caplog.set_level(logging.WARNING, logger="evcore.bus")
    await bus.consume(s.audit, durable="d", handler=handler)
    await wait_until(lambda: got[-1:] == ["a999"], 5, "the newest record")
    first = int(got[0][1:])
    assert first > 0
    assert f"consumer d: messages 1..{first} of stream" in caplog.text, caplog.text
    await bus.close()


def test_a_site_id_too_long_for_nats_names_is_refused_naming_why(tmp_path: Path) -> None:
    """JetStream refuses a stream name longer than 255 characters and the file system an outbox
    file name longer than 255 bytes. A site id escaped past that (a 27-character Chinese name is
    243 characters in a stream name, each character 9) was taken: on the real server its
    streams were refused (err_code 10052) and retried for ever, every audit record waiting in
    the outbox; at 250 characters the outbox did not open ('unable to open database file',
    naming neither the file nor why). The bus now refuses such an id when it is made, naming
    the stream and file and their lengths."""
    conf = BusConfig(kind="nats", outbox_dir=tmp_path)
    with pytest.raises(ValueError, match=r"EVCORE_\S+_TELEMETRY has 260 characters"):
        NatsBus("北" * 27, conf)
    with pytest.raises(ValueError, match=r"outbox file name \S+ has 257 bytes"):
        NatsBus("s" * 250, conf)
    NatsBus("北" * 26, conf)  # 250 characters: taken, as before
