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
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bus_testkit import SharedBus, patient_nats_bus
from edge_testkit import stepped_controller
from evcore.bus import Subjects
from evcore.bus.inprocess import InProcessBus
from evcore.clock import StepClock
from evcore.edge.controller import EdgeController
from evcore.edge.facade import ControllerFacade
from evcore.edge.signals import (
    BOOK_KEY,
    GRID_DURABLE,
    BookWriter,
    load_curtailments,
    subscribe_signals,
)
from evcore.edge.sitegen import depot_table
from evcore.store import SqlStore, open_store
from evcore.v1 import grid_pb2

pytestmark = pytest.mark.timeout(90)

NATS_URL = "nats://127.0.0.1:4222"


class _Gateway:
    async def set_limit(self, charger_id: str, **kwargs: Any) -> Any:
        class _R:
            accepted = True

        return _R()


def _signal(
    cid: str,
    max_kw: float,
    start: float,
    end: float,
    *,
    issued_at: float,
    cancelled: bool = False,
) -> grid_pb2.GridSignal:
    sig = grid_pb2.GridSignal(signal_id=f"{cid}@{issued_at}")
    sig.issued_at.FromNanoseconds(int(issued_at * 1e9))
    sig.curtailment.curtailment_id = cid
    sig.curtailment.node_id = "grid"
    sig.curtailment.max_kw = max_kw
    sig.curtailment.cancelled = cancelled
    sig.curtailment.start.FromNanoseconds(int(start * 1e9))
    sig.curtailment.end.FromNanoseconds(int(end * 1e9))
    return sig


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


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

    def __init__(self, rig: _Rig, store_section: dict[str, object], tmp_path: Path) -> None:
        self.rig = rig
        self.table = depot_table(2, per_feeder=2, site_id=rig.site)
        self.ctrl: EdgeController
        self.clock: StepClock
        self.ctrl, self.clock = stepped_controller(self.table, _Gateway())
        self.store: SqlStore = open_store(store_section, tmp_path)
        self.bus = rig.edge_bus()
        self.subs: list[Any] = []
        self.restored = 0
        self.writer = BookWriter(self.ctrl, self.store, retry_s=0.2)
        self.retry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.store.open()
        # As EdgeApp.run: the book is restored before the first decision and the consumer.
        self.restored = await load_curtailments(self.ctrl, self.store)
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
    await _publish(rig, _signal("dso-1", 5.0, now, now + 3600.0, issued_at=now))
    await _until(lambda: edge.caps() == {"grid": 5.0}, 10, "the curtailment, live")
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
            _signal("dso-1", 8.0, start, end, issued_at=now - 10.0),
            _signal("dso-1", 20.0, start, end, issued_at=now - 20.0),
            _signal("dso-1", 20.0, start, end, issued_at=now - 15.0, cancelled=True),
            _signal("marker", 50.0, start, end, issued_at=now),
        )
        await _until(lambda: "marker" in _ids(edge), 10, "the marker")
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
            _signal("dso-1", 20.0, start, end, issued_at=now - 20.0),
            _signal("marker-2", 60.0, start, end, issued_at=now),
        )
        await _until(lambda: "marker-2" in _ids(edge2), 10, "the second marker")
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
        await _publish(rig, _signal("dso-1", 5.0, start, end, issued_at=now - 10.0))
        await _until(lambda: edge.caps() == {"grid": 5.0}, 10, "the curtailment")
        await _publish(rig, _signal("dso-1", 5.0, start, end, issued_at=now - 5.0, cancelled=True))
        await _until(lambda: edge.caps() == {}, 10, "the cancel")
        # The cancelled revision delivered again does not bring it back.
        await _publish(
            rig,
            _signal("dso-1", 5.0, start, end, issued_at=now - 10.0),
            _signal("marker", 50.0, start, end, issued_at=now),
        )
        await _until(lambda: "marker" in _ids(edge), 10, "the marker")
        assert [c.signal_id for c in edge.ctrl.curtailments] == ["marker"]
        await asyncio.sleep(0.5)
    finally:
        await edge.stop()
    edge2 = _Edge(rig, section, tmp_path)
    await edge2.start()
    try:
        assert [c.signal_id for c in edge2.ctrl.curtailments] == ["marker"]
        await _publish(rig, _signal("dso-1", 5.0, start, end, issued_at=now - 10.0))
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
            _signal("short", 5.0, now, now + 60.0, issued_at=now),
            _signal("long", 9.0, now, now + 3600.0, issued_at=now),
        )
        await _until(lambda: len(edge.ctrl.curtailments) == 2, 10, "both curtailments")
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
        await _publish(rig, _signal("other", 30.0, now, now + 3600.0, issued_at=now))
        await _until(lambda: len(edge2.ctrl.curtailments) == 2, 10, "another curtailment")
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
            _signal("a", 50.0, now, now + 3600.0, issued_at=now),
            _signal("b", 5.0, now, now + 3600.0, issued_at=now + 1.0),  # the tight one
        )
        # Applied while the store is down (before the fix: not there after 3 s).
        await _until(lambda: edge.caps() == {"grid": 5.0}, 2.0, "b during the outage")
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


async def test_an_api_curtailment_and_cancel_are_stored_before_the_answer(
    store_section: dict[str, object], tmp_path: Path
) -> None:
    """Review 2026-12-05 (MEDIUM): a curtailment posted (or cancelled) through the API was only
    in memory: gone (or back) after a restart."""
    table = depot_table(2, per_feeder=2, site_id="api-grid")
    ctrl, clock = stepped_controller(table, _Gateway())
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
    ctrl2, _ = stepped_controller(table, _Gateway())
    store2 = open_store(store_section, tmp_path)
    await store2.open()
    try:
        assert await load_curtailments(ctrl2, store2) == 1  # before the fix: 0
        assert [c.signal_id for c in ctrl2.curtailments] == ["api-1"]
        assert ctrl2.curtailments.caps_kw(now) == {"grid": 5.0}
    finally:
        await store2.close()


async def test_an_api_curtailment_applies_while_the_store_is_down(tmp_path: Path) -> None:
    table = depot_table(2, per_feeder=2, site_id="api-grid-down")
    ctrl, clock = stepped_controller(table, _Gateway())
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
    writer = BookWriter(ctrl, store)
    facade = ControllerFacade(ctrl, book=writer)
    try:
        await facade.post_curtailment("api-1", "grid", 5.0, now, now + 3600.0)  # never refused
        assert ctrl.curtailments.caps_kw(now) == {"grid": 5.0}
        assert facade.curtailments_durable() is False
        down["v"] = False
        assert await writer.save_if_dirty()
        assert facade.curtailments_durable() is True
        assert await _stored_ids(store) == ["api-1"]
    finally:
        await writer.aclose()
        await store.close()


async def test_a_corrupt_stored_book_names_the_key(tmp_path: Path) -> None:
    table = depot_table(2, per_feeder=2, site_id="corrupt")
    ctrl, _ = stepped_controller(table, _Gateway())
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
