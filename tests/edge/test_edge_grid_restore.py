"""The grid consumer acknowledges a curtailment only once the book holding it is in the edge's
store (SQLite or PostgreSQL), and the edge restores the book at start: a curtailment in force
survives a restart with nothing published meanwhile (review 2026-12-05, HIGH: before, edge 2 on
the same durable held no curtailment). Per curtailment id the book keeps the issue time of the
revision it applied: an older revision or cancel delivered later is ignored (MEDIUM: before, a
redelivered older revision replaced the newer one). A cancel applies and stays applied across a
restart; an ended curtailment is not restored.

Against the real NATS server (127.0.0.1:4222), and on the in-process bus.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import SharedBus, patient_nats_bus
from edge_testkit import AcceptingGateway, grid_curtailment, stepped_controller, until
from evcore.bus import Subjects
from evcore.bus.inprocess import InProcessBus
from evcore.clock import StepClock
from evcore.edge.controller import EdgeController
from evcore.edge.facade import ControllerFacade
from evcore.edge.grid import Curtailment
from evcore.edge.signals import (
    BOOK_KEY,
    FALLBACK_NAME,
    GRID_DURABLE,
    BookWriter,
    apply_grid_signal,
    load_curtailments,
    subscribe_signals,
)
from evcore.edge.sitegen import depot_table
from evcore.store import SqlStore, open_store
from evcore.v1 import grid_pb2

pytestmark = pytest.mark.timeout(90)

NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class _Rig:
    """The cloud's publisher and a factory of edge buses on the same site (one per edge run)."""

    site: str
    pub: Any
    edge_bus: Any

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.site)


@pytest.fixture(params=["nats", "inprocess"])
async def rig(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[_Rig]:
    site = "grid-restore-" + uuid.uuid4().hex[:8]
    if request.param == "nats":
        pub = patient_nats_bus(site, NATS_URL, tmp_path / "cloud-outbox")
        await pub.start()
        try:
            yield _Rig(
                site, pub, lambda: patient_nats_bus(site, NATS_URL, tmp_path / "edge-outbox")
            )
        finally:
            await pub.delete_streams()  # else each run leaves its site's streams on the server
            await pub.close()
        return
    bus = InProcessBus(site)
    await bus.start()
    try:
        yield _Rig(site, bus, lambda: SharedBus(bus))
    finally:
        await bus.close()


class _Edge:
    """One run of the edge's grid side: a controller, its store and bus, the durable consumer."""

    def __init__(
        self,
        rig: _Rig,
        store_section: dict[str, object],
        tmp_path: Path,
        fallback: Path | None = None,
    ) -> None:
        self.rig = rig
        self.table = depot_table(2, per_feeder=2, site_id=rig.site)
        self.ctrl: EdgeController
        self.clock: StepClock
        self.ctrl, self.clock = stepped_controller(self.table, AcceptingGateway())
        self.store: SqlStore = open_store(store_section, tmp_path)
        self.bus = rig.edge_bus()
        self.subs: list[Any] = []
        self.restored = 0
        self.writer = BookWriter(self.ctrl, self.store, retry_s=0.2, fallback=fallback)
        self.retry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.open()
        # As EdgeApp.run: the book is restored before the first decision and the consumer.
        self.restored = await self.writer.load()
        await self.bus.start()
        self.subs = await subscribe_signals(
            self.bus, self.ctrl, grid_durable=GRID_DURABLE, writer=self.writer
        )
        self.retry = asyncio.create_task(self.writer.run())  # as EdgeApp's task group

    async def stop(self) -> None:
        for s in self.subs:
            await s.stop()
        if self.retry is not None:
            self.retry.cancel()
        await self.writer.aclose()
        await self.bus.close()
        await self.store.close()

    def caps(self) -> dict[str, float]:
        return self.ctrl.curtailments.caps_kw(self.clock.now())


def _ids(edge: _Edge) -> list[str]:
    return [c.signal_id for c in edge.ctrl.curtailments]


async def _publish(rig: _Rig, *signals: grid_pb2.GridSignal) -> None:
    for sig in signals:
        await rig.pub.publish(rig.subjects.grid, sig, critical=True)
    assert await rig.pub.flush(5.0)


async def test_a_curtailment_in_force_survives_a_restart_with_nothing_published(
    rig: _Rig, store_section: dict[str, object], tmp_path: Path
) -> None:
    edge = _Edge(rig, store_section, tmp_path)
    await edge.start()
    now = edge.clock.now()
    await _publish(rig, grid_curtailment("dso-1", 5.0, now, now + 3600.0, issued_at=now))
    await until(lambda: edge.caps() == {"grid": 5.0}, 10, "the curtailment, live")
    await asyncio.sleep(0.5)  # acknowledged
    await edge.stop()
    # The edge restarts on the same store and durable; nothing is published meanwhile.
    edge2 = _Edge(rig, store_section, tmp_path)
    edge2.clock.advance(60.0)
    await edge2.start()
    try:
        assert edge2.restored == 1
        assert edge2.caps() == {"grid": 5.0}  # before the fix: {}
        await asyncio.sleep(1.0)  # nothing redelivered changes it
        await edge2.ctrl.decide("test")
        assert edge2.caps() == {"grid": 5.0}
    finally:
        await edge2.stop()


async def test_an_older_revision_delivered_after_a_newer_one_is_ignored(
    rig: _Rig, tmp_path: Path
) -> None:
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    edge = _Edge(rig, section, tmp_path)
    await edge.start()
    now = edge.clock.now()
    start, end = now, now + 3600.0
    try:
        # Revision 2 (8 kW) went through; revision 1 (20 kW, its ack lost) comes again after it,
        # then a cancel issued before revision 2.
        await _publish(
            rig,
            grid_curtailment("dso-1", 8.0, start, end, issued_at=now - 10.0),
            grid_curtailment("dso-1", 20.0, start, end, issued_at=now - 20.0),
            grid_curtailment("dso-1", 20.0, start, end, issued_at=now - 15.0, cancelled=True),
            grid_curtailment("marker", 50.0, start, end, issued_at=now),
        )
        await until(lambda: "marker" in _ids(edge), 10, "the marker")
        assert edge.caps() == {"grid": 8.0}  # before the fix: the old revision's 20 kW, or none
        assert [(c.signal_id, c.max_kw) for c in edge.ctrl.curtailments] == [
            ("dso-1", 8.0),
            ("marker", 50.0),
        ]
    finally:
        await edge.stop()
    # The order survives a restart: the older revision delivered again is still ignored.
    edge2 = _Edge(rig, section, tmp_path)
    await edge2.start()
    try:
        assert edge2.caps() == {"grid": 8.0}
        await _publish(
            rig,
            grid_curtailment("dso-1", 20.0, start, end, issued_at=now - 20.0),
            grid_curtailment("marker-2", 60.0, start, end, issued_at=now),
        )
        await until(lambda: "marker-2" in _ids(edge2), 10, "the second marker")
        assert edge2.caps() == {"grid": 8.0}
    finally:
        await edge2.stop()


async def test_a_cancel_applies_and_stays_applied_after_a_restart(
    rig: _Rig, tmp_path: Path
) -> None:
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    edge = _Edge(rig, section, tmp_path)
    await edge.start()
    now = edge.clock.now()
    start, end = now, now + 3600.0
    try:
        await _publish(rig, grid_curtailment("dso-1", 5.0, start, end, issued_at=now - 10.0))
        await until(lambda: edge.caps() == {"grid": 5.0}, 10, "the curtailment")
        await _publish(
            rig, grid_curtailment("dso-1", 5.0, start, end, issued_at=now - 5.0, cancelled=True)
        )
        await until(lambda: edge.caps() == {}, 10, "the cancel")
        # The cancelled revision delivered again does not bring it back.
        await _publish(
            rig,
            grid_curtailment("dso-1", 5.0, start, end, issued_at=now - 10.0),
            grid_curtailment("marker", 50.0, start, end, issued_at=now),
        )
        await until(lambda: "marker" in _ids(edge), 10, "the marker")
        assert [c.signal_id for c in edge.ctrl.curtailments] == ["marker"]
        await asyncio.sleep(0.5)
    finally:
        await edge.stop()
    edge2 = _Edge(rig, section, tmp_path)
    await edge2.start()
    try:
        assert [c.signal_id for c in edge2.ctrl.curtailments] == ["marker"]
        await _publish(rig, grid_curtailment("dso-1", 5.0, start, end, issued_at=now - 10.0))
        await asyncio.sleep(1.0)
        assert [c.signal_id for c in edge2.ctrl.curtailments] == ["marker"]
    finally:
        await edge2.stop()


async def test_an_ended_curtailment_is_not_restored(rig: _Rig, tmp_path: Path) -> None:
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    edge = _Edge(rig, section, tmp_path)
    await edge.start()
    now = edge.clock.now()
    try:
        await _publish(
            rig,
            grid_curtailment("short", 5.0, now, now + 60.0, issued_at=now),
            grid_curtailment("long", 9.0, now, now + 3600.0, issued_at=now),
        )
        await until(lambda: len(edge.ctrl.curtailments) == 2, 10, "both curtailments")
        await asyncio.sleep(0.5)
    finally:
        await edge.stop()
    # Back two minutes later: "short" ended meanwhile.
    edge2 = _Edge(rig, section, tmp_path)
    edge2.clock.advance(120.0)
    await edge2.start()
    try:
        # Before any decision (which would prune it): only the one still in force.
        assert edge2.restored == 1
        assert [c.signal_id for c in edge2.ctrl.curtailments] == ["long"]
        assert edge2.caps() == {"grid": 9.0}
        # The next write of the book drops it from the store too.
        await _publish(rig, grid_curtailment("other", 30.0, now, now + 3600.0, issued_at=now))
        await until(lambda: len(edge2.ctrl.curtailments) == 2, 10, "another curtailment")
        await asyncio.sleep(0.3)
        stored = await edge2.store.get_meta(BOOK_KEY)
        assert stored is not None
        assert sorted(row[0] for row in json.loads(stored)["curtailments"]) == ["long", "other"]
    finally:
        await edge2.stop()


def _store_down(edge: _Edge) -> dict[str, bool]:
    """Make the edge's store refuse ``set_meta`` while ``down["v"]`` (a store outage)."""
    down = {"v": True}
    real = edge.store.set_meta

    async def flaky(key: str, value: str) -> None:
        if down["v"]:
            raise OSError("store down (test)")
        await real(key, value)

    edge.store.set_meta = flaky  # type: ignore[method-assign]
    return down


async def _stored_ids(store: Any) -> list[str]:
    text = await store.get_meta(BOOK_KEY)
    return [] if not text else sorted(row[0] for row in json.loads(text)["curtailments"])


async def test_a_store_outage_never_holds_a_later_curtailment_back(
    rig: _Rig, tmp_path: Path
) -> None:
    """Review 2026-12-05 (HIGH): the write of the book failing raised, the message was
    redelivered and every later grid message waited behind it until the store came back."""
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    edge = _Edge(rig, section, tmp_path)
    await edge.start()
    down = _store_down(edge)
    now = edge.clock.now()
    try:
        await _publish(
            rig,
            grid_curtailment("a", 50.0, now, now + 3600.0, issued_at=now),
            grid_curtailment("b", 5.0, now, now + 3600.0, issued_at=now + 1.0),  # the tight one
        )
        # Applied while the store is down (before the fix: not there after 3 s).
        await until(lambda: edge.caps() == {"grid": 5.0}, 2.0, "b during the outage")
        assert edge.writer.dirty and edge.writer.failures >= 1
        assert await _stored_ids(edge.store) == []
        down["v"] = False
        # The retry writes the whole book once the store is back, with nothing published.
        for _ in range(100):
            if await _stored_ids(edge.store) == ["a", "b"]:
                break
            await asyncio.sleep(0.05)
        assert await _stored_ids(edge.store) == ["a", "b"]
        assert not edge.writer.dirty
    finally:
        await edge.stop()
    edge2 = _Edge(rig, section, tmp_path)
    await edge2.start()
    try:
        assert edge2.restored == 2 and edge2.caps() == {"grid": 5.0}
    finally:
        await edge2.stop()


async def test_a_restart_during_a_store_outage_keeps_what_arrived_in_it(
    rig: _Rig, tmp_path: Path
) -> None:
    """A curtailment that arrives while the store is down is acknowledged (never held back),
    so after a restart it is not on the bus any more: before the local copy, a restart during
    the outage started with no curtailment. Now the book is in ``evcore-curtailments.json``
    (fsynced before the ack), restored at start, then stored and the file removed."""
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    local = tmp_path / FALLBACK_NAME
    edge = _Edge(rig, section, tmp_path, fallback=local)
    await edge.start()
    down = _store_down(edge)
    now = edge.clock.now()
    try:
        await _publish(
            rig,
            grid_curtailment("a", 50.0, now, now + 3600.0, issued_at=now),
            grid_curtailment("b", 5.0, now, now + 3600.0, issued_at=now + 1.0),
        )
        await until(lambda: edge.caps() == {"grid": 5.0}, 5.0, "b during the outage")
        await until(lambda: local.exists() and edge.writer.durable, 5.0, "the local copy")
        assert edge.writer.failing and await _stored_ids(edge.store) == []
        held = json.loads(local.read_text())
        assert sorted(row[0] for row in held["curtailments"]) == ["a", "b"]
        await asyncio.sleep(0.5)  # acknowledged
    finally:
        await edge.stop()  # the store is still down when the edge stops
    assert down["v"] and local.exists()
    edge2 = _Edge(rig, section, tmp_path, fallback=local)
    edge2.clock.advance(30.0)
    await edge2.start()  # its store works again
    try:
        assert edge2.restored == 2 and edge2.caps() == {"grid": 5.0}  # before: 0, {}
        # The next retry stores the restored book and drops the local copy.
        await until(lambda: not local.exists(), 5.0, "the local copy removed")
        assert await _stored_ids(edge2.store) == ["a", "b"]
        assert not edge2.writer.dirty
    finally:
        await edge2.stop()
    edge3 = _Edge(rig, section, tmp_path, fallback=local)
    await edge3.start()
    try:
        assert edge3.restored == 2 and edge3.caps() == {"grid": 5.0}  # from the store now
    finally:
        await edge3.stop()


async def test_the_newer_copy_of_the_book_is_restored(tmp_path: Path) -> None:
    """A local copy older than the store's book (the edge stopped between storing and removing
    it) does not bring back what the store's newer book no longer holds; a newer one wins."""
    table = depot_table(2, per_feeder=2, site_id="book-copies")
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    local = tmp_path / FALLBACK_NAME
    now = clock.now()
    try:
        ctrl.curtailments.add(Curtailment("old", "grid", 3.0, now, now + 3600.0))
        local.write_text(ctrl.curtailments.snapshot(saved_at=now))
        ctrl.curtailments.cancel("old")
        ctrl.curtailments.add(Curtailment("new", "grid", 9.0, now, now + 3600.0))
        await store.set_meta(BOOK_KEY, ctrl.curtailments.snapshot(saved_at=now + 5.0))
        for expected, saved_at in ((["new"], now - 1.0), (["old"], now + 10.0)):
            local.write_text(json.dumps({**json.loads(local.read_text()), "saved_at": saved_at}))
            fresh, _ = stepped_controller(table, AcceptingGateway())
            assert await load_curtailments(fresh, store, local) == 1
            assert [c.signal_id for c in fresh.curtailments] == expected
        local.write_text('{"v": 1, "saved_at": 1e18, "curtailments": [["x"]]}')
        fresh, _ = stepped_controller(table, AcceptingGateway())
        with pytest.raises(ValueError, match=r"local copy .*evcore-curtailments\.json"):
            await load_curtailments(fresh, store, local)
    finally:
        await store.close()


async def test_an_api_curtailment_and_cancel_are_stored_before_the_answer(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    """Review 2026-12-05 (MEDIUM): a curtailment posted (or cancelled) through the API was only
    in memory: gone (or back) after a restart."""
    table = depot_table(2, per_feeder=2, site_id="api-grid")
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    store = open_store(store_section, tmp_path)
    await store.open()
    now = clock.now()
    try:
        facade = ControllerFacade(ctrl, book=BookWriter(ctrl, store))
        await facade.post_curtailment("api-1", "grid", 5.0, now, now + 3600.0)
        await facade.post_curtailment("api-2", "grid", 9.0, now, now + 3600.0)
        assert await facade.cancel_curtailment("api-2")
        assert facade.curtailments_durable() is True
    finally:
        await store.close()
    ctrl2, _ = stepped_controller(table, AcceptingGateway())
    store2 = open_store(store_section, tmp_path)
    await store2.open()
    try:
        assert await load_curtailments(ctrl2, store2) == 1  # before the fix: 0
        assert [c.signal_id for c in ctrl2.curtailments] == ["api-1"]
        assert ctrl2.curtailments.caps_kw(now) == {"grid": 5.0}
    finally:
        await store2.close()


@pytest.mark.parametrize("with_local", [False, True], ids=["no-local-copy", "local-copy"])
async def test_an_api_curtailment_applies_while_the_store_is_down(
    tmp_path: Path, with_local: bool
) -> None:
    table = depot_table(2, per_feeder=2, site_id="api-grid-down")
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    real = store.set_meta
    down = {"v": True}

    async def flaky(key: str, value: str) -> None:
        if down["v"]:
            raise OSError("store down (test)")
        await real(key, value)

    store.set_meta = flaky  # type: ignore[method-assign]
    now = clock.now()
    local = tmp_path / FALLBACK_NAME
    writer = BookWriter(ctrl, store, fallback=local if with_local else None)
    facade = ControllerFacade(ctrl, book=writer)
    try:
        await facade.post_curtailment("api-1", "grid", 5.0, now, now + 3600.0)  # never refused
        assert ctrl.curtailments.caps_kw(now) == {"grid": 5.0}
        # Durable across a restart only through the local copy (written before the answer).
        assert facade.curtailments_durable() is with_local
        assert local.exists() is with_local
        await facade.post_curtailment("api-2", "grid", 7.0, now, now + 3600.0)  # in the outage
        assert facade.curtailments_durable() is with_local
        if with_local:
            held = json.loads(local.read_text())["curtailments"]
            assert sorted(row[0] for row in held) == ["api-1", "api-2"]
        down["v"] = False
        assert await writer.save_if_dirty()
        assert facade.curtailments_durable() is True
        assert await _stored_ids(store) == ["api-1", "api-2"]
        assert not local.exists()
    finally:
        await writer.aclose()
        await store.close()


async def test_a_corrupt_stored_book_names_the_key(tmp_path: Path) -> None:
    table = depot_table(2, per_feeder=2, site_id="corrupt")
    ctrl, _ = stepped_controller(table, AcceptingGateway())
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    try:
        for bad in ('{"v": 1, "curtailments": [[', '{"v": 1, "curtailments": [["x"]]}', "[]"):
            await store.set_meta(BOOK_KEY, bad)
            with pytest.raises(ValueError, match=r"meta key 'edge\.curtailments' is not a curt"):
                await load_curtailments(ctrl, store)
    finally:
        await store.close()


async def test_evcore_edge_restores_the_local_copy_a_store_outage_left(tmp_path: Path) -> None:
    """What `evcore edge` runs: the local copy sits beside the audit journal (here the site
    file's directory); the edge starts with its curtailment, stores the book, removes the copy."""
    from evcore.clock import WallClock
    from evcore.edge.app import EdgeApp
    from evcore.edge.sitegen import to_toml

    table = depot_table(2, per_feeder=2, site_id="book-local-app")
    table["edge"] = {"tick_s": 0.5}
    table["store"] = {"kind": "embedded", "path": "var/store"}
    site_file = tmp_path / "site.toml"
    site_file.write_text(to_toml(table))
    now = WallClock().now()
    left, _ = stepped_controller(table, AcceptingGateway())
    left.curtailments.add(Curtailment("dso-9", "grid", 4.0, now - 10.0, now + 3600.0))
    local = tmp_path / FALLBACK_NAME
    local.write_text(left.curtailments.snapshot(saved_at=now - 5.0))
    app = EdgeApp.from_file(site_file, WallClock())
    runner = asyncio.create_task(app.run())
    try:
        await asyncio.wait_for(app.ready.wait(), 30)
        assert app.book is not None and app.book.fallback == local
        assert app.controller.curtailments.caps_kw(WallClock().now()) == {"grid": 4.0}
        await until(lambda: not local.exists(), 10.0, "the local copy stored and removed")
        assert app.store is not None and await _stored_ids(app.store) == ["dso-9"]
    finally:
        app.stop()
        await asyncio.wait_for(runner, 30)


@pytest.mark.parametrize("reverse", [False, True], ids=["first-second", "second-first"])
def test_same_instant_signals_apply_in_stream_order_and_a_redelivery_never_overrides(
    reverse: bool,
) -> None:
    """Two revisions (or a revision and a cancel) of one curtailment issued at the same instant:
    the one later in the stream stands (first deliveries come in stream order), and the earlier
    one delivered again after it (its ack was lost) is ignored. Review 2026-12-05: a rule that
    kept the tighter one ignored an operator's cancel issued in the same second for good, and
    dropped part of a cap when neither revision was tighter in every respect."""

    table = depot_table(2, per_feeder=2, site_id="ties")
    now = 1_000_000.0
    tight = grid_curtailment("dso-1", 5.0, now, now + 3600.0, issued_at=now)
    loose = grid_curtailment("dso-1", 20.0, now, now + 3600.0, issued_at=now)
    cancel = grid_curtailment("dso-1", 0.0, now, now + 3600.0, issued_at=now, cancelled=True)
    for pair in ((tight, loose), (tight, cancel), (loose, cancel)):
        ctrl, clock = stepped_controller(table, AcceptingGateway())
        clock.advance(now - clock.now() + 1.0)
        first, second = reversed(pair) if reverse else pair
        for sig, again in ((first, False), (second, False), (first, True)):
            apply_grid_signal(ctrl, sig.SerializeToString(), redelivered=again)
        c = second.curtailment
        expected = {} if c.cancelled else {"grid": c.max_kw}
        assert ctrl.curtailments.caps_kw(clock.now()) == expected, (pair, reverse)


def test_a_local_copy_never_replaces_a_later_one(tmp_path: Path) -> None:
    """A local write whose task was cancelled goes on in its thread: it must not overwrite a
    later copy (review 2026-12-05: two writers of one temporary file left it unreadable)."""
    from evcore.edge.signals import _write_atomic

    path = tmp_path / FALLBACK_NAME
    assert _write_atomic(path, '{"seq": 5}', 5)
    assert not _write_atomic(path, '{"seq": 3}', 3)
    assert path.read_text() == '{"seq": 5}'
    assert [p.name for p in tmp_path.iterdir()] == [FALLBACK_NAME]  # no temporary file left


async def test_the_newer_copy_is_told_by_seq_not_by_the_wall_clock(tmp_path: Path) -> None:
    """The edge's clock steps back 30 s during a store outage: the local copy written then holds
    a curtailment the store's copy lacks, with an earlier saved_at. Review 2026-12-05: chosen by
    saved_at, the store's older book was restored and the 5 kW curtailment lost for good."""
    table = depot_table(2, per_feeder=2, site_id="clock-step")
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    section: dict[str, object] = {"kind": "embedded", "path": str(tmp_path / "store")}
    store = open_store(section, tmp_path)
    await store.open()
    local = tmp_path / FALLBACK_NAME
    now = clock.now()
    writer = BookWriter(ctrl, store, fallback=local)
    try:
        ctrl.curtailments.add(Curtailment("a", "grid", 50.0, now, now + 3600.0))
        assert await writer.save()
        clock.wall -= 30.0  # the wall clock steps back
        real = store.set_meta

        async def down(key: str, value: str) -> None:
            raise OSError("store down (test)")

        store.set_meta = down  # type: ignore[method-assign]
        ctrl.curtailments.add(Curtailment("b", "grid", 5.0, now, now + 3600.0))
        assert not await writer.save()
        assert writer.durable and local.exists()
        store.set_meta = real  # type: ignore[method-assign]
    finally:
        await store.close()
    store2 = open_store(section, tmp_path)
    await store2.open()
    try:
        fresh, _ = stepped_controller(table, AcceptingGateway())
        writer2 = BookWriter(fresh, store2, fallback=local)
        assert await writer2.load() == 2
        assert fresh.curtailments.caps_kw(now + 1.0) == {"grid": 5.0}
        assert await writer2.save_if_dirty()
        assert await _stored_ids(store2) == ["a", "b"] and not local.exists()
    finally:
        await store2.close()


def test_a_signal_for_a_node_this_site_lacks_applies_at_the_grid_connection() -> None:
    """Review 2026-12-05 (HIGH): a fleet share for a node the edge does not have (the cloud's
    stored topology names the grid connection otherwise) was refused as a bad payload and
    acknowledged; the cloud counted the decrease as taken and raised the other sites while this
    one still held its higher share (350 kW on a 300 kW fleet limit). A site's every load is in
    its grid connection's, so the signal applies there; a restored book does the same."""

    table = depot_table(2, per_feeder=2, site_id="renamed-root")
    ctrl, clock = stepped_controller(table, AcceptingGateway())
    now = clock.now()
    sig = grid_curtailment("fleet:F:renamed-root", 5.0, now, now + 3600.0, issued_at=now)
    sig.curtailment.node_id = "main"  # the root's name in an older site file
    assert apply_grid_signal(ctrl, sig.SerializeToString()) == "curtailment"
    assert ctrl.curtailments.caps_kw(now + 1.0) == {"grid": 5.0}
    held = ctrl.curtailments.snapshot(saved_at=now, seq=1).replace('"grid"', '"main"', 1)
    fresh, _ = stepped_controller(table, AcceptingGateway())
    assert fresh.curtailments.restore(held, now) == []
    assert fresh.curtailments.caps_kw(now + 1.0) == {"grid": 5.0}
